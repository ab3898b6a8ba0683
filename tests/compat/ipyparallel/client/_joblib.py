"""ipyparallel.client._joblib: shoal's joblib backend."""

from shoal._joblib import IPythonParallelBackend  # noqa: F401
