"""shoal: an interactive parallel-computing cluster for Python.

shoal keeps IPython Parallel's API (``import shoal as ipp``) over a C core
built for fat nodes: engines on one node share large numpy arrays through a
shared-memory arena instead of each receiving a private copy.

The cluster: ``shoal-controller`` (one), ``shoal-agent`` (one per node,
owning the node's shared-memory :class:`Arena`), ``shoal-engine`` processes,
and :class:`Client` with its views, as in ipyparallel.
"""

from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION

from ._core import ALIGN, CHUNK, Arena, Block, Ring, Socket, WireError, keygen
from .asyncresult import AsyncMapResult, AsyncResult, ExecuteReply
from .client import Client
from .cluster import Cluster
from .dependency import Dependency, depend
from .bulk import load, save
from .serialize import FileNotSame, SharedArray, shared, use_cloudpickle, use_dill, use_pickle
from .error import (AlreadyDisplayedError, CompositeError, EngineError, ImpossibleDependency, RemoteError, ShoalError, TaskAborted,
                    TaskTimeout, TimeoutError, UnmetDependency)
from .view import BroadcastView, DirectView, LoadBalancedView, Reference, interactive, parallel, remote, require

__all__ = ["Client", "Cluster", "DirectView", "LoadBalancedView", "BroadcastView", "require", "interactive", "remote",
           "parallel", "Reference", "AsyncResult", "AsyncMapResult", "ExecuteReply", "RemoteError",
           "CompositeError", "AlreadyDisplayedError", "EngineError", "ShoalError", "TimeoutError", "TaskAborted", "TaskTimeout",
           "UnmetDependency", "ImpossibleDependency", "Dependency", "depend", "Arena", "Block", "Ring", "Socket", "WireError", "keygen", "ALIGN", "CHUNK",
           "use_cloudpickle", "use_dill", "use_pickle", "shared", "SharedArray", "FileNotSame", "load", "save",
           "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "register_joblib_backend"]
__version__ = "0.1.0"


def register_joblib_backend(name="ipyparallel", make_default=False):
    """Registers a joblib backend that runs on a load-balanced view of the
    default profile's cluster (view.register_joblib_backend: of a view's)."""
    from ._joblib import register_default
    return register_default(Client, name, make_default)


def load_ipython_extension(ip):
    """%load_ext shoal registers the %px magics (see shoal.magics), for
    every engine of the default profile's cluster, connected on first use."""
    from .magics import load_ipython_extension as load

    def connect():
        view = Client().direct_view("all")
        view.block = True
        return view
    load(ip, connect)
