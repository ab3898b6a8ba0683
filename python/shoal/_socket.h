/* python/shoal/_socket.h - the Socket part of shoal._core (see _socket.c). */
#ifndef SHOAL_PY_SOCKET_H
#define SHOAL_PY_SOCKET_H

#include <Python.h>

/* Adds Socket, Frame, WireError and the MSG_* constants to module m. */
int shoal__socket_init(PyObject *m);

/* Module-level functions: keygen(). */
extern PyMethodDef shoal__socket_functions[];

#endif
