"""The bulk path (docs/machines.md, "The bulk path"): a task whose buffers
for engines of other nodes are large goes as one transfer on the bulk
channel to the first of those nodes' agents, which passes it on along the
chain of the others as it comes in; the TASK through the controller then
names the transfer and carries none of the data.

Results come back the same way: right after its handshake the client
sends its token (TOKEN_RECORD, 8 random bytes, one per client) on the
connection, and every TASK to that node's engines carries the token
(the bulk info frame); the agent then sends a large reply block on this
connection, and the RESULT through the controller says so
(_core.RESULT_BULK) and names the transfer. receive() takes it.

Direct tasks (docs/machines.md, "Direct tasks"): a task for engines of
another node goes on this connection straight to their agent (send_task:
a transfer whose metadata names the task and its targets), and the agent
sends each engine's reply, and output, back on it (a transfer whose
metadata says {"task", "engine", "type"}): no hop through the controller.
wait_direct() takes them; the route handles them (route_controller.py).

One connection per agent endpoint, made when first used and kept. An
endpoint that cannot be reached (or whose connection fails) is left alone
for RETRY seconds, and the tasks meanwhile go through the controller, as
they would without a bulk server (warned once).
"""

import builtins
import json
import os
import secrets
import select
import time
import warnings

from . import _core

THRESHOLD = 1 << 20  # bytes of buffers from which a task goes by the bulk path
RETRY = 30.0  # seconds an endpoint that failed is left alone
TOKEN_RECORD = 128  # the record type of the client's token (node_agent/bulk.h, SHOAL_BULK_TOKEN)
ABORT_RECORD = 129  # a direct task's abort: its id, 8 bytes (SHOAL_BULK_ABORT_RECORD)


class BulkSender:
    """The bulk connections of one client (info: its connection file's
    contents: the cluster key, and Curve keys when the cluster encrypts)."""

    def __init__(self, info):
        self.key = bytes.fromhex(info["key"])
        # Curve on the controller's sockets means encryption on this channel too.
        self.encrypt = bool(info.get("curve"))
        self.threshold = int(os.environ.get("SHOAL_BULK_THRESHOLD", THRESHOLD))
        self.enabled = not os.environ.get("SHOAL_NO_BULK")
        # Tasks for other nodes' engines straight to their agents (SHOAL_NO_DIRECT=1: through the controller).
        self.direct = self.enabled and not os.environ.get("SHOAL_NO_DIRECT")
        self.replies = []  # (endpoint, metadata, block, bytes) of direct replies taken, for the route
        # endpoint -> when its connection last had bytes for us (or, when
        # replies became due on it, then: the route sets it)
        self.heard = {}
        self.conns = {}  # endpoint -> _core.Bulk
        self.failed = {}  # endpoint -> when it failed
        self.warned = False
        self.sent = 0  # transfers sent (tests look)
        self.received = 0  # result transfers received (tests look)
        self.token = secrets.randbits(64) or 1  # ours, for the agents to send our results back by
        # A connection that stops moving bytes for this long is broken (the
        # controller's node timeout: the agents give a silent peer up then too).
        self.idle_ms = int(info.get("node_timeout_ms") or 30000) + 2000
        # A direct task's agent silent for the node timeout (it sends a
        # keepalive each second) is lost, as the controller holds a node.
        self.direct_idle = int(info.get("node_timeout_ms") or 30000) / 1000
        self.stash = {}  # (endpoint, transfer id) -> a result's block that came before its RESULT
        self.broken = {}  # endpoint -> why its connection broke (results due on it fail)

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
            conn = self._conn(first)
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

    def _conn(self, ep):
        """The connection to ep, made (and our token sent on it) if need be.
        Raises OSError."""
        conn = self.conns.get(ep)
        if conn is None:
            conn = _core.Bulk(ep, self.key, self.encrypt, 5000, self.idle_ms)
            try:
                conn.send_record(TOKEN_RECORD, self.token.to_bytes(8, "little"))
            except OSError:
                conn.close()
                raise
            self.conns[ep] = conn
            self.broken.pop(ep, None)
        return conn

    def usable(self, ep):
        """Whether ep may be tried now (not failed within RETRY seconds)."""
        return bool(ep) and time.monotonic() - self.failed.get(ep, -RETRY) >= RETRY

    def send_task(self, ep, task, targets, parts, xid=0):
        """Sends a direct task (our id task, for targets, engines of the
        node at ep): its message block (parts: request, payload, frames),
        or, with xid, none: its block is transfer xid, sent along a chain.
        Raises OSError when the connection cannot be made or fails (it is
        then given up: see lost)."""
        meta = {"task": task, "targets": list(targets)}
        if xid:
            meta["xid"] = f"{xid:016x}"
        try:
            conn = self._conn(ep)
            conn.send(secrets.randbits(64) or 1, json.dumps(meta).encode(), parts, 2)
        except OSError as e:
            self.lost(ep, f"the bulk connection to its agent at {ep} failed ({e})")
            raise

    def send_abort(self, ep, task):
        """Asks the agent at ep to abort our direct task (as the controller's
        ABORT does); False if the connection is gone."""
        conn = self.conns.get(ep)
        try:
            if conn is None:
                return False
            conn.send_record(ABORT_RECORD, task.to_bytes(8, "little"))
            return True
        except OSError as e:
            self.lost(ep, f"the bulk connection to its agent at {ep} failed ({e})")
            return False

    def lost(self, ep, why):
        """Gives up the connection to ep, saying why."""
        conn = self.conns.pop(ep, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        self.failed[ep] = time.monotonic()
        self.broken[ep] = why
        self.heard.pop(ep, None)

    def _take(self, ep, conn, timeout_ms, arena):
        """The next transfer on conn within timeout_ms: (id, block, meta);
        a direct reply goes to self.replies (its id then returned with
        block None). Raises builtins.TimeoutError, OSError."""
        sizes = {}

        def alloc(xid, n):
            sizes[xid] = n
            if arena is not None:
                try:
                    return arena.alloc(n)
                except (OSError, MemoryError):
                    pass  # a full arena: ordinary memory
            return bytearray(n)

        xid, buf, meta = conn.recv_transfer(alloc, timeout_ms)
        self.heard[ep] = time.monotonic()
        if meta:
            try:
                what = json.loads(meta)
            except ValueError:  # not from an agent of ours: the connection is given up, its tasks fail
                raise OSError(f"its agent sent transfer {xid:016x} with metadata that is not JSON") from None
            self.replies.append((ep, what, buf, sizes[xid]))
            if sizes[xid] >= self.threshold:
                self.received += 1  # a large result, as those through the controller count
            return xid, None, meta
        self.received += 1
        return xid, buf, meta

    def wait_direct(self, eps, timeout, arena):
        """Waits up to timeout seconds for bytes on our connections to eps,
        and takes the transfers there (direct replies into self.replies,
        result blocks into the stash). Returns [(endpoint, why)] of those
        that broke, or that have been silent for the node timeout (the
        agent sends a keepalive each second)."""
        broken, fds = [], {}
        now = time.monotonic()
        for ep in eps:
            conn = self.conns.get(ep)
            if conn is None:
                broken.append((ep, self.broken.get(ep, f"there is no bulk connection to its agent at {ep}")))
            elif now - self.heard.setdefault(ep, now) > self.direct_idle:
                why = f"nothing came on the bulk connection from its agent at {ep} for {self.direct_idle:g} s"
                self.lost(ep, why)
                broken.append((ep, why))
            else:
                fds[conn.fileno()] = (ep, conn)
        if broken or not fds:
            return broken
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN)
        for fd, _ in p.poll(max(timeout, 0) * 1000):
            ep, conn = fds[fd]
            self.heard[ep] = time.monotonic()
            try:
                for _ in range(64):  # what is there, not more
                    xid, buf, meta = self._take(ep, conn, 0, arena)
                    if buf is not None:
                        self.stash[(ep, xid)] = buf  # a large result whose RESULT comes through the controller
            except builtins.TimeoutError:
                pass  # a keepalive, or nothing more
            except OSError as e:
                why = f"the bulk connection to its agent at {ep} broke ({e})"
                self.lost(ep, why)
                broken.append((ep, why))
        return broken

    def result_token(self, endpoints):
        """Our token, for a TASK to engines of the nodes at endpoints, once
        each of those that can be reached has our connection (made here if
        need be); 0 when none can (the results then come through the
        controller, as they do without a token)."""
        if not self.enabled:
            return 0
        ok = False
        for ep in endpoints:
            if not ep or time.monotonic() - self.failed.get(ep, -RETRY) < RETRY:
                continue
            try:
                self._conn(ep)
                ok = True
            except OSError as e:
                self.failed[ep] = time.monotonic()
                if not self.warned:
                    self.warned = True
                    warnings.warn(f"the bulk channel to {ep} failed ({e}); large data goes through the "
                                  f"controller meanwhile", RuntimeWarning, stacklevel=5)
        return self.token if ok else 0

    def receive(self, ep, tid, total, arena=None):
        """The block of result transfer tid (total bytes) from the agent at
        ep: received into a block of arena (when the client has one: the
        result's arrays are then views of it, as a local result's are) or a
        bytearray; transfers of other results that come first are kept for
        their RESULTs. Raises ConnectionError, saying why, when the
        connection is broken or breaks (the caller fails the result)."""
        got = self.stash.pop((ep, tid), None)
        if got is not None:
            return got
        conn = self.conns.get(ep)
        if conn is None:
            raise ConnectionError(self.broken.get(ep, f"there is no bulk connection to {ep}"))
        while True:
            try:
                xid, buf, meta = self._take(ep, conn, self.idle_ms, arena)
            except builtins.TimeoutError:
                why = f"nothing came on the bulk connection to {ep} for {self.idle_ms / 1000:g} s"
            except OSError as e:
                why = f"the bulk connection to {ep} broke ({e})"
            else:
                if buf is None:
                    continue  # a direct reply: the route takes it
                if xid == tid:
                    return buf
                self.stash[(ep, xid)] = buf
                continue
            self.lost(ep, why)
            raise ConnectionError(why)

    def close(self):
        for conn in self.conns.values():
            try:
                conn.close()
            except Exception:
                pass
        self.conns.clear()
