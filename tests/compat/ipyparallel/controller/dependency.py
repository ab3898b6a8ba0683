"""ipyparallel.controller.dependency: shoal's Dependency, depend, require.
ipyparallel's `dependent` is left out."""

import shoal as _shoal

from .._missing import alias

__all__ = [n for n in ("depend", "require", "dependent", "Dependency") if hasattr(_shoal, n)]
alias(globals(), _shoal, *__all__)
