"""The client: shoal.Client, with ipyparallel's names (views are in view.py,
AsyncResult in asyncresult.py).

A Client talks to the controller over one signed ZeroMQ socket. Results are
received in the calling thread while it waits for them (get, wait, ready),
so a round trip costs no hand-off between threads. On a node that runs an
agent, the client attaches to the node's arena: large buffers it sends are
written there once, whatever the number of engines, and engines view them
without copying. Tasks for the engines of that node take a lane each (see
docs/engine.md): a pair of rings in the arena straight to the engine, with
no socket and no other process on the way, and results come back as
zero-copy views of the blocks the engine wrote.
"""

import builtins
import collections
import concurrent.futures
import collections.abc
import itertools
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref

import numpy as np

from . import _core, serialize
from ._msgblock import (ABORTED, KIND_OUTPUT, KIND_POOL, KIND_RELEASE, KIND_RESULT, KIND_TASK, LANE_ENGINE_STOPPED,
                        POOL_SLOTS, SLOT, Lane, pack_frames, unpack_frames)
from ._records import History, ending, ending_of
from .asyncresult import AsyncResult
from .error import EngineError, TaskAborted, TimeoutError
from .local import LocalArena
from .view import DirectView, LoadBalancedView

# How long a client waiting on its lanes spins before it sleeps (seconds):
# a no-op task's round trip through a lane takes well under this.
LANE_SPIN = 300e-6
_CORES = os.cpu_count() or 1
# Tasks on lanes and in pools a client has outstanding at most. Each holds
# its message block, and so an entry of the client's reference table in the
# arena, which has room for 16384 (docs/arena.md); a submission past this
# first takes results as they come in, until there is room. Without it, a
# client that submits 100,000 tasks at once would find the table full, and
# fail results it could not read.
MAX_LANE_TASKS = 4096
# Task parts (one per target engine) a client has in flight through the
# controller at most. A submission past this first takes results as they
# come in, until there is room: the client reads while it submits, and the
# controller's queue for it stays small (docs/controller.md, "Flow
# control"). Without it, a client that submits 100,000 tasks before it
# reads would have the controller hold every result for it.
CONTROLLER_WINDOW = 2048
# A reply block larger than this (bytes) is released at once, waking its
# engine if it sleeps; a smaller one (without arena buffers), of a task for
# more engines than cores, waits for the engine's next task. Either way the
# engine lets go of it before it exits.
RELEASE_WAKE_BYTES = 64 << 10
# How old (seconds) the client's copy of the registry may be when
# Client.ids is read: engines that stop leave ids, and engines that join
# enter it, within this (ipyparallel's client hears of them by notification).
REGISTRY_TTL = 0.5
# Pools a client keeps at once (one per set of engines a load-balanced view
# spans; usually one).
MAX_POOLS = 8


class _Pool:
    """A node-local queue of this client's load-balanced tasks, which
    whichever of its engines is idle takes (docs/engine.md, "Pools").

    A pool ring in an arena block of ours; each member engine got its handle
    on its lane and replies on that lane. The ring records who took each
    task, so when an engine dies the client knows which tasks went with it.
    """

    def __init__(self, arena, lanes):
        self.block = arena.alloc(_core.Ring.size(POOL_SLOTS))
        self.ring = _core.Ring(self.block, POOL_SLOTS, pool=True)
        self.lanes = dict(lanes)  # engine id -> Lane, of the engines that take from it
        self.tasks = {}  # task id -> position in the ring, until answered
        self.turn = 0  # which member to try waking first

    def wake(self, n):
        """Wakes up to n sleeping members (engines awake look before they sleep)."""
        lanes = list(self.lanes.values())
        woken = 0
        for k in range(len(lanes)):
            if woken >= n:
                break
            woken += lanes[(self.turn + k) % len(lanes)].sq.wake()
        self.turn += 1


def _request(meta, s):
    """The JSON header of a task whose arguments s (a Serialized) holds."""
    m = dict(meta, buffers=s.buffers)
    if s.notes:
        m["notes"] = s.notes  # the engine puts them in its reply's metadata
    return m


def _blank_metadata():
    """What Client.metadata gives for a msg_id it does not hold, as
    ipyparallel's does."""
    return {key: None for key in ("msg_id", "engine_id", "submitted", "started", "completed", "received",
                                  "status", "execution_count", "execute_result")} | \
        {"stdout": "", "stderr": "", "outputs": []}


def _signal_number(sig):
    """sig as a signal number: a number, or a name ("SIGINT", "INT")."""
    import signal
    if isinstance(sig, str):
        name = sig.upper()
        if sig.isdigit():
            return _signal_number(int(sig))
        num = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
        if not isinstance(num, int) or name.startswith("SIG_"):
            raise ValueError(f"no signal named {sig!r}")
        return int(num)
    if isinstance(sig, int) and not isinstance(sig, bool) and 0 <= sig <= 64:
        return int(sig)
    raise ValueError(f"not a signal: {sig!r}")


def _profile_dir(profile):
    """Where profile `profile` lives: $SHOAL_DIR (else ~/.shoal)/profile_<profile>."""
    root = os.environ.get("SHOAL_DIR") or os.path.join(os.path.expanduser("~"), ".shoal")
    return os.path.join(root, f"profile_{profile}")


def _readable(fd):
    """Whether fd is readable now (a pidfd: its process has ended); poll,
    not select, which refuses fds past 1023."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _alive(pid):
    """Whether process pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _connection_file(profile, url_file):
    return url_file or os.path.join(_profile_dir(profile), "connection.json")


class Client:
    """Connects to the cluster of `profile` (or the connection file `url_file`).

    ``timeout`` bounds the wait for the controller's first answer.
    ``lanes=False`` sends every task through the controller, even to the
    engines of this node.

    ``history_limit`` (default ``Client.HISTORY_LIMIT``, 100,000; None: no
    limit, as in ipyparallel):
    how many of the latest tasks ``history`` (the client's and each
    view's) lists, and how many finished tasks the client remembers the
    ending of (for ``after``/``follow`` dependencies by msg_id,
    ``queue_status(verbose=True)``'s ``completed``, ``purge_results(targets=)``).
    **Differs** from ipyparallel, whose client keeps every one until
    purged: a million tasks would otherwise hold hundreds of megabytes.
    A task that finished longer ago than that is still known while its
    AsyncResult is held; once it is let go too, a dependency on it is an
    InvalidDependency, as a purged one is (never taken as met).
    """

    HISTORY_LIMIT = 100_000  # history_limit of a new client

    def __new__(cls, *args, **kwargs):
        # Defined so that patching Client.__new__ (as ipyparallel's tests
        # do with mock) and restoring it leaves a Client that still takes
        # arguments.
        return super().__new__(cls)

    def __init__(self, url_file=None, profile="default", timeout=10, lanes=True):
        path = _connection_file(profile, url_file)
        try:
            with open(path) as f:
                info = json.load(f)
        except FileNotFoundError:
            raise OSError(f"no connection file at {path}: is a cluster running for profile '{profile}'? "
                          f"Start one with `shoal start`.") from None
        self._key = bytes.fromhex(info["key"])
        self._ctl_pid, self._ctl_pidfd = self._watch_controller_process(info, path, profile)
        # Closed by close(), or when a client that was never closed is collected.
        self._close_pidfd = weakref.finalize(self, os.close, self._ctl_pidfd) if self._ctl_pidfd is not None \
            else (lambda: None)
        self._ctl_dead = None  # why the controller is known to be gone (see _controller_gone)
        self._last_heard = time.monotonic()  # when the controller last said anything
        self._asked_at = 0.0  # when we first asked a silent controller (HEARTBEAT), not answered since
        self._probe_at = 0.0  # when we last asked it
        # How long a controller may be silent, asked, before its tasks fail
        # (its own node timeout: the agents give it up then, too).
        self._ctl_timeout = (info.get("node_timeout_ms") or 30000) / 1000 + 2
        self._sock = _core.Socket("dealer", self._key, connect=info["client"])
        # What the controller accepts at most (docs/protocol.md, "Limits"):
        # a task past it is refused here, with a clear error, not sent.
        self._max_frame = info.get("max_frame") or 1 << 62
        self._max_payload = info.get("max_payload") or 1 << 62
        self._lock = threading.RLock()
        self._pending = {}  # msg_id -> AsyncResult
        self._ctl_parts = 0  # task parts in flight through the controller (CONTROLLER_WINDOW)
        self._replies = {}  # msg_id -> (header, payload) of control replies
        self.timeout = timeout
        self.local = None
        self._local_node = None
        self._use_lanes = lanes
        self._lanes = {}  # engine id -> Lane, or None where there is none
        self._lane_tasks = {}  # lane task id -> (AsyncResult, engines yet to answer)
        self._pools = {}  # frozenset of engine ids -> _Pool
        self._pool_tasks = {}  # pool task id -> (AsyncResult, _Pool)
        # Ids of lane tasks and load-balanced tasks: apart from the socket's msg_ids (1, 2, ...).
        self._lane_ids = itertools.count(1 << 40)
        self._bell = None  # the doorbell all our lanes' completion rings ring
        self._control_waits = 0  # threads waiting for a controller reply
        self._due = []  # AsyncResults finished whose callbacks are still to run
        self._lb_load = {}  # engine id -> load-balanced tasks of ours it has
        self._driven = []  # load-balanced maps with tasks still to hand out
        self._driver = None  # the thread that hands them out while nobody waits
        self._driver_lock = threading.Lock()  # guards _driver alone; taken under _lock, never the reverse
        self._wanted = collections.deque()  # results a Future's waiter waits for, for the driver to take
        # Threads other than the driver inside _receive: while there are
        # any, they receive (and so hand out) for everybody, and the driver
        # keeps out of their way (see _drive_loop).
        self._waiters = 0
        self._waiters_left = threading.Condition(threading.Lock())
        self._history_limit = self.HISTORY_LIMIT
        self.history = History(self._history_limit)  # msg_ids of the tasks sent, in order (the latest)
        # As ipyparallel 9's: a task's AsyncResult holds its results and
        # metadata; the client's dicts hold only what was put there.
        self.results = {}
        self.metadata = collections.defaultdict(_blank_metadata)
        self._completed = collections.Counter()  # engine id -> tasks of ours it finished
        # msg_id -> AsyncResult, while the user keeps it: a result whose
        # AsyncResult is gone is not kept (its arrays would pin the arena).
        self._by_id = weakref.WeakValueDictionary()
        # msg_id -> how each finished task ended (ending), for dependencies:
        # the latest history_limit of them, in the order they finished.
        self._ended = {}
        self._last_submit = 0.0
        self._receiving = 0  # depth of _receive calls in this thread's stack (callbacks run inside)
        self._leaving = set()  # engines this client stopped, until the registry no longer has them
        self._lost_engines = set()  # engines of a node whose agent died under us (_check_agent)
        try:
            registry = self._control(_core.MSG_REGISTER, timeout=timeout)
        except BaseException:
            self._sock.close()
            self._sock = None
            self._close_pidfd()
            raise
        self._registry(registry["engines"])
        host = socket.gethostname()
        for node in registry["nodes"]:
            if node["alive"] and node["host"] == host and node.get("socket") and os.path.exists(node["socket"]):
                try:
                    self.local = LocalArena(node["socket"], timeout=min(timeout, 5))
                    self._local_node = node["id"]
                except ConnectionError as e:  # the controller's path still works: go on without lanes
                    self.local = None
                    warnings.warn(f"{e}; this client goes without the node's arena and lanes (tasks go "
                                  f"through the controller)", RuntimeWarning, stacklevel=2)
                break
        self._auto_activate()

    @staticmethod
    def _watch_controller_process(info, path, profile):
        """(pid, pidfd) of the controller when it runs on this machine
        (a loopback address), so that its death is seen at once; (pid,
        None) otherwise, or where pidfds are missing. Raises OSError for a
        connection file whose local controller no longer runs."""
        pid, ip = info.get("pid"), info.get("ip", "")
        if not isinstance(pid, int) or pid <= 0 or not ip.startswith("127."):
            return pid, None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        except OSError:
            return pid, None  # no pidfds here: the heartbeat watch still works
        if fd is None or not _alive(pid):
            if fd is not None:
                os.close(fd)
            raise OSError(f"the controller of profile '{profile}' (pid {pid}) is not running: its connection file "
                          f"{path} is stale (left by a controller that was killed?). Start a cluster with "
                          f"`shoal start`, or remove the file.")
        return pid, fd

    def _controller_gone(self, why):
        """The controller is gone (its process died, or it has not answered
        for _ctl_timeout): every task through it fails with an EngineError
        that says so, and so does every later one. Lanes go on."""
        if self._ctl_dead is not None:
            return
        self._ctl_dead = why
        for mid, ar in list(self._pending.items()):
            for e in ar._mids.get(mid, ()):
                if e not in ar._results:
                    ar._fail(e, EngineError(f"engine {e}'s result cannot come: {why}", e))
        self._pending.clear()
        self._ctl_parts = 0

    def _watch_controller(self):
        """While controller replies are due: has the controller died (its
        pidfd), or been silent too long? Asks a silent one (HEARTBEAT)."""
        if self._ctl_dead is not None or not (self._pending or self._control_waits):
            return
        if self._ctl_pidfd is not None and _readable(self._ctl_pidfd):
            self._controller_gone(f"the controller (pid {self._ctl_pid}) died")
            return
        # Silence alone says nothing (a long task, a client that did not
        # wait): a controller is taken for gone only when it has left a
        # question unanswered for _ctl_timeout.
        now = time.monotonic()
        if self._last_heard >= self._asked_at:  # nothing asked since it last spoke
            if now - self._last_heard > 2:
                self._asked_at = self._probe_at = now
                self._sock.send(_core.MSG_HEARTBEAT, [])
        elif now - self._asked_at > self._ctl_timeout:
            self._controller_gone(f"the controller did not answer for {now - self._asked_at:.0f} s (asked)")
        elif now - self._probe_at > 1:
            self._probe_at = now
            self._sock.send(_core.MSG_HEARTBEAT, [])

    def _auto_activate(self):
        """Inside IPython, a client registers %px for all its engines, as
        ipyparallel's does, unless some client already did."""
        ip = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
        if ip is not None and "px" not in ip.magics_manager.magics["line"]:
            self.activate()

    # ---- the registry ----------------------------------------------------------

    @property
    def ids(self):
        """The ids of the live engines, as the controller knows them: read
        again if the copy here is older than REGISTRY_TTL, or while an
        engine this client stopped has yet to leave. Not from inside a
        callback (which the receiving runs): the copy is used there."""
        if (self._leaving or time.monotonic() - self._registry_at > REGISTRY_TTL) \
                and not self._receiving and self._sock is not None:
            try:
                self.refresh()
            except (TimeoutError, ConnectionError):
                pass  # the controller does not answer, or is gone: what we knew (lanes still work)
        return list(self._alive)  # a copy: the caller's to change

    def _live_ids(self):
        return list(self._alive)

    def _registry(self, engines):
        """Takes the controller's list of engines."""
        self._engines = engines
        self._alive = [e["id"] for e in engines if e["alive"] and e["id"] not in self._lost_engines]
        self._registry_at = time.monotonic()
        self._leaving &= set(self._alive)

    def refresh(self):
        """Reads the registry (engines, nodes) from the controller again."""
        self._registry(self._control(_core.MSG_REGISTER)["engines"])
        with self._lock:  # engines that had no lane may have one now (a new engine of this node)
            self._lanes = {e: lane for e, lane in self._lanes.items() if lane is not None}

    def __len__(self):
        return len(self.ids)

    def _engine_ids(self, key):
        """Engine ids for key, as ipyparallel reads targets: an id (a
        negative one counts from the end of ids, as in Python), a slice of
        ids, or a list of ids. Raises IndexError naming what is missing."""
        ids = self.ids
        if isinstance(key, int) and not isinstance(key, bool):
            if key < 0:
                if -key > len(ids):
                    raise IndexError(f"no engine {key}: there are {len(ids)} engines ({ids})")
                return ids[key]
            if key not in ids:
                raise IndexError(f"no engine {key} (engines: {ids})")
            return key
        if isinstance(key, slice):
            return ids[key]
        if isinstance(key, (list, tuple, range)):
            missing = [k for k in key if k not in ids]
            if missing:
                raise IndexError(f"no engines {missing} (engines: {ids})")
            return list(key)
        raise TypeError(f"engines are chosen by int, slice or list, not {type(key).__name__}")

    def __getitem__(self, key):
        return self.direct_view(self._engine_ids(key))

    def direct_view(self, targets="all"):
        """A DirectView of targets; "all" (the default) is every engine at
        the time of each call, engines that join included, as in ipyparallel."""
        return DirectView(self, "all" if targets in ("all", None) else self._engine_ids(targets))

    def activate(self, targets="all", suffix=""):
        """Registers the %px magics for a blocking view of targets in the
        running IPython; returns the view."""
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    def use_pickle(self):
        """DirectView.use_pickle on every engine (see shoal.serialize)."""
        return self.direct_view().use_pickle()

    def use_cloudpickle(self):
        """DirectView.use_cloudpickle on every engine (see shoal.serialize)."""
        return self.direct_view().use_cloudpickle()

    def use_dill(self):
        """DirectView.use_dill on every engine (see shoal.serialize)."""
        return self.direct_view().use_dill()

    def load_balanced_view(self, targets=None):
        """A LoadBalancedView over targets (None: every engine, as they come and go)."""
        if targets in (None, "all"):
            return LoadBalancedView(self, None)
        ids = self._engine_ids(targets)
        return LoadBalancedView(self, [ids] if isinstance(ids, int) else ids)  # a list, as ipyparallel's

    def _drive(self, work, thread=True):
        """Hands out work's tasks from a thread of ours until none is left, so
        that a load-balanced map goes on while nobody waits for it.
        thread=False: only registers it (its caller waits, and so hands
        them out; close() and abort() still reach it)."""
        with self._lock:
            if work not in self._driven:
                self._driven.append(work)
            if thread:
                self._start_driver()

    def _want(self, ar):
        """A Future's waiter or callback waits for ar: the client's thread
        receives while it is pending. Takes no lock but the driver's: the
        caller may hold ar's condition (concurrent.futures.wait does),
        which whoever completes ar takes under the client's lock."""
        ar._wanted = True
        self._wanted.append(ar)  # a deque: safe without the lock; the driver moves it to _driven
        self._start_driver()

    def _start_driver(self):
        with self._driver_lock:
            if self._driver is None:
                self._driver = threading.Thread(target=self._drive_loop, name="shoal-load-balancer", daemon=True)
                self._driver.start()

    def _drive_loop(self):
        """While another thread waits for results, it receives, and so
        hands out the maps' tasks (from the callbacks of those that
        finish): the driver then only ticks every 5 ms, and does not take
        the lock from the waiter (a waiter kept from the lock is a map's
        tasks left unanswered meanwhile)."""
        try:
            while True:
                with self._lock:
                    while self._wanted:
                        w = self._wanted.popleft()
                        if w not in self._driven:
                            self._driven.append(w)
                    # A map cut short keeps being driven while it has tasks out
                    # (its _tick takes what their lost callbacks did not);
                    # a result a Future's waiter waits for, while it is pending.
                    self._driven = [w for w in self._driven if w._has_work() or getattr(w, "_attempts", None)
                                    or (w._wanted and not w._done())]
                    if not self._driven or self._sock is None:
                        with self._driver_lock:
                            if self._wanted and self._sock is not None:
                                continue  # wanted since we looked
                            # Under the same hold of the driver's lock as the
                            # decision: a _drive() or _want() after it starts a new thread.
                            self._driver = None
                        return
                    for w in list(self._driven):
                        if hasattr(w, "_tick"):
                            w._tick()  # a task waiting for its dependencies, or its timeout
                    if not self._waiters:
                        self._receive(0.005)
                        continue
                with self._waiters_left:
                    if self._waiters:
                        self._waiters_left.wait(0.005)
        except BaseException:
            with self._driver_lock:
                self._driver = None  # so that the next _drive() starts another
            raise

    @property
    def arena(self):
        return self.local.arena if self.local else None

    # ---- talking to the controller ---------------------------------------------

    def _control(self, kind, body=None, timeout=None):
        if self._ctl_dead is not None:
            raise ConnectionError(f"{self._ctl_dead}: start the cluster again (`shoal start`) and make a new Client")
        with self._lock:
            mid = self._sock.send(kind, [json.dumps(body).encode()] if body is not None else [])
            self._control_waits += 1
        try:
            deadline = time.monotonic() + (timeout or self.timeout)
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._ctl_dead is not None:
                    raise ConnectionError(f"{self._ctl_dead}: start the cluster again (`shoal start`) and make a "
                                          f"new Client")
                if left <= 0:
                    raise TimeoutError(f"the controller did not answer within {timeout or self.timeout:g} s")
                self._receive(left)
        finally:
            with self._lock:
                self._control_waits -= 1
        hdr, payload = self._replies.pop(mid)
        body = json.loads(bytes(payload[0])) if payload else {}
        if hdr["type"] == _core.MSG_ERROR:
            raise RuntimeError(f"the controller refused: {body.get('error')}")
        return body

    def queue_status(self, targets="all", verbose=False):
        """Each engine's queue, as ipyparallel gives it: {engine id:
        {"queue": its direct tasks not finished, "tasks": its load-balanced
        tasks not finished, "completed": tasks it finished}, "unassigned":
        load-balanced tasks no engine has taken}; for an int target, that
        engine's dict. verbose: lists of msg_ids in place of the counts.

        **Differs:** tasks on lanes and in pools reach no other process
        than the engine, so they, "tasks" and "completed" are this client's
        own; "queue" counts every client's tasks through the controller
        (verbose lists this client's)."""
        status = self._control(_core.MSG_QUERY, {"what": "status"})
        queue, tasks = collections.defaultdict(list), collections.defaultdict(list)
        unassigned = []
        with self._lock:
            self._drain_lanes()
            through = collections.Counter()  # engine id -> our tasks on it through the controller
            for mid, ar in self._pending.items():
                for e in ar._mids.get(mid, ()):
                    if e not in ar._results:
                        queue[e].append(ar.msg_id)
                        through[e] += 1
            for ar, engines in self._lane_tasks.values():
                for e in engines:
                    queue[e].append(ar.msg_id)
            for task_id, (ar, pool) in self._pool_tasks.items():
                owner = pool.ring.owner(pool.tasks[task_id])
                (tasks[owner] if owner >= 0 else unassigned).append(ar.msg_id)
            done = dict(self._completed)
            if verbose:  # the tasks whose ending it remembers (history_limit)
                endings = [(m, ending_of(v)[1]) for m, v in self._ended.items()]
                done = {e: [m for m, engines in endings if e in engines] for e in done}
        out = {}
        for e in self._live_ids():
            if verbose:
                out[e] = {"queue": queue[e], "tasks": tasks[e], "completed": done.get(e, [])}
            else:
                # The controller counts every client's tasks through it, ours
                # (through[e] of queue[e]) among them; our lane tasks it never sees.
                counted = status["queue"][e] if e < len(status["queue"]) else 0
                out[e] = {"queue": max(counted, through[e]) + len(queue[e]) - through[e], "tasks": len(tasks[e]),
                          "completed": done.get(e, 0)}
        out["unassigned"] = unassigned if verbose else len(unassigned)
        if isinstance(targets, int) and not isinstance(targets, bool):
            return out[self._engine_ids(targets)]
        if targets not in ("all", None):
            keep = set(self._engine_ids(targets))
            out = {k: v for k, v in out.items() if k == "unassigned" or k in keep}
        return out

    def cluster_status(self):
        """shoal's own view of the cluster (`shoal status` prints it): the
        controller's registry (``nodes``, ``engines``) and queues
        (``queue[e]``: unanswered tasks of engine e), with this client's
        lane and pool tasks added; ``tasks_pending`` unfinished tasks, of
        which ``lane_tasks_pending`` on lanes and in pools, ``unassigned``
        load-balanced tasks no engine has taken.

        The controller never sees lane tasks, so the figures for them are
        this client's own: other clients' lane tasks are not counted."""
        status = self._control(_core.MSG_QUERY, {"what": "status"})
        with self._lock:
            self._drain_lanes()
            for eid, lane in self._lanes.items():
                if lane is not None and eid < len(status["queue"]):
                    status["queue"][eid] += len(lane.pending)
            # A pool task is queued on the engine that took it, else unassigned.
            unassigned = 0
            for pool in self._pools.values():
                for pos in pool.tasks.values():
                    owner = pool.ring.owner(pos)
                    if 0 <= owner < len(status["queue"]):
                        status["queue"][owner] += 1
                    elif owner == _core.POOL_WAITING:
                        unassigned += 1
            status["unassigned"] = status.get("unassigned", 0) + unassigned
            mine = len(self._lane_tasks) + len(self._pool_tasks)
            status["lane_tasks_pending"] = mine
            status["tasks_pending"] += mine
        return status

    # ---- lanes: tasks straight to the engines of this node ------------------------

    def _lane(self, eid):
        """The lane to engine eid, or None if it is not on this node (or has none)."""
        if eid in self._lanes:
            return self._lanes[eid]
        lane = None
        engine = next((e for e in self._engines if e["id"] == eid), None)
        if self._use_lanes and self.local is not None and engine is not None and engine["alive"] \
                and engine["node"] == self._local_node:
            try:
                reply = self.local.ask({"lane": eid})
                if "block" in reply and reply.get("lane") == eid:
                    lane = Lane(self.arena, reply["block"])
                    if lane.engine_id != eid:  # not the engine asked for: take no chances
                        raise ValueError(f"the agent gave engine {lane.engine_id}'s lane for engine {eid}")
                    lane.pending = set()  # our task ids the engine has yet to answer
                    lane.backlog = []  # slots waiting for room in its task ring
                    lane.inbox = []  # slots popped from its completion ring, not taken yet (see _drain_lanes)
                    if self._bell is None:
                        self._bell = _core.Doorbell(lane.client_bell)
            except (OSError, ValueError):
                lane = None  # the controller's path still works
        self._lanes[eid] = lane
        return lane

    def _lane_send(self, eid, lane, slot, wake=True):
        """Queues a slot for the engine: into its ring, or behind what waits.
        wake=False leaves waking the engine to the caller (lane.sq.wake())."""
        try:
            if lane.backlog or lane.sq.push(slot, wake) == 0:
                lane.backlog.append(slot)
        except BrokenPipeError:
            pass  # the engine is gone: its completion ring says so too

    def _lane_flush(self, lane):
        while lane.backlog:
            try:
                n = lane.sq.push(b"".join(lane.backlog[:64]))
            except BrokenPipeError:
                lane.backlog.clear()
                return
            if n == 0:
                return
            del lane.backlog[:n]

    def _drain_lanes(self):
        """Takes what the engines put on our lanes; True if anything came.

        A Ctrl-C can land anywhere in here. Slots are popped into the
        lane's inbox in C (pop_into), so none is lost on the way; each is
        taken off the inbox in one step, inside the try of its handling
        (_lane_slot), so none is handled twice (a RELEASE sent twice would
        free a block twice), and a reply whose handling was cut short fails
        its task, so that nothing waits for it for ever. What is still in
        the inbox is taken at the next receiving."""
        got = False
        for eid, lane in list(self._lanes.items()):
            if lane is None:
                continue
            self._lane_flush(lane)
            inbox = lane.inbox
            while True:
                if not inbox:
                    try:
                        if not lane.cq.pop_into(inbox, 64):
                            break
                    except OSError:  # closed (the engine is gone) or broken
                        self._lane_gone(eid, lane)
                        got = True
                        break
                got = True
                while inbox:
                    if inbox[0]:
                        self._lane_slot(eid, lane, inbox)
                    else:
                        del inbox[0]
            self._lane_flush(lane)
        return got

    def _lane_slot(self, eid, lane, inbox):
        """Takes the first slot of inbox[0] (see _drain_lanes) and handles it."""
        slots = inbox[0]
        task_id, kind, _, off, length, gen, _ = SLOT.unpack_from(slots)
        ar = (self._lane_tasks.get(task_id) or self._pool_tasks.get(task_id) or (None,))[0]
        hdr = {"sender": eid, "task_id": task_id}
        if kind == KIND_RESULT and task_id in self._pool_tasks:
            ar._targets = [eid]  # a pool task ran where it was taken
        if kind == KIND_RESULT:
            # A RELEASE wakes the engine if it sleeps. That is what a reply
            # with arena buffers needs (they are freed when dropped here), and
            # what one engine or two want: woken now, off the critical path,
            # the engine spins for our next task instead of sleeping through
            # it (a round trip: 61 us; 86 without). A task for more engines
            # than cores leaves a small reply's RELEASE for the engine's next
            # task: waking them all again cost a context switch per engine
            # (a push to 8 engines on 2 cores: 16 wake-ups instead of 8).
            wake = True
            try:
                inbox[0] = slots[SLOT.size:]  # taken, in one store: whatever comes next, handled once
                # Our own reference: the values may be views of this block.
                block = self.arena.acquire_bytes((off, length, gen), 0, length)
                payload, buffers = unpack_frames(block)
                if ar is not None:
                    wake = ar._add(hdr, payload, buffers) or length > RELEASE_WAKE_BYTES \
                        or len(ar._targets) <= _CORES
            except (OSError, ValueError) as e:
                if ar is not None:
                    ar._fail(eid, EngineError(f"engine {eid} sent a reply to task {task_id} that could not be "
                                              f"read: {e}", eid, task_id))
            except BaseException:
                # Cut short (a Ctrl-C): the reply is gone from the ring, so
                # the task must end here, or its waiters would wait for ever.
                if ar is not None:
                    if eid not in ar._results:
                        ar._fail(eid, EngineError(f"engine {eid} answered task {task_id}, but taking the reply "
                                                  f"was interrupted", eid, task_id))
                    elif ar._done():
                        ar._finished()  # again, if it was cut short: clearing and callbacks bear it
                raise
            finally:
                # Now the engine can let go of it, whatever became of it here.
                self._lane_send(eid, lane, SLOT.pack(0, KIND_RELEASE, 0, off, length, gen, 0), wake)
                self._lane_answered(eid, lane, task_id)
            return
        inbox[0] = slots[SLOT.size:]
        if kind == KIND_OUTPUT and ar is not None:
            try:
                payload, _ = unpack_frames(self.arena.acquire_bytes((off, length, gen), 0, length))
                ar._output(hdr, payload)
            except (OSError, ValueError):
                pass  # best effort: the reply has it all

    def _lane_answered(self, eid, lane, task_id):
        """Engine eid is done with lane task task_id (answered, or gone)."""
        if task_id in self._pool_tasks:
            return self._pool_answered(task_id)
        lane.pending.discard(task_id)
        entry = self._lane_tasks.get(task_id)
        if entry is not None:
            entry[1].discard(eid)
            if not entry[1]:
                del self._lane_tasks[task_id]

    def _lane_gone(self, eid, lane, what=None):
        """The agent closed the lane: the engine died or was stopped (or,
        with what, the agent itself is gone)."""
        self._lanes[eid] = None
        self._registry_at = 0.0  # ids reads the registry again: the engine has left it, or is about to
        if what is None:
            what = "was stopped" if lane.closed_why() == LANE_ENGINE_STOPPED else "died"
        for task_id in sorted(lane.pending):
            ar = self._lane_tasks[task_id][0]
            ar._fail(eid, EngineError(f"engine {eid} (pid {lane.engine_pid}) {what} while running task {task_id}",
                                      eid, task_id))
            self._lane_answered(eid, lane, task_id)
        for key, pool in list(self._pools.items()):
            if eid not in pool.lanes:
                continue
            del pool.lanes[eid]
            for task_id, pos in list(pool.tasks.items()):
                if pool.ring.owner(pos) == eid:  # it took this one and did not answer
                    ar = self._pool_tasks[task_id][0]
                    ar._targets = [eid]
                    ar._fail(eid, EngineError(f"engine {eid} (pid {lane.engine_pid}) {what} while running task "
                                              f"{task_id}", eid, task_id))
                    self._pool_answered(task_id)
            if not pool.lanes:  # nobody is left to take what waits
                self._close_pool(key, EngineError, f"every engine of its load-balanced view {what}")

    def _check_agent(self):
        """When the node's agent has died, nothing answers on our lanes any
        more (it is the one that closes a dead engine's lane): every lane
        and pool task fails now, naming its engine and why, and the engines
        of the node are marked lost, so that tasks sent to them fail at
        once. True if that happened. Called by a client that waits on lanes
        and finds nothing (a poll that never waits)."""
        if self.local is None or not self._lanes or not self.local.gone():
            return False
        pid = self.local.agent_pid
        what = f"was lost with its node's agent (pid {pid}), which died" if pid else \
            "was lost with its node's agent, which died"
        node = self._local_node
        self._lost_engines.update(e["id"] for e in self._engines if e["node"] == node)
        self._alive = [e for e in self._alive if e not in self._lost_engines]
        # What the engines put on their lanes before the agent died is
        # theirs to give: a reply that made it is a result, not lost.
        self._drain_lanes()
        for eid, lane in list(self._lanes.items()):
            if lane is not None:
                self._lane_gone(eid, lane, what)
        for key in list(self._pools):
            self._close_pool(key, EngineError, f"every engine of its load-balanced view {what}")
        self._use_lanes = False  # a new agent's engines are reached through the controller
        return True

    def _fail_lost(self, ar, targets):
        """Fails targets of ar that are engines of a node whose agent died
        (see _check_agent); the rest is theirs to send."""
        lost = [t for t in targets if t in self._lost_engines]
        for t in lost:
            ar._fail(t, EngineError(f"engine {t} was lost with its node's agent, which died: the task was not "
                                    f"sent", t))
        return [t for t in targets if t not in self._lost_engines]

    # ---- pools: load-balanced tasks that idle engines take -------------------------

    def _pool(self, engines):
        """The pool for load-balanced tasks that may run on any of engines,
        or None if they are not all engines of this node with lanes (or are
        fewer than two): such tasks go to one engine each."""
        key = frozenset(engines)
        pool = self._pools.get(key)
        if pool is not None or len(key) < 2 or self.local is None:
            return pool
        lanes = {e: self._lane(e) for e in key}
        if any(lane is None for lane in lanes.values()):
            return None
        if len(self._pools) >= MAX_POOLS:  # let idle ones go first
            for k, p in list(self._pools.items()):
                if not p.tasks:
                    self._close_pool(k)
            if len(self._pools) >= MAX_POOLS:
                return None
        try:
            pool = _Pool(self.arena, lanes)
        except (OSError, MemoryError):
            return None  # no arena memory for it: one engine each
        slot = SLOT.pack(0, KIND_POOL, 0, *pool.block.handle, 0)
        for eid, lane in lanes.items():
            self._lane_send(eid, lane, slot)
        self._pools[key] = pool
        return pool

    def _pool_submit(self, pool, meta, obj, make=None):
        """Puts a task in pool; its AsyncResult, or None if the pool is full
        (the caller sends it to one engine instead)."""
        if self._sock is None:
            raise RuntimeError("this client is closed")
        self._make_room()
        if self._sock is None:
            raise RuntimeError("this client is closed")
        s = serialize.dumps(obj, arena=self.arena)
        task_id = next(self._lane_ids)
        m = _request(meta, s)
        block = pack_frames(self.arena, [json.dumps(m).encode(), s.payload], s.frames)
        try:
            pos = pool.ring.put(SLOT.pack(task_id, KIND_TASK, 0, *block.handle, 0))
        except OSError:
            pos = None
        if pos is None:
            return None
        ar = (make or AsyncResult)(self, task_id, [None], meta["kind"])
        ar._zmq_targets = []
        ar._keep += s.keep + [block]
        ar._blocks.append(block)
        ar.task_id = task_id
        pool.tasks[task_id] = pos
        self._pool_tasks[task_id] = (ar, pool)
        pool.wake(1)
        self._last_submit = time.monotonic()
        self.history.append(task_id)
        self._by_id[task_id] = ar
        return ar

    def _pool_answered(self, task_id):
        _, pool = self._pool_tasks.pop(task_id)
        pos = pool.tasks.pop(task_id)
        try:
            pool.ring.retire(pos)
        except OSError:
            pass  # withdrawn and retired already, or the pool is closed

    def _take_back(self, pool, task_id, exc):
        """Withdraws a pool task that no engine has taken, and fails it
        with exc; True if it did."""
        if not pool.ring.withdraw(pool.tasks[task_id]):
            return False
        ar = self._pool_tasks[task_id][0]
        self._pool_answered(task_id)
        ar._fail(None, exc)
        return True

    def _pool_withdraw(self, ar):
        """Takes back ar's task if it waits in a pool: it fails with
        TaskAborted. True if it did."""
        entry = self._pool_tasks.get(ar.task_id)
        return entry is not None and self._take_back(
            entry[1], ar.task_id, TaskAborted(f"task {ar.task_id} was aborted before it started"))

    def _close_pool(self, key, error=EngineError, why="closed"):
        """Closes a pool: what waits in it fails with error(why), and its
        members drop it. Tasks engines have taken stay in pool.tasks: their
        answers come on the lanes, and retiring them in a closed pool is
        harmless."""
        pool = self._pools.pop(key)
        for task_id in list(pool.tasks):
            self._take_back(pool, task_id, error(f"task {task_id} was never taken: {why}"))
        pool.ring.close()
        pool.wake(len(pool.lanes))  # the sleepers see it closed

    # ---- tasks ---------------------------------------------------------------------

    def _node_of(self, eid):
        """The id of the node engine eid runs on (None if unknown)."""
        return next((e["node"] for e in self._engines if e["id"] == eid), None)

    def _on_this_node(self, eid):
        """Whether engine eid shares our arena (runs on the node we attached to)."""
        return self.local is not None and self._node_of(eid) == self._local_node

    def _submit(self, targets, meta, obj, each=None, make=None):
        """Sends a task to targets; returns its AsyncResult.

        each: one object per target, in place of obj for all of them.
        make(client, msg_id, targets, kind): builds the AsyncResult.
        """
        if self._sock is None:
            raise RuntimeError("this client is closed")
        if not targets:
            raise ValueError("this view has no engines to run on")
        if len(set(targets)) != len(targets):
            raise ValueError(f"an engine is named twice in {targets}")
        self._make_room()
        ar = (make or AsyncResult)(self, None, targets, meta["kind"])
        units = [(list(targets), obj)] if each is None else [([t], o) for t, o in zip(targets, each)]
        with self._lock:
            ar._zmq_targets = []
            woken = []
            for group, o in units:
                woken += self._send(ar, group, meta, o)
            # Every ring first, then the doorbells: an engine woken early
            # would otherwise take the core from the pushes that follow.
            for lane in woken:
                self._lane_flush(lane)  # what waited for room in its ring goes first
                lane.sq.wake()
            # Results are taken when waited for (or by ready()), not here: an
            # AsyncResult reads as pending until the caller looks.
            if any(lane.cq.closed for lane in woken):
                self._drain_lanes()  # a closed lane fails its part now
            self._last_submit = time.monotonic()
            self.history.append(ar.msg_id)
            self._by_id[ar.msg_id] = ar
        return ar

    def _send(self, ar, targets, meta, obj):
        """Sends one task (obj, to targets) for ar, by lane or through the
        controller; returns the lanes whose engines are yet to be woken."""
        if self._lost_engines and not self._lost_engines.isdisjoint(targets):
            if ar.msg_id is None:
                ar.msg_id = next(self._lane_ids)
            targets = self._fail_lost(ar, targets)
            if not targets:
                return []  # every one failed: nothing to send
        lanes = {t: lane for t in targets if (lane := self._lane(t)) is not None}
        here = [t for t in targets if t not in lanes and self._on_this_node(t)]
        away = [t for t in targets if t not in lanes and t not in here]
        ar._zmq_targets += here + away
        # Large buffers go into the arena once for every engine of this
        # node, and as frames to the engines of other nodes, which cannot
        # see our arena.
        s_here = serialize.dumps(obj, arena=self.arena) if lanes or here else None
        s_away = serialize.dumps(obj) if away else None
        if s_here is not None:
            ar._keep.extend(s_here.keep)
        for group, s in ((here, s_here), (away, s_away)):
            if group:
                self._check_limits(s, group)
        for group, s in ((here, s_here), (away, s_away)):
            if group and self._ctl_dead is not None:
                if ar.msg_id is None:
                    ar.msg_id = next(self._lane_ids)
                for t in group:
                    ar._fail(t, EngineError(f"engine {t} cannot be reached: {self._ctl_dead}", t))
            elif group:
                m = _request(meta, s)
                frames = [struct.pack(f"<{len(group)}I", *group), json.dumps(m).encode(), s.payload]
                mid = self._sock.send(_core.MSG_TASK, frames, s.frames)
                ar._own("_mids")[mid] = group
                self._pending[mid] = ar
                if s.files:
                    # An engine that finds a memmap's file is not the same file
                    # there (another machine, a private /tmp) gets its bytes
                    # instead (_resend_by_value): what to send is kept till then.
                    ar._own("_by_value")[mid] = (meta, obj)
                self._ctl_parts += len(group)
                if ar.msg_id is None:
                    ar.msg_id = mid
        if not lanes:
            return []
        # One message block for all of them, ours until they have answered.
        task_id = next(self._lane_ids)
        m = _request(meta, s_here)
        block = pack_frames(self.arena, [json.dumps(m).encode(), s_here.payload], s_here.frames)
        ar._keep.append(block)
        ar._blocks.append(block)  # where abort() marks it
        ar.task_id = task_id
        if ar.msg_id is None:
            ar.msg_id = task_id
        self._lane_tasks[task_id] = (ar, set(lanes))
        slot = SLOT.pack(task_id, KIND_TASK, 0, *block.handle, 0)
        for t, lane in lanes.items():
            lane.pending.add(task_id)
            self._lane_send(t, lane, slot, wake=False)
        return list(lanes.values())

    def _check_limits(self, s, group):
        """Raises ValueError for a task that the controller would refuse
        (--max-payload, --max-frame): said here, before anything is sent."""
        if len(s.payload) > self._max_payload:
            raise ValueError(
                f"this task's pickled payload is {len(s.payload)} bytes, more than the controller takes in one "
                f"message ({self._max_payload} bytes, `shoal start --max-payload`); it goes to engine(s) {group} "
                f"through the controller. Large data travels best as numpy arrays or bytes-like buffers, "
                f"which are sent apart from the payload")
        big = max((memoryview(f).nbytes for f in s.frames), default=0)
        if big > self._max_frame:
            raise ValueError(
                f"this task has a buffer of {big} bytes, more than the controller takes in one frame "
                f"({self._max_frame} bytes, `shoal start --max-frame`); it goes to engine(s) {group} through "
                f"the controller")

    def _receive(self, timeout, want=1):
        """Receives what arrives within timeout seconds, then runs the
        callbacks of the results it completed; True if anything came.
        want: how many lane replies the caller waits for (see _receive_some)."""
        if threading.current_thread() is not self._driver:
            with self._waiters_left:
                self._waiters += 1
            try:
                return self._receive_locked(timeout, want)
            finally:
                with self._waiters_left:
                    self._waiters -= 1
                    if not self._waiters:
                        self._waiters_left.notify_all()
        return self._receive_locked(timeout, want)

    def _receive_locked(self, timeout, want):
        with self._lock:
            self._receiving += 1
            try:
                # Closed: its outstanding results have failed, and only their callbacks may be left to run.
                got = self._receive_some(timeout, want) if self._sock is not None else False
                self._run_due()
            finally:
                self._receiving -= 1
            return got

    def _make_room(self):
        """Before a submission by lane or pool: waits, taking results, while
        MAX_LANE_TASKS are outstanding. Not from inside a callback (a
        load-balanced map topping itself up), which the receiving serves."""
        with self._lock:
            while self._receiving == 0 and self._sock is not None and \
                    (len(self._lane_tasks) + len(self._pool_tasks) >= MAX_LANE_TASKS or
                     self._ctl_parts >= CONTROLLER_WINDOW):
                self._receive(0.01)

    def _run_due(self):
        """Runs the callbacks of the results that have finished, one at a
        time: one cut short (a Ctrl-C) leaves the others for the next
        receiving, not lost."""
        while self._due:
            ar = self._due[0]
            while ar._callbacks:
                fn = ar._callbacks.pop(0)
                try:
                    fn(ar)
                except Exception:  # one callback's failure must not stop the others, nor receiving
                    traceback.print_exc()
            self._due.pop(0)

    def _receive_some(self, timeout, want=1):
        """Receives what arrives within timeout seconds; True if anything did.

        The caller's thread does the receiving, under the client's lock: one
        thread at a time talks to the socket (ZeroMQ sockets are not
        thread-safe) and the lanes, and a waiting thread receives for
        everybody. Lanes are waited on through their doorbell, spinning
        briefly first; while controller replies are due too, in slices of
        a millisecond, looking at the socket between them.

        want > 1 (a caller that waits for that many engines' replies) sleeps
        until that many have come, not waking for each: a fan-out to 8
        engines on 2 cores then wakes the client once instead of 8 times,
        and leaves it the cores meanwhile. Not while load-balanced tasks are
        out: their replies top the pool up, and should be taken at once.
        """
        with self._lock:
            if self._lane_tasks or self._pool_tasks:
                if self._drain_lanes():
                    return True
                if self._pending or self._control_waits:
                    if self._socket_receive(0):
                        return True
                    wait = min(max(timeout, 0), 0.001)
                else:
                    wait = min(max(timeout, 0), 0.005)  # another thread waits for the lock 5 ms at most
                if wait > 0 and self._bell is not None:
                    lanes = [lane for lane in self._lanes.values() if lane is not None]
                    # Spin only soon after a submission (a long wait sleeps), and
                    # only while a core is left for us: spinning while more
                    # engines than cores have work takes a core from them.
                    busy = sum(1 for lane in lanes if lane.pending) + min(len(self._pool_tasks), _CORES)
                    spin = LANE_SPIN if busy < _CORES and time.monotonic() - self._last_submit < 0.01 else 0
                    want = 1 if self._pool_tasks else max(1, want)
                    self._bell.wait([lane.cq for lane in lanes], timeout=wait, spin=min(spin, wait), want=want)
                # Nothing came: is the agent, which closes a dead engine's lane, still there?
                return self._drain_lanes() or self._check_agent()
            return self._socket_receive(timeout)

    def _socket_receive(self, timeout):
        """Receives one message from the controller within timeout seconds."""
        with self._lock:
            try:
                # In short slices, so that another thread waits for the lock
                # (to submit, or to receive for itself) 5 ms at most.
                hdr, payload, buffers, _ = self._sock.recv(timeout=min(max(timeout, 0), 0.005))
            except builtins.TimeoutError:
                self._watch_controller()
                return False
            except _core.WireError:
                return True  # counted by the socket; nothing we can use
            self._last_heard = time.monotonic()
            if hdr["type"] == _core.MSG_ERROR and hdr["reply_to"] in self._pending:
                # The controller refused a task outright: every target of that message fails.
                ar = self._pending.pop(hdr["reply_to"])
                self._ctl_parts -= len(ar._mids.get(hdr["reply_to"], ()))
                text = json.loads(bytes(payload[0])).get("error", "refused") if payload else "refused"
                ar._refused(ar._mids.get(hdr["reply_to"], ()), text)
            elif hdr["type"] == _core.MSG_RESULT:
                ar = self._pending.get(hdr["reply_to"])
                # A part that has ended already (failed when its node was
                # lost, which then came back) ends once: its late result is dropped.
                if ar is not None and hdr["sender"] not in ar._results and \
                        not (ar._by_value and self._resend_by_value(ar, hdr, payload)):
                    self._ctl_parts -= 1
                    ar._add(hdr, payload, buffers)
                    if ar._zmq_done():
                        for mid in ar._mids:
                            self._pending.pop(mid, None)
            elif hdr["type"] == _core.MSG_HEARTBEAT_ACK:
                pass  # the answer to _watch_controller's question: that it came is the point
            elif hdr["type"] == _core.MSG_OUTPUT:
                ar = self._pending.get(hdr["reply_to"])
                if ar is not None:
                    ar._output(hdr, payload)
            else:
                self._replies[hdr["reply_to"]] = (hdr, payload)
            return True

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
        arena = self.arena if self._on_this_node(engine) else None
        try:
            s = serialize.dumps(obj, arena=arena, memmaps="value",
                                memmaps_why=reply.get("evalue", "not the same file there"))
            self._check_limits(s, [engine])
        except Exception:
            return False  # the engine's FileNotSame stands as the part's result, and says why
        ar._keep.extend(s.keep)
        frames = [struct.pack("<I", engine), json.dumps(_request(meta, s)).encode(), s.payload]
        mid = self._sock.send(_core.MSG_TASK, frames, s.frames)
        old = hdr["reply_to"]
        rest = [t for t in ar._mids[old] if t != engine]
        ar._mids[mid] = [engine]
        if rest:
            ar._mids[old] = rest  # what that message still has to answer
        else:
            del ar._mids[old]
            ar._by_value.pop(old, None)
            self._pending.pop(old, None)
        self._pending[mid] = ar
        return True

    def shared(self, a, mode="r+"):
        """a, in this node's arena (copied there once, unless it lives there
        already), marked to be received writable by engines: mode "r+"
        (every engine and this client see every write) or "c" (copy-on-write:
        each engine's writes are its own). Returns a SharedArray
        (shoal.shared marks an array without moving it)."""
        if self.arena is None:
            raise RuntimeError("this client has no arena (no agent on its machine, or lanes=False): "
                               "shoal.shared(a) marks a for engines without sharing it with the client")
        a = np.asarray(a)
        owner = serialize._owner_block(a)
        # In our arena and writable here: shared where it is. Otherwise (an
        # array of private memory, or one received read-only) a copy.
        if owner is None or owner.arena is not self.arena or not a.flags.writeable:
            whole = self.arena.empty(a.shape, dtype=a.dtype)
            whole[...] = a
            a = whole
        return serialize.shared(a, mode)

    def _outstanding(self):
        """Our AsyncResults still waiting for an engine."""
        with self._lock:
            ars = list(self._pending.values()) + [ar for ar, _ in self._lane_tasks.values()] + \
                [ar for ar, _ in self._pool_tasks.values()]
        return list({id(ar): ar for ar in ars}.values())

    def wait(self, jobs=None, timeout=-1):
        """Waits for jobs (AsyncResults or their msg_ids; default every
        outstanding one); True if all finished."""
        if jobs is None:
            jobs = self._outstanding() + [w for w in self._driven if hasattr(w, "wait")]
        elif isinstance(jobs, (AsyncResult, int)) or hasattr(jobs, "_done"):
            jobs = [jobs]
        # A msg_id whose AsyncResult is gone has finished (the client holds unfinished ones).
        jobs = [self._by_id.get(j) if isinstance(j, int) else j for j in jobs]
        jobs = [j for j in jobs if j is not None]
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        for ar in jobs:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if hasattr(ar, "wait"):
                if not ar.wait(-1 if left is None else left):
                    return False
            elif not concurrent.futures.wait([ar], left).done:  # any other Future
                return False
        return True

    def abort(self, jobs=None, targets=None, block=None):
        """Aborts tasks that have not started: jobs (AsyncResults or msg_ids;
        default every outstanding one), or those on targets. They fail with
        TaskAborted; tasks already running finish. Load-balanced tasks still
        held by the client or waiting in its pool are taken back at once;
        tasks queued on an engine (on a lane, or sent through the controller)
        are marked, and the engine answers TaskAborted when it gets to them."""
        if jobs is None:
            jobs = self._outstanding() + [w for w in self._driven if hasattr(w, "_abort")]
        elif isinstance(jobs, (AsyncResult, int)) or hasattr(jobs, "_abort"):
            jobs = [jobs]
        jobs = [self._by_id.get(j, j) if isinstance(j, int) else j for j in jobs]
        if targets is not None:
            targets = {targets} if isinstance(targets, int) else set(targets)
            jobs = [j for j in jobs if targets & set(getattr(j, "_targets", ()))]
        with self._lock:
            for job in jobs:
                if hasattr(job, "_abort"):
                    job._abort()
                elif isinstance(job, AsyncResult):
                    self._abort_sent(job)
        if block:
            self.wait(jobs)

    def _abort_sent(self, ar):
        """Aborts a task that was sent: takes it back from the pool if no
        engine has it yet; else marks its message blocks, ours (lanes) or,
        through the controller, the agents' (the controller's ABORT): an
        engine that has not started it answers TaskAborted instead. True if
        there was anything to abort."""
        if ar._done():
            return False
        if self._pool_withdraw(ar):
            return True
        for block in ar._blocks:
            memoryview(block).cast("B")[12:16] = struct.pack("<I", ABORTED)
        if ar._mids and not ar._zmq_done():
            try:
                self._control(_core.MSG_ABORT, {"msg_ids": list(ar._mids)})
            except (TimeoutError, RuntimeError) as e:  # the controller is gone or refuses: the task runs
                warnings.warn(f"task {ar.msg_id} could not be aborted through the controller: {e}", stacklevel=3)
        return bool(ar._blocks or ar._mids)

    def send_signal(self, sig, targets=None, block=None):
        """Sends signal sig (a number, or a name such as "SIGINT" or "INT")
        to the processes of targets' engines (an id, a list, or None / "all":
        every engine), on whichever node they run. SIGINT interrupts the
        task an engine runs (it fails with KeyboardInterrupt) and leaves an
        idle engine alone. Raises EngineError if a target is not running
        (the others got the signal)."""
        num = _signal_number(sig)
        if targets in (None, "all"):
            targets = None
        elif isinstance(targets, int):
            targets = [targets]
        else:
            targets = list(targets)
        reply = self._control(_core.MSG_SIGNAL, {"sig": num, "targets": targets})
        if reply.get("not_running"):
            raise EngineError(f"engines {reply['not_running']} are not running; signal {sig} went to "
                              f"{reply.get('signalled', [])}")
        return None

    def wait_for_engines(self, n, timeout=-1, block=True):
        """Waits until at least n engines are running; raises TimeoutError
        if they are not within timeout seconds (-1: for ever). block=False:
        returns a concurrent.futures.Future of it at once (a thread waits)."""
        if not block:
            future = concurrent.futures.Future()

            def wait():
                try:
                    future.set_result(self.wait_for_engines(n, timeout))
                except BaseException as e:
                    future.set_exception(e)
            if len(self.ids) >= n:
                future.set_result(None)
            else:
                threading.Thread(target=wait, name="shoal-wait-for-engines", daemon=True).start()
            return future
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.ids) >= n:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{n} engines were not ready within {timeout} s (ready: {len(self.ids)})")
            time.sleep(0.05)

    # ---- what ran: ipyparallel's history ------------------------------------------

    @property
    def history_limit(self):
        """How many of the latest tasks history lists and the client
        remembers the ending of (see the class's doc); None: every one."""
        return self._history_limit

    @history_limit.setter
    def history_limit(self, limit):
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ValueError(f"history_limit is a number of tasks (>= 0) or None, not {limit!r}")
        self._history_limit = self.history.limit = limit

    def _record(self, ar):
        """Notes how a task ended (for dependencies and queue_status): an
        int for the usual task (ending), the latest history_limit of them."""
        if ar.msg_id is None:
            return
        if ar._counted:
            completed = self._completed
            for e in ar._results:
                completed[e] += 1
        if not ar._recorded:
            return
        ended = self._ended
        ended[ar.msg_id] = ending(all(ok for ok, _ in ar._results.values()), ar._results)
        limit = self.history_limit
        if limit is not None and len(ended) > limit + (limit >> 3):
            # The oldest go in a batch: O(1) a task, amortized.
            for mid in list(itertools.islice(ended, len(ended) - limit)):
                del ended[mid]

    def _how_ended(self, msg_id):
        """(succeeded, engines) of a task of ours that has finished; None
        while it runs. From the record of it, or, once that is gone (older
        than history_limit), from its AsyncResult while held. Raises
        KeyError if neither is left (never sent, purged, or let go)."""
        ar = self._by_id.get(msg_id)
        if ar is not None and not ar._done():
            return None
        v = self._ended.get(msg_id)
        if v is not None:
            return ending_of(v)
        if ar is not None and not getattr(ar, "_purged", False):
            return ar._ending()
        raise KeyError(msg_id)

    @property
    def outstanding(self):
        """The msg_ids of this client's tasks that have not finished."""
        return {ar.msg_id for ar in self._outstanding()} | \
            {w.msg_id for w in self._driven if hasattr(w, "msg_id") and not w._done()}

    def _jobs(self, jobs):
        """msg_ids of jobs: an AsyncResult, a msg_id, an index into history, or a list of them."""
        if jobs is None:
            return []
        if isinstance(jobs, (AsyncResult, int, str)) or hasattr(jobs, "msg_ids"):
            jobs = [jobs]
        ids = []
        for j in jobs:
            if hasattr(j, "msg_ids"):
                ids += j.msg_ids
            elif isinstance(j, int) and j < 0:
                ids.append(self.history[j])  # counted from the end of history (shoal's msg_ids are ints > 0)
            else:
                ids.append(j)
        return ids

    def get_result(self, indices_or_msg_ids=None, block=None, owner=True):
        """The AsyncResult of this client's task(s): msg_ids, AsyncResults,
        or indices into history (default: the last task); one for a single
        one. **Differs:** shoal keeps no task record in the controller
        (ipyparallel's Hub database): a task is found while it runs or
        while its AsyncResult is held; another's is KeyError."""
        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        single = not isinstance(indices_or_msg_ids, (list, tuple))
        ars = []
        for mid in self._jobs(indices_or_msg_ids):
            ar = self._by_id.get(mid)
            if ar is None:
                raise KeyError(f"task {mid!r} is not this client's, or its AsyncResult was let go: shoal keeps "
                               f"no record of finished tasks (ipyparallel's Hub database); keep the AsyncResult")
            ars.append(ar)
        if not ars:
            raise ValueError("get_result needs at least one task")
        ar = ars[0] if single or len(ars) == 1 else AsyncResult.join(*ars)
        if block:
            ar.wait()
        return ar

    def _purgeable(self, jobs, targets):
        """The msg_ids that jobs (msg_ids, AsyncResults, or "all": None here)
        and targets name, all finished; RuntimeError naming those that are not."""
        outstanding = self.outstanding
        if jobs == "all":
            if outstanding:
                raise RuntimeError(f"cannot purge every result while tasks are outstanding: {sorted(outstanding)}")
            return None
        ids = self._jobs(jobs)
        pending = [m for m in ids if m in outstanding]
        if pending:
            raise RuntimeError(f"cannot purge the results of tasks that have not finished: {pending}")
        targets = {targets} if isinstance(targets, int) else set(targets)
        if targets:
            ids += [m for m, v in self._ended.items() if targets & ending_of(v)[1]]
        return ids

    def purge_local_results(self, jobs=(), targets=()):
        """Forgets what results and metadata hold for jobs (msg_ids,
        AsyncResults, or "all") and for tasks that ran on targets. Raises
        RuntimeError if one of them has not finished."""
        self._purge(self._purgeable(jobs, targets), (self.results, self.metadata))

    def purge_results(self, jobs=(), targets=()):
        """purge_local_results, and forgets how the tasks ended (which
        `after` and `follow` dependencies read: a purged task is an
        InvalidDependency)."""
        ids = self._purgeable(jobs, targets)
        # A held AsyncResult no longer speaks for its task either.
        for ar in (list(self._by_id.values()) if ids is None else filter(None, map(self._by_id.get, ids))):
            ar._purged = True
        self._purge(ids, (self.results, self.metadata, self._ended))

    @staticmethod
    def _purge(ids, stores):
        for store in stores:
            if ids is None:
                store.clear()
            else:
                for m in ids:
                    store.pop(m, None)

    def clear(self, targets=None, block=None):
        """Empties the namespaces of targets' engines (default: every one)."""
        return self.direct_view("all" if targets is None else targets).clear(block=block)

    def broadcast_view(self, targets="all", is_coalescing=False, **kwargs):
        """A view that sends each task to all its engines at once.
        **Differs:** shoal sends any task for several engines as one
        message per node, fanned out by the node's agent, so this is a
        DirectView (ipyparallel's broadcast scheduler does the same
        in the controller); is_coalescing is accepted."""
        from .view import BroadcastView
        view = BroadcastView(self, "all" if targets in ("all", None) else self._engine_ids(targets), **kwargs)
        view.is_coalescing = is_coalescing
        return view

    def wait_interactive(self, jobs=None, interval=1.0, timeout=-1, file=None):
        """wait(jobs), drawing a progress bar of the tasks that have finished."""
        ars = self._outstanding() if jobs is None else [self.get_result(j) for j in self._jobs(jobs)]
        file = file or sys.stdout
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            left = interval if deadline is None else max(min(interval, deadline - time.monotonic()), 0)
            done = self.wait(ars, left)
            k, n = sum(1 for ar in ars if ar._done()), len(ars)
            print(f"\r[{'#' * (30 * k // n if n else 30):<30}] {k}/{n} tasks finished", end="", file=file, flush=True)
            if done or (deadline is not None and time.monotonic() >= deadline):
                print(file=file)
                return done

    def executor(self, targets=None):
        """A concurrent.futures.Executor that runs on a LoadBalancedView."""
        from .futures import ViewExecutor
        return ViewExecutor(self.load_balanced_view(targets))

    def shutdown(self, targets="all", restart=False, hub=False, block=None):
        """Stops engines, as ipyparallel's shutdown does: targets ("all", an
        id or a list) each finish what they were given before, then exit
        (and are not restarted). hub=True stops the whole cluster: the
        controller, every agent and every engine."""
        if restart:
            raise NotImplementedError("engines are not restarted on request (nor in ipyparallel); "
                                      "shoal start --restart-engines restarts those that die")
        if hub:
            self._control(_core.MSG_SHUTDOWN)
            return None
        view = self.direct_view(targets)
        ar = view._run({"kind": "shutdown"}, None, block=False)
        ar._fname = "shutdown"
        self._leaving.update(view._targets)  # ids follows the registry closely until they have gone
        return ar.get() if block else ar

    def close(self):
        # Under the lock: the load balancer's thread may be receiving.
        with self._lock:
            # What waits in our pools is taken back first, so that no engine
            # starts it once we are gone.
            for key in list(self._pools):
                self._close_pool(key, why="the client was closed")
            for ar in self._outstanding():  # nothing will answer them any more
                for e in ar._targets:
                    if e not in ar._results:
                        who = f"engine {e}" if e is not None else "an engine"
                        ar._fail(e, EngineError(f"the client was closed before {who} answered", e))
            for w in self._driven:
                if hasattr(w, "_abort"):
                    w._abort()
            self._pending.clear()
            self._ctl_parts = 0
            self._lane_tasks.clear()
            self._pool_tasks.clear()
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._close_pidfd()
            self._ctl_pidfd = None
            self._lanes, self._bell = {}, None
            if self.local is not None:
                self.local.close()
                self.local = None
            self._run_due()  # a load-balanced task ends with its attempt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
