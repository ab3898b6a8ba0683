/* python/shoal/_ring.h - the Ring part of shoal._core (see _ring.c). */
#ifndef SHOAL_PY_RING_H
#define SHOAL_PY_RING_H

#include <Python.h>

/* Adds Ring to module m. */
int shoal__ring_init(PyObject *m);

#endif
