"""ipyparallel.serialize: shoal serializes with cloudpickle (shoal.serialize)
and has no canning layer. Reference is shoal's. can/uncan are placeholders
(ipyparallel/_missing.py); PrePickled, can_map, serialize_object,
deserialize_object, pack_apply_message, ... and the module-level
use_pickle/use_dill/use_cloudpickle are left out."""

import shoal as _shoal

from .._missing import alias, placeholder

__all__ = [n for n in ("Reference", "use_pickle", "use_cloudpickle", "use_dill") if hasattr(_shoal, n)]
alias(globals(), _shoal, *__all__)
can = placeholder("ipyparallel.serialize.can", "no canning: functions and arrays are cloudpickled")
uncan = placeholder("ipyparallel.serialize.uncan", "no canning: functions and arrays are cloudpickled")
