/*
 * engine/loop.h - the engine's task loop (loop.c), a module built into
 * shoal-engine: engine.c registers it as _shoal_engine before Python starts.
 */
#ifndef SHOAL_ENGINE_LOOP_H
#define SHOAL_ENGINE_LOOP_H

#include <Python.h>

PyObject *shoal_engine_loop_init(void);

#endif /* SHOAL_ENGINE_LOOP_H */
