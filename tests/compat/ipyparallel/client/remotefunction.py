"""ipyparallel.client.remotefunction: shoal's RemoteFunction and
ParallelFunction. The module-level decorators remote(view) and
parallel(view) are left out unless shoal has them (shoal has the view
methods view.remote() and view.parallel())."""

import shoal as _shoal
import shoal.view as _view

from .._missing import alias

__all__ = [n for n in ("remote", "parallel", "RemoteFunction", "ParallelFunction")
           if hasattr(_shoal, n) or hasattr(_view, n)]
alias(globals(), _view, *__all__)
alias(globals(), _shoal, *__all__)
