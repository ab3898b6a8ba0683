"""ipyparallel, as shoal: the adapter that runs ipyparallel 9.2.0's own
tests (tests/compat, scripts/compat.sh) against shoal.

Each name is shoal's own object, under the name and in the module where
ipyparallel keeps it. A name shoal does not have is left out, so that the
tests that use it fail and show it, with one exception: a name a test module
imports at its top, whose absence would keep the whole module from being
collected, is a placeholder that raises NotImplementedError when used
(ipyparallel/_missing.py lists them). Nothing here adds behaviour that shoal
lacks.

scripts/compat.sh puts the run tree that holds this package first on
sys.path for its run only; the real ipyparallel is not installed there.
"""

from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION  # noqa: F401 (as ipyparallel)

import shoal as _shoal

from . import error  # noqa: F401
from ._missing import alias
from .client.asyncresult import *  # noqa: F401,F403
from .client.client import Client  # noqa: F401
from .client.remotefunction import *  # noqa: F401,F403
from .client.view import *  # noqa: F401,F403
from .cluster import *  # noqa: F401,F403
from .controller.dependency import *  # noqa: F401,F403
from .error import *  # noqa: F401,F403
from .serialize import *  # noqa: F401,F403
from .util import interactive  # noqa: F401

__version__ = _shoal.__version__

# ipyparallel's own functions; bind_kernel is left out (shoal has none).
alias(globals(), _shoal, "load_ipython_extension", "register_joblib_backend")
