"""ipyparallel.client.asyncresult: shoal's AsyncResult and AsyncMapResult.
AsyncHubResult (a result fetched from the Hub's database) has no shoal
counterpart: a placeholder, see ipyparallel/_missing.py."""

import shoal as _shoal

from .._missing import alias, placeholder

__all__ = ["AsyncResult", "AsyncMapResult", "AsyncHubResult"]
alias(globals(), _shoal, "AsyncResult", "AsyncMapResult")
AsyncHubResult = placeholder("ipyparallel.client.asyncresult.AsyncHubResult", "no Hub database to fetch results from")
