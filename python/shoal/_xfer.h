/* python/shoal/_xfer.h - the Bulk part of shoal._core (see _xfer.c). */
#ifndef SHOAL_PY_XFER_H
#define SHOAL_PY_XFER_H

#include <Python.h>

/* Adds Bulk to module m. */
int shoal__xfer_init(PyObject *m);

#endif
