"""The controller route: tasks through the controller's signed ZeroMQ
socket, to any engine on any node (docs/protocol.md, docs/controller.md).
The socket speaks CurveZMQ when the connection file carries Curve keys
(a cluster that listens beyond loopback, or started with --curve).

Tasks for engines of other nodes whose agents have a bulk server go
straight to those agents instead, on the client's bulk connections, and
their replies come back there (docs/machines.md, "Direct tasks";
submit_direct): the controller is not on their way. Per engine, one way
only: a node's engines get all of this client's direct-view tasks
directly while its connection works.

The same socket carries the client's questions to the controller (the
registry, queues, signals, aborts, shutdown: control()). The route watches
the controller too: when its process dies (a pidfd, on this machine) or it
leaves a question unanswered too long, every task through it fails with an
error that says so.
"""

import builtins
import itertools
import json
import os
import select
import struct
import time
import warnings
import weakref

from . import _core, serialize
from ._host import controller_here
from .error import EngineError, TimeoutError
from .route_bulk import BulkSender
from .routes import Route, request


def _readable(fd):
    """Whether fd is readable now (a pidfd: its process has ended); poll,
    not select, which refuses fds past 1023."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class ControllerRoute(Route):
    """One client's socket to the controller of the connection file info
    (read from path, for profile).

    lock: the client's lock, under which the socket is used.
    ids: the client's counter of lane and load-balanced task ids (a task
    that fails before it is sent takes its msg_id from it).
    registry: what the route needs of the client's registry: _arena_for(eid)
    (our arena if engine eid shares it, else None), _bulk_endpoint(eid) (the
    bulk server of engine eid's node, or None) and arena (the client's).
    A weak proxy, so that the client and its routes make no cycle.
    alive(pid): whether process pid runs.
    """

    def __init__(self, info, path, profile, lock, ids, registry, alive):
        self.lock = lock
        self.ids = ids
        self.registry = registry
        self.pid, self.pidfd = self._watch_process(info, path, profile, alive)
        # Closed by close(), or when a route that was never closed is collected.
        self._close_pidfd = weakref.finalize(self, os.close, self.pidfd) if self.pidfd is not None \
            else (lambda: None)
        self.dead = None  # why the controller is known to be gone (see gone)
        self.refused = False  # it is there, but refused our Curve keys
        self.last_heard = time.monotonic()  # when the controller last said anything
        self.asked_at = 0.0  # when we first asked a silent controller (HEARTBEAT), not answered since
        self.probe_at = 0.0  # when we last asked it
        # How long a controller may be silent, asked, before its tasks fail
        # (its own node timeout: the agents give it up then, too).
        self.timeout = (info.get("node_timeout_ms") or 30000) / 1000 + 2
        try:
            # The connection file's Curve keys (or null) go to the C core as
            # they are: it checks them, and names the field that is wrong.
            self.sock = _core.Socket("dealer", bytes.fromhex(info["key"]), connect=info["client"],
                                     curve=info.get("curve"))
        except ValueError as e:
            raise ValueError(f"the connection file {path} is not usable: {e}") from None
        # What the controller accepts at most (docs/protocol.md, "Limits"):
        # a task past it is refused here, with a clear error, not sent.
        self.max_frame = info.get("max_frame") or 1 << 62
        self.max_payload = info.get("max_payload") or 1 << 62
        self.pending = {}  # msg_id -> AsyncResult
        self.parts = 0  # task parts in flight through the controller (client.CONTROLLER_WINDOW)
        self.replies = {}  # msg_id -> (header, payload) of control replies
        self.waits = 0  # threads waiting for a controller reply
        self.bulk = BulkSender(info)  # large data for other nodes' engines (submit_bulk), and direct tasks
        self.direct = {}  # msg_id -> the agent endpoint of a direct task (also in pending)
        self.due = {}  # endpoint -> its direct tasks in self.direct
        self.direct_ids = itertools.count(1 << 52)  # their msg_ids: apart from the socket's and the lanes'

    @staticmethod
    def _watch_process(info, path, profile, alive):
        """(pid, pidfd) of the controller when it runs on this machine, so
        that its death is seen at once; (pid, None) when it runs on
        another (its heartbeat is watched instead), or where pidfds are
        missing. Raises OSError for a connection file whose controller ran
        on this machine and no longer runs."""
        pid = info.get("pid")
        here = controller_here(info)
        if here is None:
            return pid, None
        fd = None
        if here:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                here = False
            except OSError:
                return pid, None  # no pidfds here: the heartbeat watch still works
        if not here or not alive(pid) or controller_here(info) is False:
            if fd is not None:
                os.close(fd)
            raise OSError(f"the controller of profile '{profile}' (pid {pid}) is not running: its connection file "
                          f"{path} is stale (left by a controller that was killed?). Start a cluster with "
                          f"`shoal start`, or remove the file.")
        return pid, fd

    def gone(self, why):
        """The controller is gone (its process died, or it has not answered
        for self.timeout): every task through it fails with an EngineError
        that says so, and so does every later one. Lanes go on."""
        if self.dead is not None:
            return
        self.dead = why
        for mid, ar in list(self.pending.items()):
            for e in ar._mids.get(mid, ()):
                if e not in ar._results:
                    ar._fail(e, EngineError(f"engine {e}'s result cannot come: {why}", e))
        self.pending.clear()
        self.parts = 0

    def _watch(self):
        """While controller replies are due: has the controller died (its
        pidfd), or been silent too long? Asks a silent one (HEARTBEAT)."""
        if self.dead is not None or not (self.pending or self.waits):
            return
        if self.pidfd is not None and _readable(self.pidfd):
            self.gone(f"the controller (pid {self.pid}) died")
            return
        # Silence alone says nothing (a long task, a client that did not
        # wait): a controller is taken for gone only when it has left a
        # question unanswered for self.timeout.
        now = time.monotonic()
        if self.last_heard >= self.asked_at:  # nothing asked since it last spoke
            if now - self.last_heard > 2:
                self.asked_at = self.probe_at = now
                self.sock.send(_core.MSG_HEARTBEAT, [])
        elif now - self.asked_at > self.timeout:
            self.gone(f"the controller did not answer for {now - self.asked_at:.0f} s (asked)")
        elif now - self.probe_at > 1:
            self.probe_at = now
            self.sock.send(_core.MSG_HEARTBEAT, [])

    def control(self, kind, body, timeout, receive):
        """Asks the controller (a message of kind, with body as JSON) and
        waits up to timeout seconds for its answer, receiving by
        receive(seconds) meanwhile; returns the answer's body. Raises
        ConnectionError if the controller is gone, TimeoutError if it does
        not answer, RuntimeError if it refuses."""
        if self.dead is not None:
            raise ConnectionError(self._dead_words())
        with self.lock:
            mid = self.sock.send(kind, [json.dumps(body).encode()] if body is not None else [])
            self.waits += 1
        try:
            deadline = time.monotonic() + timeout
            while mid not in self.replies:
                left = deadline - time.monotonic()
                if self.dead is not None:
                    raise ConnectionError(self._dead_words())
                if left <= 0:
                    raise TimeoutError(f"the controller did not answer within {timeout:g} s{self._handshakes()}")
                receive(left)
        finally:
            with self.lock:
                self.waits -= 1
        hdr, payload = self.replies.pop(mid)
        body = json.loads(bytes(payload[0])) if payload else {}
        if hdr["type"] == _core.MSG_ERROR:
            raise RuntimeError(f"the controller refused: {body.get('error')}")
        return body

    def _dead_words(self):
        """Why control() cannot ask, and what to do."""
        if self.refused:  # the controller runs, but not for our keys
            return self.dead
        return f"{self.dead}: start the cluster again (`shoal start`) and make a new Client"

    def _handshakes(self):
        """What the socket's Curve handshakes say, for an error: a
        controller whose handshakes all failed is not silent, it does not
        take our keys."""
        h = self.sock.handshakes if self.sock is not None else None
        if not h or h["succeeded"] or not h["failed"]:
            return ""
        return (f" (every Curve handshake with it failed, {h['failed']} so far: is the connection file's "
                f"curve.server_key the running controller's?)")

    def check_limits(self, s, group):
        """Raises ValueError for a task that the controller would refuse
        (--max-payload, --max-frame): said here, before anything is sent."""
        if len(s.payload) > self.max_payload:
            raise ValueError(
                f"this task's pickled payload is {len(s.payload)} bytes, more than the controller takes in one "
                f"message ({self.max_payload} bytes, `shoal start --max-payload`); it goes to engine(s) {group} "
                f"through the controller. Large data travels best as numpy arrays or bytes-like buffers, "
                f"which are sent apart from the payload")
        big = max((memoryview(f).nbytes for f in s.frames), default=0)
        if big > self.max_frame:
            raise ValueError(
                f"this task has a buffer of {big} bytes, more than the controller takes in one frame "
                f"({self.max_frame} bytes, `shoal start --max-frame`); it goes to engine(s) {group} through "
                f"the controller")

    # ---- the Route interface ---------------------------------------------------

    def submit(self, ar, group, meta, s, obj, token=0):
        """Sends one task (s, the Serialized of obj) to the engines of group
        for ar, as one message; or, if the controller is gone, fails them.
        token: the bulk token (BulkSender.result_token) that lets the
        agents of group send large results on our bulk connections; 0: none."""
        if self.dead is not None:
            if ar.msg_id is None:
                ar.msg_id = next(self.ids)
            for t in group:
                ar._fail(t, EngineError(f"engine {t} cannot be reached: {self.dead}", t))
            return ()
        m = request(meta, s)
        frames = [struct.pack(f"<{len(group)}I", *group), json.dumps(m).encode(), s.payload]
        if token:  # the bulk info without a transfer: the block's frames follow it
            frames.insert(1, struct.pack("<QQ", 0, token))
            mid = self.sock.send(_core.MSG_TASK, frames, s.frames, flags=_core.TASK_BULK)
        else:
            mid = self.sock.send(_core.MSG_TASK, frames, s.frames)
        self._sent(ar, mid, group, meta, s, obj)
        return ()

    def submit_bulk(self, ar, group, meta, s, obj, endpoints, token=0):
        """Sends one task to the engines of group (on the nodes whose bulk
        servers are endpoints, in node order) by the bulk path: its message
        block as one transfer along the chain of those agents, then the
        TASK, with the bulk flag and the transfer's id, through the
        controller. Returns False, having sent nothing through the
        controller, if the transfer could not be sent (or the controller is
        gone): submit() then does it all."""
        if self.dead is not None:
            return False
        parts = [json.dumps(request(meta, s)).encode(), s.payload, *s.frames]
        tid = self.bulk.send(endpoints, parts)
        if tid is None:
            return False
        frames = [struct.pack(f"<{len(group)}I", *group), struct.pack("<QQ", tid, token)]
        mid = self.sock.send(_core.MSG_TASK, frames, flags=_core.TASK_BULK)
        self._sent(ar, mid, group, meta, s, obj)
        return True

    def submit_direct(self, ar, by_node, meta, s, obj, chain=None):
        """Sends one task straight to the agents of its engines' nodes
        (by_node: [(bulk endpoint, engines of that node)]), one direct task
        for each: its message block on our connection to that agent, or,
        when chain names the nodes' endpoints (large data), the block once
        along that chain (as submit_bulk sends it) and to each agent a
        direct task that names it. A node whose connection fails gets its
        part through the controller instead. Returns False, having sent
        nothing, when the chain's transfer could not be sent."""
        parts = [json.dumps(request(meta, s)).encode(), s.payload, *s.frames]
        xid = 0
        if chain:
            xid = self.bulk.send(chain, parts)
            if xid is None:
                return False
        for ep, group in by_node:
            mid = next(self.direct_ids)
            try:
                self.bulk.send_task(ep, mid, group, [] if xid else parts, xid)
            except OSError as e:
                self._direct_lost(ep, str(e))
                self.check_limits(s, group)
                self.submit(ar, group, meta, s, obj)
                continue
            self._sent(ar, mid, group, meta, s, obj)
            self._direct_add(mid, ep)
        return True

    def _direct_add(self, mid, ep):
        if not self.due.get(ep):
            # Its agent's silence counts from now: before, nothing was due,
            # nobody read the connection, and the agent sent no keepalives.
            self.bulk.heard[ep] = time.monotonic()
        self.direct[mid] = ep
        self.due[ep] = self.due.get(ep, 0) + 1

    def _direct_pop(self, mid):
        ep = self.direct.pop(mid, None)
        if ep is not None:
            self.due[ep] -= 1
            if not self.due[ep]:
                del self.due[ep]

    def _direct_lost(self, ep, why):
        """Our connection to the agent at ep broke (or went silent): the
        direct tasks on it fail, each part with an EngineError naming its
        node."""
        for mid, e in list(self.direct.items()):
            if e != ep:
                continue
            self._direct_pop(mid)
            ar = self.pending.get(mid)
            if ar is None:
                continue
            for t in ar._mids.get(mid, ()):
                if t not in ar._results:
                    self.parts -= 1
                    ar._fail(t, EngineError(f"engine {t} was lost with its node {self.registry._node_words(t)}: "
                                            f"{why}", t))
            self.pending.pop(mid, None)
            if ar._zmq_done():
                for m in ar._mids:
                    self.pending.pop(m, None)
                    self._direct_pop(m)

    def _direct_reply(self, ep, meta, block, total):
        """A reply (or output) of an engine to a direct task, taken from
        the connection to ep."""
        try:
            mid, engine, kind = int(meta["task"]), int(meta["engine"]), int(meta["type"])
            payload, buffers = _core.unpack_frames(memoryview(block)[:total])
        except (KeyError, TypeError, ValueError):
            return  # not one of ours to read: the agent's parse checks are the same
        ar = self.pending.get(mid)
        if ar is None or self.direct.get(mid) != ep:
            return
        hdr = {"type": kind, "reply_to": mid, "sender": engine, "task_id": mid, "flags": 0}
        if kind == _core.MSG_OUTPUT:
            ar._output(hdr, payload)
        elif kind == _core.MSG_RESULT and engine not in ar._results and engine in ar._mids.get(mid, ()):
            self.parts -= 1
            ar._add(hdr, payload, buffers)
            if ar._zmq_done():
                for m in ar._mids:
                    self.pending.pop(m, None)
                    self._direct_pop(m)

    def _wait_direct(self, timeout):
        """Waits up to timeout seconds for what the agents of our direct
        tasks send, and takes it; True if anything came."""
        for mid in [m for m in self.direct if m not in self.pending]:
            self._direct_pop(mid)  # ended otherwise (failed with the controller, say)
        if not self.direct:
            return False
        broken = self.bulk.wait_direct(list(self.due), timeout, self.registry.arena)
        for ep, why in broken:
            self._direct_lost(ep, why)
        got = bool(broken or self.bulk.replies)
        while self.bulk.replies:
            self._direct_reply(*self.bulk.replies.pop(0))
        return got

    def _sent(self, ar, mid, group, meta, s, obj):
        """Notes task message mid (for group) as sent for ar."""
        ar._own("_mids")[mid] = group
        self.pending[mid] = ar
        if s.files:
            # An engine that finds a memmap's file is not the same file
            # there (another machine, a private /tmp) gets its bytes
            # instead (_resend_by_value): what to send is kept till then.
            ar._own("_by_value")[mid] = (meta, obj)
        self.parts += len(group)
        if ar.msg_id is None:
            ar.msg_id = mid

    def busy(self):
        """Whether replies are due from the controller (task results, or answers to questions)."""
        return bool(self.pending or self.waits)

    def held(self):
        return self.parts

    def outstanding(self):
        return list(self.pending.values())

    def queued(self):
        for mid, ar in self.pending.items():
            for e in ar._mids.get(mid, ()):
                if e not in ar._results:
                    yield e, ar

    def direct_queued(self):
        """(engine id, AsyncResult) of each part of a direct task not yet answered."""
        for mid in self.direct:
            ar = self.pending.get(mid)
            for e in ar._mids.get(mid, ()) if ar is not None else ():
                if e not in ar._results:
                    yield e, ar

    def abort(self, ar, timeout, receive):
        """Asks the controller to abort ar's messages (the agents mark
        them), waiting for its answer as control() does: an engine that has
        not started one answers TaskAborted instead. A controller that is
        gone or refuses is warned of (at the caller of Client.abort)."""
        if ar._mids and not ar._zmq_done():
            for mid in ar._mids:
                if mid in self.direct:
                    self.bulk.send_abort(self.direct[mid], mid)
            mids = [m for m in ar._mids if m not in self.direct]
            if not mids:
                return False
            try:
                self.control(_core.MSG_ABORT, {"msg_ids": mids}, timeout, receive)
            except (TimeoutError, RuntimeError) as e:  # the controller is gone or refuses: the task runs
                warnings.warn(f"task {ar.msg_id} could not be aborted through the controller: {e}", stacklevel=4)
        return False

    def close(self):
        self.pending.clear()
        self.direct.clear()
        self.due.clear()
        self.parts = 0
        self.bulk.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._close_pidfd()
        self.pidfd = None

    # ---- receiving -----------------------------------------------------------------

    def poll(self):
        return self.wait(0)

    def wait(self, timeout, want=1):
        """Receives one message from the controller within timeout seconds."""
        with self.lock:
            wait = min(max(timeout, 0), 0.005)
            got = False
            if self.direct:
                # Direct tasks' replies come on our bulk connections: waited
                # for there, and the socket looked at after (without waiting,
                # unless tasks through the controller are due too).
                alone = len(self.direct) >= len(self.pending) and not self.waits
                got = self._wait_direct(wait if alone else min(wait, 0.001))
                wait = 0
                if got and alone:
                    return True
            try:
                # In short slices, so that another thread waits for the lock
                # (to submit, or to receive for itself) 5 ms at most.
                hdr, payload, buffers, _ = self.sock.recv(timeout=wait)
            except builtins.TimeoutError:
                self._watch()
                return got
            except _core.WireError:
                return True  # counted by the socket; nothing we can use
            except ConnectionRefusedError as e:  # it refused our Curve keys: nothing will come
                self.refused = True
                self.gone(str(e))
                return True
            self.last_heard = time.monotonic()
            if hdr["type"] == _core.MSG_ERROR and hdr["reply_to"] in self.pending:
                # The controller refused a task outright: every target of that message fails.
                ar = self.pending.pop(hdr["reply_to"])
                self.parts -= len(ar._mids.get(hdr["reply_to"], ()))
                text = json.loads(bytes(payload[0])).get("error", "refused") if payload else "refused"
                ar._refused(ar._mids.get(hdr["reply_to"], ()), text)
            elif hdr["type"] == _core.MSG_RESULT:
                ar = self.pending.get(hdr["reply_to"])
                if hdr["flags"] & _core.RESULT_BULK:
                    payload, buffers = self._bulk_result(hdr, payload)
                    if payload is None:  # its connection broke: the part fails, saying so
                        if ar is not None and hdr["sender"] not in ar._results:
                            self.parts -= 1
                            ar._fail(hdr["sender"], buffers)
                            if ar._zmq_done():
                                for mid in ar._mids:
                                    self.pending.pop(mid, None)
                        return True
                # A part that has ended already (failed when its node was
                # lost, which then came back) ends once: its late result is dropped.
                if ar is not None and hdr["sender"] not in ar._results and \
                        not (ar._by_value and self._resend_by_value(ar, hdr, payload)):
                    self.parts -= 1
                    ar._add(hdr, payload, buffers)
                    if ar._zmq_done():
                        for mid in ar._mids:
                            self.pending.pop(mid, None)
            elif hdr["type"] == _core.MSG_HEARTBEAT_ACK:
                pass  # the answer to _watch's question: that it came is the point
            elif hdr["type"] == _core.MSG_OUTPUT:
                ar = self.pending.get(hdr["reply_to"])
                if ar is not None:
                    ar._output(hdr, payload)
            else:
                self.replies[hdr["reply_to"]] = (hdr, payload)
            return True

    def _bulk_result(self, hdr, payload):
        """A RESULT flagged RESULT_BULK: its reply block comes on our bulk
        connection to the engine's node. Receives it (it must be taken even
        when nobody waits for it: the agent's next results come behind it)
        and returns its (payload, buffers) frames; or (None, EngineError)
        when it cannot come. Called with the lock held."""
        engine = hdr["sender"]
        if len(payload) != 1 or len(payload[0]) != 16:
            return None, EngineError(f"engine {engine}'s result came flagged as on the bulk channel, without its "
                                     f"16-byte info frame", engine, hdr["task_id"])
        tid, total = struct.unpack("<QQ", payload[0])
        ep = self.registry._bulk_endpoint(engine)
        try:
            if ep is None:
                raise ConnectionError("its node has no bulk server in the registry")
            block = self.bulk.receive(ep, tid, total, self.registry.arena)
            return _core.unpack_frames(memoryview(block)[:total])
        except (ConnectionError, ValueError) as e:
            return None, EngineError(f"engine {engine}'s result of task {hdr['task_id']} ({total} bytes) was to "
                                     f"come over the bulk channel, and cannot: {e}", engine, hdr["task_id"])

    def _resend_by_value(self, ar, hdr, payload):
        """If this reply says that a memmap's file is not the same file on
        the engine's machine, sends the task again to that engine with the
        memmaps' bytes in place of their files, and returns True (the reply
        is not the task's result). Called with the lock held."""
        kept = ar._by_value.get(hdr["reply_to"])
        if kept is None or not payload:
            return False
        reply = json.loads(bytes(payload[0]))
        # Only a task whose arguments could not be rebuilt there, before it
        # ran (not a FileNotSame of the user's code, not a file that shrank).
        if reply.get("status") != "error" or not reply.get("resend_by_value"):
            return False
        meta, obj = kept
        engine = hdr["sender"]
        # For an engine of our node, in our arena (a shared array stays
        # shared); for another node's, as frames.
        arena = self.registry._arena_for(engine)
        try:
            s = serialize.dumps(obj, arena=arena, memmaps="value",
                                memmaps_why=reply.get("evalue", "not the same file there"))
            self.check_limits(s, [engine])
        except Exception:
            return False  # the engine's FileNotSame stands as the part's result, and says why
        ar._keep.extend(s.keep)
        frames = [struct.pack("<I", engine), json.dumps(request(meta, s)).encode(), s.payload]
        mid = self.sock.send(_core.MSG_TASK, frames, s.frames)
        old = hdr["reply_to"]
        rest = [t for t in ar._mids[old] if t != engine]
        ar._mids[mid] = [engine]
        if rest:
            ar._mids[old] = rest  # what that message still has to answer
        else:
            del ar._mids[old]
            ar._by_value.pop(old, None)
            self.pending.pop(old, None)
        self.pending[mid] = ar
        return True
