"""ipyparallel.util: shoal's interactive, and the two time helpers of
ipyparallel's util that are the standard library's (utc, utcnow). The rest
(disambiguate_ip_address, ... ZMQ and session helpers) is left out."""

from datetime import datetime, timezone

import shoal as _shoal

from ._missing import alias

utc = timezone.utc  # ipyparallel: utc = timezone.utc


def utcnow():
    """ipyparallel: the timezone-aware current time in UTC."""
    return datetime.now(utc)


alias(globals(), _shoal, "interactive")
