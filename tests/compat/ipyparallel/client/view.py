"""ipyparallel.client.view: shoal's views, ViewExecutor and
LazyMapIterator. Left out: View (ipyparallel's base class) unless shoal has it."""

import shoal.futures as _futures
import shoal.view as _view

from .._missing import alias

__all__ = [n for n in ("View", "DirectView", "LoadBalancedView", "BroadcastView", "LazyMapIterator") if hasattr(_view, n)]
alias(globals(), _view, *__all__)
if hasattr(_futures, "ViewExecutor"):
    ViewExecutor = _futures.ViewExecutor
    __all__.append("ViewExecutor")
