/* python/shoal/_common.h - what the parts of shoal._core share. */
#ifndef SHOAL_PY_COMMON_H
#define SHOAL_PY_COMMON_H

#include <Python.h>

/* Raises OSError(errnum, "what: reason") - the subclass that matches errnum
 * - and returns NULL. Defined in _core.c. */
PyObject *shoal__raise_oserror(int errnum, const char *what, const char *reason);

#endif
