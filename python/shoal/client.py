"""The client: shoal.Client, with ipyparallel's names (views are in view.py,
AsyncResult in asyncresult.py).

The client keeps the public API and the bookkeeping (results, metadata,
history); its tasks reach the engines by routes (routes.py), which it uses
through one small interface: through the controller's signed ZeroMQ socket
(route_controller.py) to any engine; on a node that runs an agent, whose
arena the client attaches to, by a lane each (route_lane.py, docs/engine.md:
a pair of rings in the arena straight to the engine, with no socket and no
other process on the way, results coming back as zero-copy views of the
blocks the engine wrote) and, load-balanced, by a pool its idle engines take
from (route_pool.py). Large buffers it sends to that node are written to the
arena once, whatever the number of engines, and engines view them without
copying. Results are received in the calling thread while it waits for them
(get, wait, ready), so a round trip costs no hand-off between threads.
"""

import collections
import concurrent.futures
import collections.abc
import itertools
import json
import os
import sys
import threading
import time
import warnings
import weakref

import numpy as np

from . import _core, serialize
from ._host import alive as _alive
from ._records import History, ending, ending_of
from .asyncresult import AsyncResult
from .error import EngineError, TimeoutError
from .local import LocalArena
from .route_controller import ControllerRoute
from .route_lane import LaneRoute
from .route_pool import PoolRoute
from .routes import Routes
from .view import DirectView, LoadBalancedView

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
# How old (seconds) the client's copy of the registry may be when
# Client.ids is read: engines that stop leave ids, and engines that join
# enter it, within this (ipyparallel's client hears of them by notification).
REGISTRY_TTL = 0.5


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
        self._lock = threading.RLock()
        self.timeout = timeout
        self.local = None
        self._local_node = None
        self._bulk_at = {}  # node id -> its agent's bulk server (docs/machines.md, "The bulk path")
        # Ids of lane tasks and load-balanced tasks: apart from the socket's msg_ids (1, 2, ...).
        self._lane_ids = itertools.count(1 << 40)
        self._due = []  # AsyncResults finished whose callbacks are still to run
        self._lb_load = {}  # engine id -> load-balanced tasks of ours it has
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
        self._leaving = set()  # engines this client stopped, until the registry no longer has them
        self._lost_engines = set()  # engines of a node whose agent died under us (_node_lost)
        # The ways tasks reach the engines (routes.py). They see our
        # registry through a weak proxy: a client and its routes make no
        # cycle, and a client let go without close() closes its socket at once.
        me = weakref.proxy(self)
        lane = LaneRoute(lanes, self._lane_ids, me)
        self._routes = Routes(self._lock, self._due,
                              ControllerRoute(info, path, profile, self._lock, self._lane_ids, me, _alive),
                              lane, PoolRoute(lane, self._lane_ids))
        try:
            registry = self._control(_core.MSG_REGISTER, timeout=timeout)
        except BaseException:
            self._routes.close()
            raise
        self._registry(registry["engines"], registry["nodes"])
        self._attach_local(registry["nodes"], lane, timeout)
        self._auto_activate()

    def _attach_local(self, nodes, lane, timeout):
        """Attaches to the arena and lanes of this host's agent, if one of
        the cluster's nodes runs here. Its socket must exist here, and the
        agent behind it must say the id it registered with: neither the
        hostname (containers share one) nor the socket's path (the same
        path on another host's /tmp) tells hosts apart."""
        for node in nodes:
            if not (node["alive"] and node.get("socket") and os.path.exists(node["socket"])):
                continue
            try:
                local = LocalArena(node["socket"], timeout=min(timeout, 5))
            except ConnectionError as e:  # the controller's path still works: go on without lanes
                warnings.warn(f"{e}; this client goes without the node's arena and lanes (tasks go "
                              f"through the controller)", RuntimeWarning, stacklevel=3)
                continue
            if node.get("agent_id") and local.info.get("agent_id") != node["agent_id"]:
                local.close()  # another host's agent, at the same path there
                continue
            try:
                self.local = local
                self._local_node = node["id"]
                lane.attach(local, node["id"])
            except ConnectionError as e:
                self.local = None
                local.close()
                warnings.warn(f"{e}; this client goes without the node's arena and lanes (tasks go "
                              f"through the controller)", RuntimeWarning, stacklevel=3)
            return

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
                and not self._routes.receiving and not self._routes.closed:
            try:
                self.refresh()
            except (TimeoutError, ConnectionError):
                pass  # the controller does not answer, or is gone: what we knew (lanes still work)
        return list(self._alive)  # a copy: the caller's to change

    def _live_ids(self):
        return list(self._alive)

    def _registry(self, engines, nodes=None):
        """Takes the controller's list of engines (and of nodes)."""
        if nodes is not None:  # where each node's bulk server listens (None: it has none)
            self._bulk_at = {n["id"]: n.get("bulk") for n in nodes if n["alive"]}
            self._nodes = {n["id"]: n for n in nodes}
        self._engines = engines
        self._alive = [e["id"] for e in engines if e["alive"] and e["id"] not in self._lost_engines]
        self._registry_at = time.monotonic()
        self._leaving &= set(self._alive)

    def refresh(self):
        """Reads the registry (engines, nodes) from the controller again."""
        registry = self._control(_core.MSG_REGISTER)
        self._registry(registry["engines"], registry["nodes"])
        with self._lock:  # engines that had no lane may have one now (a new engine of this node)
            self._routes.lane.retry()

    # What the routes ask of the registry (through a weak proxy).

    def _engine(self, eid):
        """The registry's entry of engine eid, or None."""
        return next((e for e in self._engines if e["id"] == eid), None)

    def _engine_left(self):
        """An engine's lane closed: ids reads the registry again (the engine has left it, or is about to)."""
        self._registry_at = 0.0

    def _node_words(self, eid):
        """Engine eid's node, as an error names it: "N (host H, agent pid P)"."""
        node = self._node_of(eid)
        n = getattr(self, "_nodes", {}).get(node) or {}
        return f"{node} (host {n.get('host', '?')}, agent pid {n.get('pid', '?')})"

    def _node_lost(self, node):
        """The agent of node died: its engines are lost (tasks sent to them fail at once)."""
        self._lost_engines.update(e["id"] for e in self._engines if e["node"] == node)
        self._alive = [e for e in self._alive if e not in self._lost_engines]

    def _arena_for(self, eid):
        """Our arena if engine eid shares it (runs on the node we attached to), else None."""
        return self.arena if self._on_this_node(eid) else None

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

    @property
    def arena(self):
        return self.local.arena if self.local else None

    # ---- talking to the controller ---------------------------------------------

    def _control(self, kind, body=None, timeout=None):
        """Asks the controller (see ControllerRoute.control), waiting up to
        timeout (default self.timeout) seconds; returns its answer."""
        return self._routes.controller.control(kind, body, timeout or self.timeout, self._receive)

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
        routes = self._routes
        with self._lock:
            routes.lane.poll()
            through = collections.Counter()  # engine id -> our tasks on it through the controller
            for e, ar in routes.controller.queued():
                queue[e].append(ar.msg_id)
                through[e] += 1
            for e, ar in routes.lane.queued():
                queue[e].append(ar.msg_id)
            for owner, ar in routes.pool.queued():
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
        lane, pool and direct tasks added; ``tasks_pending`` unfinished
        tasks, of which ``lane_tasks_pending`` on lanes and in pools and
        ``direct_tasks_pending`` sent to other nodes' agents directly,
        ``unassigned`` load-balanced tasks no engine has taken.

        The controller never sees lane and direct tasks, so the figures for
        them are this client's own: other clients' are not counted."""
        status = self._control(_core.MSG_QUERY, {"what": "status"})
        routes = self._routes
        with self._lock:
            routes.lane.poll()
            for eid, _ in routes.lane.queued():
                if eid < len(status["queue"]):
                    status["queue"][eid] += 1
            # A pool task is queued on the engine that took it, else unassigned.
            unassigned = 0
            for owner, _ in routes.pool.queued():
                if 0 <= owner < len(status["queue"]):
                    status["queue"][owner] += 1
                elif owner == _core.POOL_WAITING:
                    unassigned += 1
            status["unassigned"] = status.get("unassigned", 0) + unassigned
            mine = routes.lane.held() + routes.pool.held()
            status["lane_tasks_pending"] = mine
            direct = 0
            for eid, _ in routes.controller.direct_queued():
                direct += 1
                if eid < len(status["queue"]):
                    status["queue"][eid] += 1
            status["direct_tasks_pending"] = direct
            status["tasks_pending"] += mine + direct
        return status

    # ---- tasks ---------------------------------------------------------------------

    def _fail_lost(self, ar, targets):
        """Fails targets of ar that are engines of a node whose agent died
        (see LaneRoute.check_agent); the rest is theirs to send."""
        lost = [t for t in targets if t in self._lost_engines]
        for t in lost:
            ar._fail(t, EngineError(f"engine {t} was lost with its node's agent, which died: the task was not "
                                    f"sent", t))
        return [t for t in targets if t not in self._lost_engines]

    def _pool(self, engines):
        """The pool for load-balanced tasks that may run on any of engines,
        or None (see PoolRoute.pool): such tasks go to one engine each."""
        return self._routes.pool.pool(engines)

    def _pool_submit(self, pool, meta, obj, make=None):
        """Puts a task in pool; its AsyncResult, or None if the pool is full
        (the caller sends it to one engine instead)."""
        routes = self._routes
        if routes.closed:
            raise RuntimeError("this client is closed")
        self._make_room()
        if routes.closed:
            raise RuntimeError("this client is closed")
        s = serialize.dumps(obj, arena=self.arena)
        ar = routes.pool.submit(self, pool, meta, s, make or AsyncResult)
        if ar is None:
            return None
        routes.lane.last_submit = time.monotonic()
        self.history.append(ar.task_id)
        self._by_id[ar.task_id] = ar
        return ar

    def _bulk_chain(self, group, s):
        """The bulk servers of the nodes of group's engines, in node order,
        if s should go to them by the bulk path; else None."""
        nodes = sorted({self._node_of(t) for t in group}, key=lambda n: (n is None, n))
        endpoints = [self._bulk_at.get(n) for n in nodes]
        return endpoints if self._routes.controller.bulk.wanted(s, endpoints) else None

    def _direct_nodes(self, group, s):
        """[(bulk endpoint, engines)] of the nodes of group's engines, in
        node order, if the task s should go to them directly (each has a
        bulk server we may try, and s has no memmap files, which go by the
        controller's way of resending); else None."""
        bulk = self._routes.controller.bulk
        if not bulk.direct or s.files:
            return None
        nodes = {}
        for t in group:
            nodes.setdefault(self._node_of(t), []).append(t)
        out = []
        for n in sorted(nodes, key=lambda n: (n is None, n)):
            ep = self._bulk_at.get(n)
            if n is None or not bulk.usable(ep):
                return None
            out.append((ep, nodes[n]))
        return out

    def _bulk_endpoint(self, eid):
        """The bulk server of engine eid's node (None: none known)."""
        return self._bulk_at.get(self._node_of(eid))

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
        routes = self._routes
        if routes.closed:
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
            routes.lane.start(woken)  # every task queued first, then the engines woken
            routes.lane.last_submit = time.monotonic()
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
        routes = self._routes
        lanes = routes.lane.reach(targets)
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
        controller = routes.controller
        # Large buffers for other nodes go on the bulk channel, once along
        # the chain of those nodes' agents; the controller gets the TASK
        # without them (and its limits do not apply).
        chain = self._bulk_chain(away, s_away) if away else None
        # Other nodes' engines get the task straight from us, on our bulk
        # connections to their agents, when each of those nodes has one.
        by_node = self._direct_nodes(away, s_away) if away else None
        if by_node and controller.submit_direct(ar, by_node, meta, s_away, obj, chain):
            away = []
        # Large results of other nodes' engines come back on our bulk
        # connections to their agents (made here if need be) when the TASK
        # carries our token.
        token = controller.bulk.result_token(
            sorted({self._bulk_endpoint(t) for t in away} - {None})) if away else 0
        for group, s in ((here, s_here), (away, s_away)):
            if group and not (group is away and chain):
                controller.check_limits(s, group)
        if here:
            controller.submit(ar, here, meta, s_here, obj)
        if away and not (chain and controller.submit_bulk(ar, away, meta, s_away, obj, chain, token)):
            if chain:
                controller.check_limits(s_away, away)
            controller.submit(ar, away, meta, s_away, obj, token)
        if not lanes:
            return []
        return routes.lane.submit(ar, lanes, meta, s_here, obj)

    def _receive(self, timeout, want=1):
        """Receives what arrives within timeout seconds, then runs the
        callbacks of the results it completed; True if anything came.
        want: how many lane replies the caller waits for (see Routes.receive)."""
        return self._routes.receive(timeout, want)

    def _make_room(self):
        """Before a submission by lane or pool: waits, taking results, while
        MAX_LANE_TASKS are outstanding. Not from inside a callback (a
        load-balanced map topping itself up), which the receiving serves."""
        routes = self._routes
        with self._lock:
            while routes.receiving == 0 and not routes.closed and \
                    (routes.lane.held() + routes.pool.held() >= MAX_LANE_TASKS or
                     routes.controller.held() >= CONTROLLER_WINDOW):
                self._receive(0.01)

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
        return self._routes.outstanding()

    def wait(self, jobs=None, timeout=-1):
        """Waits for jobs (AsyncResults or their msg_ids; default every
        outstanding one); True if all finished."""
        if jobs is None:
            jobs = self._outstanding() + [w for w in self._routes.driven if hasattr(w, "wait")]
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
            jobs = self._outstanding() + [w for w in self._routes.driven if hasattr(w, "_abort")]
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
        routes = self._routes
        if routes.pool.abort(ar):
            return True
        routes.lane.abort(ar)
        routes.controller.abort(ar, self.timeout, self._receive)
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
            {w.msg_id for w in self._routes.driven if hasattr(w, "msg_id") and not w._done()}

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
            routes = self._routes
            routes.pool.close_all(why="the client was closed")
            for ar in self._outstanding():  # nothing will answer them any more
                for e in ar._targets:
                    if e not in ar._results:
                        who = f"engine {e}" if e is not None else "an engine"
                        ar._fail(e, EngineError(f"the client was closed before {who} answered", e))
            for w in routes.driven:
                if hasattr(w, "_abort"):
                    w._abort()
            routes.close()
            if self.local is not None:
                self.local.close()
                self.local = None
            routes.run_due()  # a load-balanced task ends with its attempt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
