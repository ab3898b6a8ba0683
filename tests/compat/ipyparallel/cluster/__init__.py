"""ipyparallel.cluster: shoal's Cluster. ClusterManager and the launchers
(ipyparallel.cluster.launcher) are left out."""

import shoal as _shoal

from .._missing import alias

__all__ = [n for n in ("Cluster", "ClusterManager") if hasattr(_shoal, n)]
alias(globals(), _shoal, *__all__)
