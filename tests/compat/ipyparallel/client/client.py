"""ipyparallel.client.client: shoal's Client. ipyparallel's helpers here
(is_local_ip, ...) are left out."""

from shoal.client import Client  # noqa: F401
