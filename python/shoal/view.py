"""Views of the engines: DirectView and LoadBalancedView, with ipyparallel's
names and behaviour, and the decorators that go with them."""

import array
import builtins
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import itertools
import os
import sys
import time
import types

import numpy as np

from . import _arrays, _core, serialize
from ._records import History
from .asyncresult import AsyncMapResult, AsyncResult, _flat, _Future, _metadata
from .error import EngineError, TaskAborted, TimeoutError


class _View:
    """What both kinds of view have, as ipyparallel's View: the tasks this
    view sent (history, outstanding), abort, wait and get_result over
    them, and the choice of serializer.

    use_*: how functions are pickled (see shoal.serialize), set in this
    process and on the view's engines; each returns what apply of it on
    those engines returns (an AsyncResult, or None when blocking)."""

    def _sent(self, ar):
        """Notes a task of this view's; returns it."""
        self.history.limit = self.client.history_limit  # as the client's, should it have changed
        self.history.append(ar.msg_id)
        return ar

    @property
    def outstanding(self):
        """The msg_ids of this view's tasks that have not finished."""
        pending = self.client.outstanding
        return {m for m in self.history if m in pending}

    def abort(self, jobs=None, targets=None, block=None):
        """Aborts jobs (default: this view's outstanding tasks) that have not
        started, on targets (default: the view's engines). See Client.abort."""
        if jobs is None:
            jobs = list(self.outstanding)
        block = self.block if block is None else block
        return self.client.abort(jobs, targets=targets, block=block)

    def wait(self, jobs=None, timeout=-1):
        """Waits for jobs (default: this view's outstanding tasks); True if
        all finished within timeout."""
        return self.client.wait(list(self.outstanding) if jobs is None else jobs, timeout)

    def get_result(self, indices_or_msg_ids=None, block=None, owner=False):
        """Client.get_result, of this view's history by default (-1: its last task)."""
        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        if isinstance(indices_or_msg_ids, int) and indices_or_msg_ids < 0:
            indices_or_msg_ids = self.history[indices_or_msg_ids]
        return self.client.get_result(indices_or_msg_ids, block=block, owner=owner)

    def _everywhere(self, choose):
        choose()
        return self._direct().apply(choose)

    def use_pickle(self):
        """Functions of __main__ run in the engine's namespace (the default)."""
        return self._everywhere(serialize.use_pickle)

    def use_cloudpickle(self):
        """Functions travel with the globals they use, data included (plain cloudpickle)."""
        return self._everywhere(serialize.use_cloudpickle)

    def use_dill(self):
        """Pickles with dill (ImportError if it is not installed here; the
        engines' errors if it is not installed there)."""
        return self._everywhere(serialize.use_dill)

    def register_joblib_backend(self, name="ipyparallel", make_default=False):
        """Registers a joblib backend named name that runs joblib.Parallel's
        batches on this view's engines (make_default: joblib's default)."""
        from . import _joblib
        return _joblib.register(self, name, make_default)


class DirectView(_View):
    """Runs work on a fixed set of engines, as ipyparallel's DirectView does.

    ``block`` (default False) makes apply/execute/push/pull wait for their
    results and return them instead of AsyncResults.
    """

    _flag_names = ("targets", "block", "track")

    def __init__(self, client, targets, block=False):
        self.client = client
        self.targets = targets
        self.block = block
        self.track = False  # accepted for ipyparallel's sake: arena buffers need no tracking
        self.history = History(client.history_limit)  # msg_ids of the tasks this view sent (the latest)

    @property
    def targets(self):
        if self._chosen is None:
            return "all"
        return self._chosen[0] if self._single else list(self._chosen)

    @targets.setter
    def targets(self, targets):
        self._single = isinstance(targets, int)
        # "all" (or None): every engine at the time of each call. Else each engine once, in the order given.
        self._chosen = None if targets in ("all", None) else \
            [targets] if self._single else list(dict.fromkeys(targets))

    @property
    def _targets(self):
        """The engines a call goes to now."""
        return self.client.ids if self._chosen is None else self._chosen

    def __repr__(self):
        return f"<DirectView {self.targets}>"

    def __len__(self):
        return len(self._targets)

    def _view(self, targets):
        return self if targets is None else self.client[targets]

    def _direct(self):
        return self

    def _load_balanced(self):
        """A LoadBalancedView over this view's engines."""
        return self.client.load_balanced_view(None if self._chosen is None else self._chosen)

    def _block(self, block):
        return self.block if block is None else block

    def _run(self, meta, obj, block, each=None):
        ar = self._sent(self.client._submit(self._targets, meta, obj, each=each))
        ar._single = self._single
        return ar.get() if self._block(block) else ar

    def activate(self, suffix=""):
        """Registers the %px magics (named px + suffix) for this view in the
        running IPython."""
        from . import magics
        if magics.register(self, suffix) is None:
            import warnings
            warnings.warn("the shoal parallel magics (%px, etc.) only work within IPython", stacklevel=2)

    # ---- flags ------------------------------------------------------------------------

    def set_flags(self, **flags):
        """Sets view flags (targets, block, track) by name."""
        for name, value in flags.items():
            if name not in self._flag_names:
                raise KeyError(f"invalid flag {name!r}: the flags are {', '.join(self._flag_names)}")
            setattr(self, name, value)

    @contextlib.contextmanager
    def temp_flags(self, **flags):
        """Sets flags for the duration of a with block, then restores them."""
        saved = {name: getattr(self, name) for name in self._flag_names}
        self.set_flags(**flags)
        try:
            yield
        finally:
            self.set_flags(**saved)

    def apply(self, f, /, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), None)

    def apply_async(self, f, /, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), False)

    def apply_sync(self, f, /, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), True)

    def execute(self, code, silent=True, targets=None, block=None):
        """Runs code (Python, or IPython's syntax: %magics, !cmd) on the
        engines. Returns its AsyncResult, as ipyparallel does, once it has
        finished when blocking (raising the engines' errors); its get()
        gives each engine's ExecuteReply. silent=False: a cell's value is
        shown (execute_result), as %px shows it."""
        ar = self._view(targets)._run({"kind": "execute", "code": code, "silent": silent}, None, False)
        if self._block(block):
            ar.get()
        return ar

    def run(self, filename, targets=None, block=None):
        """Runs a Python file's code on the engines (as execute does)."""
        with open(filename) as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block)

    def push(self, ns, targets=None, block=None, track=None):
        if not isinstance(ns, dict):
            raise TypeError("push takes a dict of names to values")
        return self._view(targets)._run({"kind": "push"}, ns, block)

    def pull(self, names, targets=None, block=None):
        single = isinstance(names, str)
        return self._view(targets)._run({"kind": "pull", "names": [names] if single else list(names),
                                         "single": single}, None, block)

    def update(self, ns):
        """push(ns), as a dict's update."""
        return self.push(ns)

    def get(self, key_s):
        """pull(key_s, block=True), as a dict's get."""
        return self.pull(key_s, block=True)

    def clear(self, targets=None, block=None):
        """Empties the engines' namespaces (what push, execute and apply put there)."""
        return self._view(targets)._run({"kind": "clear"}, None, block)

    # ---- scatter, gather, map -----------------------------------------------------------

    def scatter(self, key, seq, dist="b", flatten=False, targets=None, block=None, track=None):
        """Partitions seq between the engines and pushes each its part as key.

        dist "b" gives each engine a contiguous block (the first ones one item
        more when the length does not divide), "r" deals items round robin.
        flatten=True pushes a part of one item as the item itself. A numpy
        array goes into the node's arena once, and every engine of the node
        gets a zero-copy (read-only) view of its part. Returns an AsyncResult
        (get() gives one None per engine), or None when blocking.
        """
        view = self._view(targets)
        engines = view._targets
        _check_dist(dist)
        seq = _shared(self.client, seq) if dist == "b" else seq
        parts = [_partition(seq, i, len(engines), dist) for i in range(len(engines))]
        nss = [{key: p[0] if flatten and len(p) == 1 else p} for p in parts]
        ar = self.client._submit(engines, {"kind": "push"}, None, each=nss)
        ar._fname = "scatter"
        if self._block(block):
            ar.get()
            return None
        return ar

    def load(self, key, path, dtype=None, shape=None, offset=0, targets=None, block=None, **io):
        """Loads the array in the file at path into each node's arena once,
        through io_uring (shoal.bulk.load: a .npy file, or raw binary given
        dtype and shape and offset), and binds it as key on every engine of
        the view, each with a read-only view of its node's copy. The file
        is read on each node: by this client for the engines of its own
        node, by one engine on each other node. Raises what the load
        raises (ValueError for a file that is not a loadable .npy,
        EOFError for a short one, FileNotFoundError, IsADirectoryError;
        from another node, as a RemoteError). Returns an AsyncResult (get()
        gives one None per engine), or None when blocking. io: options of
        shoal.bulk.load (depth, chunk, uring, direct, register)."""
        from . import bulk
        view = self._view(targets)
        engines = view._targets
        client = self.client
        kwargs = dict(dtype=dtype, shape=shape, offset=offset, **io)
        what = {}
        here = [e for e in engines if client._on_this_node(e)] if client.arena is not None else []
        if here:
            a = bulk.load(path, arena=client.arena, **kwargs)  # pushed by reference: no copy
            what.update((e, a) for e in here)
        nodes = {}
        for e in engines:
            if e not in what:
                nodes.setdefault(client._node_of(e), []).append(e)
        # One engine of each other node loads it (all at once) and holds it
        # until every engine of its node has its view; the others view its block.
        token = f"{os.getpid()}-{next(_load_tokens)}"
        loads = {es[0]: client[es[0]].apply_async(bulk._load_on_engine, key, str(path), kwargs, token)
                 for es in nodes.values()}
        try:
            for es in nodes.values():
                ref = bulk.ArenaRef(*loads[es[0]].get())
                what.update((e, ref) for e in es)
            ar = client._submit(engines, {"kind": "push"}, None, each=[{key: what[e]} for e in engines])
        except BaseException:
            for loader in loads:
                client[loader].apply_async(bulk._let_go, token)
            raise
        ar._fname = "load"
        if loads:
            ar.add_done_callback(lambda _: [client[loader].apply_async(bulk._let_go, token) for loader in loads])
        if self._block(block):
            ar.get()
            return None
        return ar

    def gather(self, key, dist="b", targets=None, block=None):
        """Pulls key from every engine and joins the parts (the inverse of
        scatter): arrays are concatenated, lists and tuples joined into one
        list, anything else returned as a list of the parts."""
        view = self._view(targets)
        _check_dist(dist)
        ar = self.client._submit(view._targets, {"kind": "pull", "names": [key], "single": True}, None,
                                 make=lambda c, mid, t, k: AsyncMapResult(c, mid, t, k, lambda v: _join(v, dist, c.arena)))
        ar._fname = "gather"
        return ar.get() if self._block(block) else ar

    def map(self, f, *sequences, block=None, track=False, return_exceptions=False):
        """f over the sequences' items, split in one block per engine (as
        scatter splits them); the result joins the blocks in order.
        return_exceptions=True puts an engine's error in place of each item
        of its block instead of raising it."""
        return self._chunked(_map_chunk, f, sequences, block, "map", return_exceptions)

    def _chunked(self, runner, f, sequences, block, what, return_exceptions=False):
        """runner(f, *chunks) on each engine with its block of the sequences."""
        if not sequences:
            raise ValueError(f"{what} needs at least one sequence")
        # An iterator or a generator is taken whole first, as ipyparallel does.
        sequences = [s if hasattr(s, "__len__") and hasattr(s, "__getitem__") else list(s) for s in sequences]
        n = len(self._targets)
        chunks = [[_partition(s, i, n, "b") for s in sequences] for i in range(n)]
        work = [(e, c) for e, c in zip(self._targets, chunks) if len(c[0])]
        if not work:
            return [] if self._block(block) else _done_map(self.client)
        each = [(runner, (f, *c), {}) for _, c in work]
        arena = self.client.arena
        join = _flatten if runner is _map_chunk else (lambda values: _join(values, "b", arena))
        ar = self.client._submit([e for e, _ in work], {"kind": "apply"}, None, each=each,
                                 make=lambda c, mid, t, k: AsyncMapResult(c, mid, t, k, join))
        ar._fname = getattr(f, "__name__", what)
        ar._return_exceptions = return_exceptions
        ar._part_lens = {e: len(c[0]) for e, c in work}
        return ar.get() if self._block(block) else ar

    def parallel(self, dist="b", block=None):
        """Decorator: f(seq) calls f on each engine with its block of seq and
        joins what they return; f.map(seq) maps f over seq's items."""
        if dist != "b":
            raise ValueError("a DirectView's parallel functions split sequences in blocks (dist='b')")

        def deco(f):
            return ParallelFunction(self, f, block=block)
        return deco

    def remote(self, block=None):
        """Decorator: calling f runs it on every engine of the view."""
        def deco(f):
            return RemoteFunction(self, f, block=block)
        return deco

    def map_sync(self, f, *sequences, **kw):
        return self.map(f, *sequences, block=True, **kw)

    def map_async(self, f, *sequences, **kw):
        return self.map(f, *sequences, block=False, **kw)

    @contextlib.contextmanager
    def sync_imports(self, local=True, quiet=False):
        """Within the with block, each import also runs on the engines:

            with dv.sync_imports():
                import numpy

        (local=False: only on the engines). Imports below the block's own
        level (those the imported modules make) are left alone."""
        frame = sys._getframe(2)  # the with statement's frame (past contextmanager)
        real_import = builtins.__import__

        def view_import(name, globals=None, locals=None, fromlist=(), level=0):
            if sys._getframe(1) is not frame or level:
                return real_import(name, globals, locals, fromlist, level)
            code = f"from {name} import {', '.join(fromlist)}" if fromlist else f"import {name}"
            if not quiet:
                print(f"importing {', '.join(fromlist) + ' from ' if fromlist else ''}{name} on engine(s)")
            self.execute(code, block=True)
            return real_import(name, globals, locals, fromlist, level) if local else None

        builtins.__import__ = view_import
        try:
            yield
        finally:
            builtins.__import__ = real_import

    @property
    def importer(self):
        """sync_imports(local=True), as a property: `with view.importer: import numpy`."""
        return self.sync_imports(True)

    def __setitem__(self, name, value):
        """view['x'] = value: push (a name, or an attribute or item: 'a.b', 'a[0]')."""
        self.push({name: value}, block=True)

    def __getitem__(self, name):
        """view['x']: pull (a name, or any expression: 'a.b')."""
        return self.pull(name, block=True)


def _check_dist(dist):
    if dist not in ("b", "r"):
        raise ValueError(f"dist must be 'b' (blocks) or 'r' (round robin), not {dist!r}")


def _partition(seq, p, q, dist):
    """Part p of q of seq, as ipyparallel's Map and RoundRobinMap cut it."""
    if dist == "r":
        try:
            return seq[p::q]
        except TypeError:
            return list(itertools.islice(seq, p, None, q))
    n = len(seq)
    base, remainder = divmod(n, q)
    low = p * (base + 1) if p < remainder else p * base + remainder
    high = low + base + (1 if p < remainder else 0)
    try:
        return seq[low:high]
    except TypeError:
        return list(itertools.islice(seq, low, high))


def _join(parts, dist, arena=None):
    """ipyparallel's joinPartitions: arrays concatenated, lists and tuples
    joined (ranges too: ipyparallel would return the parts). A large joined
    array goes into arena when there is one (see _concatenate)."""
    first = parts[0] if parts else None
    if dist == "r" and isinstance(first, (list, tuple, range, np.ndarray)):
        out = [p[i] for i in range(max(len(p) for p in parts)) for p in parts if len(p) > i]
        return np.array(out) if isinstance(first, np.ndarray) else out
    if isinstance(first, np.ndarray):
        return _concatenate(parts, arena)
    if isinstance(first, (list, tuple, range)):
        return _flatten(parts)
    return parts


def _concatenate(parts, arena):
    """np.concatenate(parts), into a new block of the node's arena if the
    result is large (serialize.THRESHOLD) and arena is not None.

    The agent keeps freed arena memory committed (--retain), so a gather
    into the arena writes pages that are already there, where a fresh
    private array of 1 GiB faults in new ones: 0.1 s on pages the host backs,
    2.4 s on pages it took back (docs/arena.md, "Fresh memory on a VM"). The
    result is also in the arena already when it is pushed or scattered
    again. The parts are copied in threads. Falls back to np.concatenate
    when the arena is full or the parts are not plain arrays of one shape."""
    if arena is not None and len(parts) > 1 and all(type(p) is np.ndarray and p.ndim >= 1 for p in parts) \
            and all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        dtype = np.result_type(*parts)
        rows = sum(len(p) for p in parts)
        if not dtype.hasobject and rows * int(np.prod(parts[0].shape[1:])) * dtype.itemsize >= serialize.THRESHOLD:
            try:
                out = arena.empty((rows,) + parts[0].shape[1:], dtype=dtype)
            except (MemoryError, OSError):
                return np.concatenate(parts)  # the arena is full: private memory will do
            lo = 0
            for p in parts:
                hi = lo + len(p)
                if p.dtype == dtype and p.flags.c_contiguous:
                    _core.copy(out[lo:hi], p)
                else:
                    out[lo:hi] = p
                lo = hi
            return out
    return np.concatenate(parts)


_flatten = _flat  # a map's parts joined; AsyncMapResult yields them as they arrive


def _map_chunk(f, *chunks):
    """Runs on an engine: one block of a DirectView.map."""
    return list(map(f, *chunks))


_load_tokens = itertools.count()  # DirectView.load's, one per load of this process


def _shared(client, seq):
    """seq, in the node's arena if it is a large numpy array that is not there
    yet: parts of it then reach the engines as views of one block. A
    memmap stays itself (its parts go by reference to its file), and so
    does a shared array (its parts are views of where it lives)."""
    arena = client.arena
    if arena is None or not isinstance(seq, np.ndarray) or seq.dtype.hasobject or seq.ndim == 0 \
            or seq.nbytes < serialize.THRESHOLD or serialize._owner_block(seq) is not None \
            or isinstance(seq, serialize.SharedArray) or _arrays._mapping(seq) is not None:
        return seq
    whole = arena.empty(seq.shape, dtype=seq.dtype)
    _core.copy(whole, np.ascontiguousarray(seq))
    return whole


def _done_map(client):
    """The result of a map of nothing: finished from the start."""
    ar = AsyncMapResult(client, None, [], "map", _flatten)
    ar._resolve()
    return ar


# ---- load balancing -------------------------------------------------------------------

class LoadBalancedView(_View):
    """Runs each task on whichever engine is free, as ipyparallel's
    LoadBalancedView does, without a round trip to the controller per task.

    When every engine of the view is on the client's node, tasks go into a
    pool in the node's arena, a queue that each engine takes from when it is
    idle (docs/engine.md, "Pools"): no task waits behind a long one while
    another engine has nothing to do. A map keeps ``POOL_DEPTH`` tasks per
    engine in the pool while it has more. Otherwise (engines on other nodes,
    ``lanes=False``, a task that must follow another or is retried) the
    client hands each task to the engine with the fewest of its tasks: while
    plenty of a map is left, each engine has ``IN_FLIGHT`` of its tasks at
    once (one running, the next waiting on its ring), towards the end one
    each. While a map has work left, a thread of the client hands it out
    even when nobody waits.
    """

    IN_FLIGHT = 2
    POOL_DEPTH = 4
    TARGET_TASK_SECONDS = 0.01  # a map's tasks, when it sizes them (chunksize=None)
    MAX_CHUNK = 1 << 16  # items in one such task, at most
    GROWTH = 8  # such a task has at most this many times the items of the largest finished one
    _flag_names = ("targets", "block", "retries", "timeout", "after", "follow")

    def __init__(self, client, targets=None, block=False):
        self.client = client
        self.targets = targets
        self.block = block
        self.retries = 0  # times a failed task is sent again (to another engine if there is one)
        self.timeout = None  # seconds a task may wait for its dependencies (TaskTimeout after)
        self.after = None  # tasks that must finish first (Dependency, AsyncResults, msg_ids)
        self.follow = None  # tasks whose engines it must run on
        self.history = History(client.history_limit)  # msg_ids of the tasks this view sent (the latest)

    def __len__(self):
        """How many engines it may run on."""
        return len(self._engines())

    @property
    def executor(self):
        """A concurrent.futures.Executor on this view (Client.executor)."""
        from .futures import ViewExecutor
        return ViewExecutor(self)

    def __repr__(self):
        return f"<LoadBalancedView {self.targets}>"

    set_flags = DirectView.set_flags
    temp_flags = DirectView.temp_flags

    def _engines(self):
        ids = self.client.ids
        if self.targets is None:
            return ids
        chosen = [self.targets] if isinstance(self.targets, int) else list(self.targets)
        return [e for e in chosen if e in ids]

    def _load_balanced(self):
        return self

    def _direct(self):
        """A DirectView of this view's engines, blocking as this one does."""
        return DirectView(self.client, self._engines(), block=self.block)

    def _least_loaded(self):
        engines = self._engines()
        if not engines:
            raise ValueError("this view has no engines to run on")
        load = self.client._lb_load
        return min(engines, key=lambda e: load.get(e, 0))

    def _pool(self, engines=None):
        """The client's pool for engines (default: this view's), or None."""
        return self.client._pool(self._engines() if engines is None else engines)

    def _apply_pooled(self, pool, f, args, kwargs):
        """Puts one task in pool; its AsyncResult, or None if the pool is full."""
        ar = self.client._pool_submit(pool, {"kind": "apply"}, (f, args, kwargs))
        if ar is not None:
            ar._single = True
            ar._fname = getattr(f, "__name__", "apply")
        return ar

    def _apply_on(self, engine, f, args, kwargs):
        """Submits one task to engine, counting it in the engine's load."""
        load = self.client._lb_load
        load[engine] = load.get(engine, 0) + 1
        ar = self.client._submit([engine], {"kind": "apply"}, (f, args, kwargs))
        ar._single = True
        ar._fname = getattr(f, "__name__", "apply")

        def unload(_):
            load[engine] -= 1
        ar._on_done(unload)
        return ar

    def apply(self, f, /, *args, **kwargs):
        """Runs f(*args, **kwargs) on the least loaded engine, once its
        dependencies (after, follow) are met: a TaskResult, or its value
        when blocking."""
        from .dependency import TaskResult, _Depends
        if not self._engines():
            raise ValueError("this view has no engines to run on")
        if not self.after and not self.follow and not self.retries and not isinstance(f, _Depends):
            # Nothing to wait for, to send again or to send elsewhere (an
            # unmet @depend): straight into the pool, with no TaskResult
            # around it (the pool's AsyncResult is the task's, abort included).
            pool = self._pool()
            if pool is not None:
                with self.client._lock:
                    ar = self._apply_pooled(pool, f, args, kwargs)
                if ar is not None:
                    self._sent(ar)
                    return ar.get() if self.block else ar
        with self.client._lock:
            ar = TaskResult(self, f, args, kwargs, after=self.after, follow=self.follow, timeout=self.timeout,
                            retries=self.retries)
            ar._tick()
            if ar._has_work():
                self.client._drive(ar)
        self._sent(ar)
        return ar.get() if self.block else ar

    def apply_async(self, f, /, *args, **kwargs):
        with self.temp_flags(block=False):
            return self.apply(f, *args, **kwargs)

    def apply_sync(self, f, /, *args, **kwargs):
        with self.temp_flags(block=True):
            return self.apply(f, *args, **kwargs)

    def map(self, f, *sequences, block=None, chunksize=None, ordered=True, return_exceptions=False):
        """f over the sequences' items, each task on whichever engine is free.
        Returns an AsyncMapResult-like object (get() the list of results,
        one per item; iterate to take them as they come: in order, or as
        they finish with ordered=False). return_exceptions=True puts a
        task's error in place of each of its items instead of raising.

        chunksize items go in one task. Unlike ipyparallel (default 1), the
        default None sizes tasks as the map goes: one item each at first,
        then as many as take about TARGET_TASK_SECONDS of an engine's time,
        judged from the engines' own time per item on the tasks that came
        back, and never more than GROWTH times the largest of those, so
        that tiny items are not each a task of their own while long ones
        stay one per task.

        A blocking map hands its tasks out from the waiting thread; one
        that is not (or whose wait is cut short, as by Ctrl-C) from a
        thread of the client's, so that it goes on while nobody waits."""
        return self._map(_star_chunk, f, sequences, block=block, chunksize=chunksize, ordered=ordered,
                         return_exceptions=return_exceptions)

    def _map(self, runner, f, sequences, block=None, chunksize=None, ordered=True, return_exceptions=False):
        if not sequences:
            raise ValueError("map needs at least one sequence")
        if chunksize is not None and (not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1):
            raise ValueError(f"chunksize must be an int of at least 1 (or None: sized as the map goes), "
                             f"not {chunksize!r}")
        if runner is _call_chunk and chunksize is None:
            chunksize = 1  # f sees the parts: their size is not ours to choose
        columns = [s if isinstance(s, (list, tuple, range, np.ndarray)) else list(s) for s in sequences]
        result = self._sent(LoadBalancedMapResult(self, f, columns, ordered, runner, return_exceptions, chunksize))
        if not (self.block if block is None else block):
            result._start(drive=True)
            return result
        # The caller waits, and so hands out the tasks as earlier ones
        # finish: no thread of the client's to do it (it would only take
        # the lock from the caller), unless the wait is cut short.
        result._start(drive=False)
        try:
            return result.get()
        except BaseException:
            if not result._done():
                self.client._drive(result)  # the map goes on, as it does in ipyparallel
            raise

    def map_sync(self, f, *sequences, **kw):
        return self.map(f, *sequences, block=True, **kw)

    def map_async(self, f, *sequences, **kw):
        return self.map(f, *sequences, block=False, **kw)

    def imap(self, f, *sequences, ordered=True, max_outstanding="auto", return_exceptions=False, chunksize=None):
        """Iterates over f's results on the sequences' items as they become
        available (in order, or as they finish with ordered=False).

        Sequences whose length is known, with max_outstanding "auto", go
        as one map (its tasks sized as map sizes them). Otherwise, as
        ipyparallel's imap: the sequences (iterators, generators, endless
        ones) are read as results are taken, one task per item, with
        max_outstanding tasks out at most ("auto": one per engine; 0: read
        them all at once). return_exceptions=True yields a task's error in
        place of its result. The iterator's cancel() stops submitting."""
        if not sequences:
            raise ValueError("imap needs at least one sequence")
        sized = all(isinstance(s, (list, tuple, range, np.ndarray)) for s in sequences)
        if sized and max_outstanding == "auto":
            return _Iterated(self.map(f, *sequences, block=False, ordered=ordered, chunksize=chunksize,
                                      return_exceptions=return_exceptions))
        if max_outstanding == "auto":
            max_outstanding = max(len(self), 1)
        return _LazyMap(self, f, zip(*sequences), ordered, max_outstanding, return_exceptions)

    def parallel(self, block=None, chunksize=None, ordered=True):
        """Decorator: f.map(seq) (or f(seq)) maps f over seq on this view.
        f(seq) calls f with parts of chunksize items (default 1); f.map
        sizes its tasks as map does."""
        def deco(f):
            return ParallelFunction(self, f, block=block, chunksize=chunksize, ordered=ordered)
        return deco

    def remote(self, block=None):
        """Decorator: calling f runs it on an engine of this view."""
        def deco(f):
            return RemoteFunction(self, f, block=block)
        return deco


def _star_chunk(f, *columns):
    """Runs on an engine: one task of a load-balanced map, f over its items."""
    return list(map(f, *columns))


class _Bounds:
    """(low, high) of each chunk of a map, in order, as a list of them
    reads: chunks are handed out one after another, so each starts where
    the one before ended, and one array of the ends is enough (8 bytes a
    chunk; a tuple of two ints was 100)."""

    __slots__ = ("ends",)

    def __init__(self):
        self.ends = array.array("q", [0])

    def __len__(self):
        return len(self.ends) - 1

    def __getitem__(self, i):
        n = len(self.ends) - 1
        if i < 0:  # from the end, as a list reads
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.ends[i], self.ends[i + 1]

    def append(self, chunk):
        low, high = chunk
        if low != self.ends[-1]:
            raise ValueError(f"chunk {chunk} does not start where the last ended ({self.ends[-1]})")
        self.ends.append(high)


class _Ran:
    """What a load-balanced map keeps of each of its tasks that finished:
    its metadata and output, not its AsyncResult (which held 2-3 KiB more
    a task: a map of a million items with chunksize=1 held gigabytes)."""

    __slots__ = ("msg_id", "engine", "submitted", "meta", "stdout", "stderr")

    _NO_REPLY = {}  # the meta of a task that failed with no reply (never written)

    def __init__(self, ar, engine):
        self.msg_id, self.engine, self.submitted = ar.msg_id, engine, ar._submitted
        self.meta = ar._meta.get(engine, self._NO_REPLY)
        self.stdout, self.stderr = ar._stdout.get(engine, ""), ar._stderr.get(engine, "")

    def metadata(self):
        """ipyparallel's metadata dict of the task."""
        return _metadata(self.msg_id, self.engine, self.submitted, self.meta, self.stdout, self.stderr)


class LoadBalancedMapResult(AsyncMapResult):
    """The pending result of LoadBalancedView.map: an AsyncMapResult (and
    so a concurrent.futures.Future) over the map's tasks.

    The items are handed out in order, in chunks: chunk i covers items
    self._chunks[i] = (low, high). With a chunksize, every chunk has that
    many items; without, _chunk_size picks each chunk's size as it goes.
    """

    def __init__(self, view, f, columns, ordered, runner=None, return_exceptions=False, chunksize=None):
        _Future.__init__(self, view.client)  # not AsyncResult's: the map's own record, below
        self._view = view
        self.msg_id = next(self._client._lane_ids)  # the map's own id (each task has its own too)
        self._client._by_id[self.msg_id] = self  # found by it (wait, abort, get_result) while held
        self.task_id = None
        self._single = False
        self._kind = "map"
        self._callbacks = []
        self._f, self._ordered = f, ordered
        self._f_sent = serialize.pickled_once(f)  # the same bytes in every task
        self._columns = columns  # one per sequence, each sliceable
        self._n = min(len(c) for c in columns)  # items: as zip, the shortest sequence's length
        self._chunksize = chunksize
        self._runner = runner or _star_chunk
        self._return_exceptions = return_exceptions
        self._fname = getattr(f, "__name__", "map")
        self._chunks = _Bounds()  # (low, high) of each chunk handed out (or aborted), in item order
        self._next = 0  # the next item to hand out
        self._items_done = 0  # items whose chunk has finished
        self._results = {}  # chunk index -> (ok, values or exception)
        self._finish_order = array.array("q")  # chunk indices as they finished (8 bytes each)
        self._inflight = {}  # engine id -> chunks of this map it has (handed to it)
        self._pooled = 0  # chunks of this map in the client's pool, taken or not
        self._attempts = {}  # chunk index -> (its AsyncResult, its engine or None: the pool) while it runs
        self._ran = {}  # chunk index -> what its finished task told (a _Ran): its metadata
        self._busy = 0.0  # seconds the engines spent on the chunks finished so far (their own clocks)
        self._items_timed = 0  # items of those chunks
        self._largest_timed = 0  # items of the largest of them
        self._ramping = False  # the last chunk was kept smaller by GROWTH than its items' cost would make it
        self._submitted = time.time()

    def __repr__(self):
        return f"<AsyncMapResult: {'finished' if self._done() else self._fname}>"

    def _start(self, drive):
        """Hands out the first chunks; drive: the rest from the client's
        thread, as earlier ones finish, even while nobody waits. Either
        way the client knows of the map (close() and abort() reach it)."""
        with self._client._lock:
            self._fill()
            if self._has_work():
                self._client._drive(self, thread=drive)
            elif self._done():
                self._resolve()  # no items

    def _chunk_size(self, engines):
        """Items in the next chunk. Fixed with a chunksize. Without: one
        until a chunk has finished; then as many as take an engine about
        TARGET_TASK_SECONDS, where an item is taken to cost what the
        engines spent on the finished chunks per item, by their own clocks
        (from the start of each task to its end, a task's fixed cost
        included: an over-estimate for small chunks, so chunks grow from
        small ones). Never more than GROWTH times the largest chunk that
        has finished: the evidence for the items' cost is that many items.
        Towards the end, no more than half an engine's share of what is
        left (but not under an eighth of the size wanted, nor over half an
        engine's share of the whole map), so that the last chunks are short
        and no engine works on alone while the others wait."""
        left = self._n - self._next
        if self._chunksize is not None:
            return min(self._chunksize, left)
        if not self._items_timed:
            return 1
        per_item = self._busy / self._items_timed
        want = int(LoadBalancedView.TARGET_TASK_SECONDS / per_item) if per_item > 0 else left
        self._ramping = want > LoadBalancedView.GROWTH * self._largest_timed
        want = min(want, LoadBalancedView.GROWTH * self._largest_timed)
        share = min(max(-(-left // (2 * len(engines))), want // 8), -(-self._n // (2 * len(engines))))
        return max(1, min(want, share, left, LoadBalancedView.MAX_CHUNK))

    def _fill(self):
        """Hands out chunks until every engine has its share in flight: two
        each while plenty is left, so that an engine finds its next chunk
        waiting; one each towards the end, so that no chunk waits behind a
        long one while another engine has nothing to do."""
        engines = self._view._engines()
        if not engines:
            if self._has_work() and self._view.targets is not None:
                # Every engine the view names has left the registry (died,
                # or was stopped): none of them takes the rest, ever (a new
                # engine has a new id). Without this the map waited for
                # ever (found by `shoal bench soak`). A view of every
                # engine (targets=None) waits for new ones, as ipyparallel's
                # scheduler does.
                self._chunks.append((self._next, self._n))
                self._next = self._n
                self._chunk_finished(len(self._chunks) - 1, (False, EngineError(
                    f"{self._n - self._chunks[-1][0]} item(s) of map {self._fname} were never sent: every engine "
                    f"of its load-balanced view ({self._view.targets}) has stopped running")))
                self._handed_all()
            return
        pool = self._view._pool(engines) if self._has_work() else None
        if pool is not None:
            # Engines take from the pool when idle: keep enough there that
            # none waits for the client, and no more (an abort, or a new
            # engine, still finds the rest here).
            while self._has_work() and self._pooled < self._depth(LoadBalancedView.POOL_DEPTH) * len(engines):
                if not self._hand_out(None, engines, pool):
                    break  # full: the rest goes one engine each
            else:
                return
        while self._has_work():
            left = self._n - self._next
            limit = self._depth(LoadBalancedView.IN_FLIGHT) if left > len(engines) else 1
            engine = min(engines, key=lambda e: self._inflight.get(e, 0))
            if self._inflight.get(engine, 0) >= limit:
                return
            self._hand_out(engine, engines)

    def _depth(self, depth):
        """Tasks an engine may have waiting for it: depth; one while chunks
        are smaller than their items' cost calls for (nothing known yet, or
        growing from what is), as more would only be more of those."""
        sized = self._chunksize is not None or (self._items_timed and not self._ramping)
        return depth if sized else 1

    def _hand_out(self, engine, engines, pool=None):
        """Sends the next chunk to engine, or into pool; False if the pool was full."""
        low = self._next
        high = low + self._chunk_size(engines)
        parts = [c[low:high] for c in self._columns]
        if self._runner is _call_chunk:
            parts = [list(p) for p in parts]  # f(seq) gets lists, as in ipyparallel
        args = (self._f_sent, *parts)
        i = len(self._chunks)
        try:
            if pool is not None:
                ar = self._view._apply_pooled(pool, self._runner, args, {})
                if ar is None:
                    return False
            else:
                ar = self._view._apply_on(engine, self._runner, args, {})
        except Exception as e:  # e.g. an item that cannot be pickled: that task fails, the map goes on
            self._chunks.append((low, high))
            self._next = high
            self._chunk_finished(i, (False, e))
            return True
        self._chunks.append((low, high))
        self._next = high
        if pool is not None:
            self._pooled += 1
        else:
            self._inflight[engine] = self._inflight.get(engine, 0) + 1
        self._attempts[i] = (ar, engine)
        if not self._has_work():
            self._handed_all()
        ar._on_done(lambda ar, i=i, engine=engine: self._chunk_done(i, engine, ar))
        return True

    def _handed_all(self):
        """Every item is handed out: the client need not drive this map
        (unless a Future's waiter waits for it)."""
        if not self._wanted:
            with contextlib.suppress(ValueError):
                self._client._driven.remove(self)

    def _chunk_finished(self, i, result):
        low, high = self._chunks[i]
        self._results[i] = result
        self._items_done += high - low
        self._finish_order.append(i)
        if self._done():
            self._resolve()
            if self._callbacks:
                self._client._due.append(self)  # run by the client once it has taken what arrived

    def abort(self):
        """Aborts the chunks that have not started: those still held by the
        client, and those queued on an engine (see Client.abort)."""
        with self._client._lock:
            if self._has_work():
                self._chunks.append((self._next, self._n))
                self._next = self._n
                self._chunk_finished(len(self._chunks) - 1,
                                     (False, TaskAborted(f"a task of map {self._fname} was aborted")))
                self._handed_all()
            # A copy: an abort through the controller receives, and a chunk
            # that finishes meanwhile leaves _attempts.
            for ar, _ in list(self._attempts.values()):
                self._client._abort_sent(ar)

    _abort = abort

    def _chunk_done(self, i, engine, ar):
        """Chunk i's task has finished. Its result is taken first, and only
        once: cut short (a Ctrl-C in the waiting thread), this is called
        again by _tick, and the map still ends."""
        if i not in self._results:
            target = engine if engine is not None else ar._targets[0]  # a pool task: where it ran
            self._chunk_finished(i, ar._results[target])
            self._ran[i] = _Ran(ar, target)
            raw = ar._meta.get(target, {})
            # Only a task that ran its items tells what they cost (an
            # aborted one, or one that failed early, ran few or none).
            if raw.get("status") == "ok" and raw.get("started") and raw.get("completed"):
                items = self._chunks[i][1] - self._chunks[i][0]
                self._busy += max(raw["completed"] - raw["started"], 0.0)
                self._items_timed += items
                self._largest_timed = max(self._largest_timed, items)
        if self._attempts.pop(i, None) is not None:
            if engine is None:
                self._pooled -= 1
            else:
                self._inflight[engine] -= 1
        self._fill()

    def _tick(self):
        """From the client's thread (under its lock): takes the results of
        chunks whose callback never ran (cut short by a Ctrl-C), and hands
        out what it can."""
        for i, (ar, engine) in list(self._attempts.items()):
            if ar._done() and not ar._callbacks and ar not in self._client._due:
                self._chunk_done(i, engine, ar)
        self._fill()

    def _has_work(self):
        return self._next < self._n

    def _ending(self):
        """(succeeded, engines): every task of it succeeded; where they ran."""
        return all(ok for ok, _ in self._results.values()), {r.engine for r in self._ran.values()}

    @property
    def metadata(self):
        """Each finished task's metadata, in chunk order."""
        return [r.metadata() for r in self._tasks()]

    @property
    def wall_time(self):
        if not self.ready():
            raise TimeoutError(f"the result of {self._fname} is not ready yet")
        received = [r.meta["received"] for r in self._ran.values() if r.meta.get("received")]
        return max(received, default=self._submitted) - self._submitted

    @property
    def serial_time(self):
        if not self.ready():
            raise TimeoutError(f"the result of {self._fname} is not ready yet")
        return sum(m["completed"] - m["started"] for m in (r.meta for r in self._ran.values())
                   if m.get("completed") and m.get("started"))

    @property
    def _targets(self):  # for wait_interactive: one "target" per item
        return range(self._n)

    @property
    def progress(self):
        """How many items have been done (their tasks have finished)."""
        self.ready()
        return self._items_done

    def _done(self):
        return self._next >= self._n and len(self._results) >= len(self._chunks)

    def __len__(self):
        """The number of items."""
        return self._n

    def get(self, timeout=-1, return_exceptions=None, return_when=None):
        """The results, one per item (see map). return_exceptions: as the
        map was told, unless given; return_when=FIRST_EXCEPTION raises a
        task's error as soon as it has arrived."""
        if return_when == concurrent.futures.FIRST_EXCEPTION and not self._return_exceptions:
            deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
            while not self._done() and self._error() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._client._receive(0.1 if deadline is None else max(min(deadline - time.monotonic(), 0.1), 0))
            if self._error() is not None:
                raise self._error()
        if not self.wait(timeout):
            raise TimeoutError(f"map of {self._fname} did not finish within {timeout} s "
                               f"({self._items_done} of {self._n} items done)")
        return self._value(self._return_exceptions if return_exceptions is None else return_exceptions)

    def _value(self, return_exceptions):
        out = []
        for i in (range(len(self._chunks)) if self._ordered else self._finish_order):
            out.extend(self._values(i, return_exceptions))  # a chunk at a time: not an item at a time
        return out

    def _error(self, return_exceptions=None):
        """The first failed task's error (in item order) among those that
        have finished, as get() raises it (None with return_exceptions)."""
        if self._return_exceptions if return_exceptions is None else return_exceptions:
            return None
        return next((v for ok, v in (self._results[i] for i in sorted(self._results)) if not ok), None)

    def split(self):
        """(self,): a map's tasks are made as it goes, so it is waited for whole."""
        return (self,)

    def __getitem__(self, key):
        """An int or a slice: those items of get() (once ready); a str:
        that field of each task's metadata."""
        if isinstance(key, str):
            self.ready()
            return [m[key] for m in self.metadata]
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            if not self.ready():
                raise TimeoutError("the result is not ready")
            return self.get(0)[key]
        raise TypeError(f"a map's result is read by int, slice or str, not {type(key).__name__}")

    def _tasks(self):
        """What each task that ran told (a _Ran), in item order."""
        return [self._ran[i] for i in sorted(self._ran)]

    @property
    def msg_ids(self):
        """The msg_ids of the map's tasks, in item order."""
        return [r.msg_id for r in self._tasks()]

    @property
    def engine_id(self):
        """The engine of each task, in item order."""
        return [r.engine for r in self._tasks()]

    @property
    def stdout(self):
        return [r.stdout for r in self._tasks()]

    @property
    def stderr(self):
        return [r.stderr for r in self._tasks()]

    @property
    def outputs(self):
        return [r.meta.get("outputs", []) for r in self._tasks()]

    def get_dict(self, timeout=-1):
        """{engine id: its task's result}, as ipyparallel's: only when no
        engine ran more than one of the map's tasks (ValueError if one
        did). A task of one item gives that item; of several, their list."""
        self.get(timeout)
        out = {}
        for i in sorted(self._ran):
            engine = self._ran[i].engine
            if engine in out:
                raise ValueError(f"cannot build a dict of engine ids: engine {engine} ran more than one "
                                 f"of this map's {len(self._ran)} tasks")
            values = self._values(i)
            out[engine] = values[0] if len(values) == 1 else values
        return out

    def _values(self, i, return_exceptions=None):
        """The values of finished chunk i, one per item (raises its error,
        unless return_exceptions: as the map was told, unless given)."""
        ok, value = self._results[i]
        if not ok and not (self._return_exceptions if return_exceptions is None else return_exceptions):
            raise value
        if not ok:
            low, high = self._chunks[i]
            return [value] * (high - low)
        if self._runner is _call_chunk and not isinstance(value, (list, tuple)):
            return [value]  # f(part) gave one value: joined as a list of them
        return value

    def __iter__(self):
        """The results, one per item: in order, or as they finish (ordered=False)."""
        k = 0  # chunks yielded
        while True:
            order = range(len(self._chunks)) if self._ordered else self._finish_order
            while k < len(order) and order[k] in self._results:
                yield from self._values(order[k])
                k += 1
            if self._done() and k >= len(self._results):
                return
            self._client._receive(0.1)


class LazyMapIterator:
    """What LoadBalancedView.imap (and its executor's map) returns, as
    ipyparallel's: an iterator over the results, whose cancel() stops it."""

    def __iter__(self):
        return self

    def cancel(self):
        raise NotImplementedError


class _Iterated(LazyMapIterator):
    """A map's results, as a LazyMapIterator."""

    def __init__(self, result):
        self.result, self._it = result, iter(result)

    def __next__(self):
        return next(self._it)

    def cancel(self):
        """Aborts what of the map has not started."""
        if not self.result._done():
            self.result.abort()


class _LazyMap(LazyMapIterator):
    """LoadBalancedView.imap over sequences read as it goes: one task per
    item, at most max_outstanding out (0: no limit), submitted as results
    are taken."""

    def __init__(self, view, f, items, ordered, max_outstanding, return_exceptions):
        self.view, self.items = view, items
        self.f = serialize.pickled_once(f)  # the same bytes in every task
        self.ordered, self.limit = ordered, max_outstanding
        self.return_exceptions = return_exceptions
        self.out = collections.deque()  # AsyncResults submitted, not yet yielded
        self.exhausted = False

    def _top_up(self):
        while not self.exhausted and (self.limit <= 0 or len(self.out) < self.limit):
            try:
                args = next(self.items)
            except StopIteration:
                self.exhausted = True
                break
            self.out.append(self.view.apply_async(self.f, *args))  # a Pickled f is f itself on the engine

    def __next__(self):
        self._top_up()
        if not self.out:
            raise StopIteration
        if self.ordered:
            ar = self.out.popleft()
        else:
            done, _ = concurrent.futures.wait(list(self.out), return_when=concurrent.futures.FIRST_COMPLETED)
            ar = next(a for a in self.out if a in done)
            self.out.remove(ar)
        try:
            value = ar.get()
        except Exception as e:
            if not self.return_exceptions:
                raise
            value = e
        self._top_up()  # the next items go out before the caller works on this one
        return value

    def cancel(self):
        """Submits nothing more; aborts what was submitted and has not started."""
        self.exhausted = True
        pending = [ar for ar in self.out if not ar._done()]
        if pending:
            self.view.client.abort(pending)


class ParallelFunction:
    """What @view.parallel() makes, as in ipyparallel: f(seq) calls f with
    parts of seq (a DirectView: one block per engine; a LoadBalancedView:
    chunksize items a task) and joins what the calls return; f.map(seq)
    maps f over seq's items."""

    def __init__(self, view, f, block=None, chunksize=None, ordered=True, **flags):
        self.view, self.func, self.block = view, f, block
        self.chunksize, self.ordered = chunksize, ordered
        self.flags = flags  # view flags (targets, after, retries...) for each call
        functools.update_wrapper(self, f, updated=())  # not f.__dict__: it would overwrite ours
        self.__doc__ = _wrapping_doc(self, f)

    def _kw(self):
        if isinstance(self.view, DirectView):
            return {"block": self.block}
        return {"block": self.block, "chunksize": self.chunksize, "ordered": self.ordered}

    def map(self, *sequences):
        with self.view.temp_flags(**self.flags):
            return self.view.map(self.func, *sequences, **self._kw())

    def __call__(self, *sequences):
        with self.view.temp_flags(**self.flags):
            if isinstance(self.view, DirectView):
                return self.view._chunked(_call_chunk, self.func, sequences, self.block, "parallel")
            return self.view._map(_call_chunk, self.func, sequences, **self._kw())


def _call_chunk(f, *chunks):
    """Runs on an engine: f called with its parts of the sequences."""
    return f(*chunks)


class RemoteFunction:
    """What @view.remote() makes: calling it runs f on the view's engines."""

    def __init__(self, view, f, block=None, **flags):
        self.view, self.func, self.block = view, f, block
        self.flags = flags  # view flags (targets, after, retries...) for each call
        functools.update_wrapper(self, f, updated=())  # not f.__dict__: it would overwrite ours
        self.__doc__ = _wrapping_doc(self, f)

    def __call__(self, *args, **kwargs):
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(block=block, **self.flags):
            return self.view.apply(self.func, *args, **kwargs)


def _wrapping_doc(wrapper, f):
    """The doc of a RemoteFunction or ParallelFunction: what it is, then f's, as ipyparallel's reads."""
    return f"{type(wrapper).__name__} wrapping {getattr(f, '__name__', f)!s}:\n\n{f.__doc__ or ''}"


def require(*objects, **mapping):
    """Decorator: what f needs on the engine, put into f's namespace there
    before each call: modules by name (imported), named objects
    (functions, classes: under their names), and name=object pairs."""
    for m in objects:
        if not isinstance(m, str) and not hasattr(m, "__name__"):
            raise TypeError(f"require takes module names and named objects, not {m!r}")

    def deco(f):
        return _Required(f, objects, mapping)
    return deco


class _Required:
    def __init__(self, f, mods, mapping=None):
        self.func, self.mods, self.mapping = f, mods, dict(mapping or {})
        functools.update_wrapper(self, f, updated=())  # not f.__dict__: it would overwrite ours

    def __call__(self, *args, **kwargs):
        g = getattr(self.func, "__globals__", None)
        if g is None:  # not a plain function: the engine's own namespace
            g = sys.modules["__main__"].__dict__
        for m in self.mods:
            if isinstance(m, str):
                g[m.split(".")[0]] = importlib.import_module(m.split(".")[0])
                importlib.import_module(m)
            else:
                g[m.__name__] = m
        g.update(self.mapping)
        return self.func(*args, **kwargs)


def interactive(f):
    """Decorator: f, sent to an engine, finds its globals in the engine's
    namespace (what execute and push put there), not in the ones it was
    defined with: f is made a function of ``__main__``, as ipyparallel's
    interactive does (see shoal.serialize: functions of ``__main__`` get
    this on their own)."""
    if isinstance(f, types.FunctionType):
        g = types.FunctionType(f.__code__, sys.modules["__main__"].__dict__, f.__name__, f.__defaults__,
                               f.__closure__)
        g.__kwdefaults__, g.__doc__, g.__qualname__ = f.__kwdefaults__, f.__doc__, f.__qualname__
        g.__dict__.update(f.__dict__)
        f = g
    f.__module__ = "__main__"
    return f


class Reference:
    """A name (or any expression) in the engine's namespace, in place of a
    value: an argument of apply (at any depth: in a list, a dict...), the
    function itself, a pushed value, a map's items. The engine uses its
    value there. rc[:].apply_sync(len, Reference('a')) gives each engine's
    len(a); Reference('g[0]') its g[0]."""

    def __init__(self, name):
        if not isinstance(name, str):
            raise TypeError(f"a Reference names a variable or an expression, not {name!r}")
        compile(name, "<Reference>", "eval")  # SyntaxError now, not on every engine
        self.name = name

    def __repr__(self):
        return f"<Reference: {self.name!r}>"

    def __reduce__(self):
        # Unpickled where it runs: the value there.
        return _dereference, (self.name,)


def _dereference(name):
    """The value of name (an expression) in this process's namespace: on an
    engine, the user's (what push and execute put there)."""
    return eval(name, sys.modules["__main__"].__dict__)


def remote(view, block=None, **flags):
    """Decorator, as ipyparallel's: calling f runs it on view (view.remote)."""
    def deco(f):
        return RemoteFunction(view, f, block=block, **flags)
    return deco


def parallel(view, dist="b", block=None, ordered=True, **flags):
    """Decorator, as ipyparallel's: f.map(seq) and f(seq) on view (view.parallel)."""
    def deco(f):
        if isinstance(view, DirectView):
            if dist != "b":
                raise ValueError("a DirectView's parallel functions split sequences in blocks (dist='b')")
            return ParallelFunction(view, f, block=block, **flags)
        return ParallelFunction(view, f, block=block, ordered=ordered, **flags)
    return deco


class BroadcastView(DirectView):
    """Client.broadcast_view(): a DirectView whose tasks go to all its
    engines at once. shoal sends every task for several engines that way
    (one message per node, fanned out by the node's agent), so it differs
    from a DirectView only by name and is_coalescing (accepted, no effect)."""

    is_coalescing = False

    def __repr__(self):
        return f"<BroadcastView {self.targets}>"
