"""ipyparallel.error: shoal's exceptions. Those of ipyparallel that shoal
does not have are left out: KernelError, DependencyTimeout,
InvalidDependency, AlreadyDisplayedError, NoEnginesRegistered,
TaskRejectError, ... and its helpers (wrap_exception, collect_exceptions)."""

import shoal.error as _error

from ._missing import alias

__all__ = [n for n in ("RemoteError", "EngineError", "TimeoutError", "CompositeError", "TaskAborted",
                       "TaskTimeout", "UnmetDependency", "ImpossibleDependency", "DependencyTimeout",
                       "InvalidDependency", "AlreadyDisplayedError", "NoEnginesRegistered", "KernelError",
                       "TaskRejectError") if hasattr(_error, n)]
alias(globals(), _error, *__all__)
