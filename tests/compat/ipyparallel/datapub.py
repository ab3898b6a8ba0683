"""ipyparallel.datapub: shoal's publish_data."""

from shoal.datapub import publish_data  # noqa: F401
