"""ipyparallel.client.magics: shoal's %px magics."""

from shoal.magics import *  # noqa: F401,F403
