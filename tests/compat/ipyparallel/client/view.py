"""ipyparallel.client.view: shoal's views and its ViewExecutor. Left out:
View (ipyparallel's base class) and BroadcastView unless shoal has them.
LazyMapIterator is a placeholder (ipyparallel/_missing.py): shoal's imap
returns a plain iterator."""

import shoal.futures as _futures
import shoal.view as _view

from .._missing import alias, placeholder

__all__ = [n for n in ("View", "DirectView", "LoadBalancedView", "BroadcastView") if hasattr(_view, n)]
alias(globals(), _view, *__all__)
if hasattr(_futures, "ViewExecutor"):
    ViewExecutor = _futures.ViewExecutor
    __all__.append("ViewExecutor")
LazyMapIterator = placeholder("ipyparallel.client.view.LazyMapIterator", "imap returns a plain iterator")
