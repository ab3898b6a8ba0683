"""Views of the engines: DirectView and LoadBalancedView, with ipyparallel's
names and behaviour, and the decorators that go with them."""

import builtins
import contextlib
import functools
import importlib
import itertools
import os
import sys
import types

import numpy as np

from . import _arrays, _core, serialize
from ._records import History
from .asyncresult import AsyncMapResult, _flat
from .lbmap import LazyMapIterator, LoadBalancedMapResult, _call_chunk, _Iterated, _LazyMap, _star_chunk  # noqa: F401 (LazyMapIterator: ipyparallel has it here)


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
                self.client._routes.drive(ar)
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
                self.client._routes.drive(result)  # the map goes on, as it does in ipyparallel
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
