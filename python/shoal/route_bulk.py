"""The bulk path (docs/machines.md, "The bulk path"): a task whose buffers
for engines of other nodes are large goes as one transfer on the bulk
channel to the first of those nodes' agents, which passes it on along the
chain of the others as it comes in; the TASK through the controller then
names the transfer and carries none of the data.

One connection per agent endpoint, made when first used and kept. An
endpoint that cannot be reached (or whose connection fails) is left alone
for RETRY seconds, and the tasks meanwhile go through the controller, as
they would without a bulk server (warned once).
"""

import json
import os
import secrets
import time
import warnings

from . import _core

THRESHOLD = 1 << 20  # bytes of buffers from which a task goes by the bulk path
RETRY = 30.0  # seconds an endpoint that failed is left alone


class BulkSender:
    """The bulk connections of one client (info: its connection file's
    contents: the cluster key, and Curve keys when the cluster encrypts)."""

    def __init__(self, info):
        self.key = bytes.fromhex(info["key"])
        # Curve on the controller's sockets means encryption on this channel too.
        self.encrypt = bool(info.get("curve"))
        self.threshold = int(os.environ.get("SHOAL_BULK_THRESHOLD", THRESHOLD))
        self.enabled = not os.environ.get("SHOAL_NO_BULK")
        self.conns = {}  # endpoint -> _core.Bulk
        self.failed = {}  # endpoint -> when it failed
        self.warned = False
        self.sent = 0  # transfers sent (tests look)

    def wanted(self, s, endpoints):
        """Whether s (a Serialized) should go by the bulk path to the
        agents at endpoints (None where a node has no bulk server)."""
        if not self.enabled or not endpoints or s.files or not s.frames:
            return False
        if any(not ep or time.monotonic() - self.failed.get(ep, -RETRY) < RETRY for ep in endpoints):
            return False
        return sum(memoryview(f).nbytes for f in s.frames) >= self.threshold

    def send(self, endpoints, parts, npayload=2):
        """Sends the message block of parts as one transfer to endpoints[0],
        to be passed on along endpoints[1:]. Returns its id (non-zero), or
        None when it could not be sent (then warned once): the caller sends
        the task through the controller instead."""
        first = endpoints[0]
        tid = secrets.randbits(64) or 1
        meta = json.dumps({"chain": list(endpoints[1:])}).encode()
        try:
            conn = self.conns.get(first)
            if conn is None:
                conn = self.conns[first] = _core.Bulk(first, self.key, self.encrypt, 5000)
            conn.send(tid, meta, parts, npayload)
        except OSError as e:
            bad = self.conns.pop(first, None)
            if bad is not None:
                bad.close()
            self.failed[first] = time.monotonic()
            if not self.warned:
                self.warned = True
                warnings.warn(f"the bulk channel to {first} failed ({e}); large data goes through the "
                              f"controller meanwhile", RuntimeWarning, stacklevel=5)
            return None
        self.sent += 1
        return tid

    def close(self):
        for conn in self.conns.values():
            try:
                conn.close()
            except Exception:
                pass
        self.conns.clear()
