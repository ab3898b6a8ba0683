"""ipyparallel.client.client: shoal's Client. ipyparallel's helpers here
(is_local_ip, ...) are left out."""

from shoal.asyncresult import ExecuteReply  # noqa: F401
from shoal.client import Client  # noqa: F401
