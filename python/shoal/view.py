"""Views of the engines: DirectView, with ipyparallel's names and behaviour."""

import builtins
import contextlib
import itertools
import sys

import numpy as np

from . import _core, serialize
from .asyncresult import AsyncMapResult


class DirectView:
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

    @property
    def targets(self):
        return self._targets[0] if self._single else list(self._targets)

    @targets.setter
    def targets(self, targets):
        self._single = isinstance(targets, int)
        # Each engine once, in the order given.
        self._targets = [targets] if self._single else list(dict.fromkeys(targets))

    def __repr__(self):
        return f"<DirectView {self.targets}>"

    def __len__(self):
        return len(self._targets)

    def _view(self, targets):
        return self if targets is None else self.client[targets]

    def _block(self, block):
        return self.block if block is None else block

    def _run(self, meta, obj, block, each=None):
        ar = self.client._submit(self._targets, meta, obj, each=each)
        ar._single = self._single
        return ar.get() if self._block(block) else ar

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

    def apply(self, f, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), None)

    def apply_async(self, f, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), False)

    def apply_sync(self, f, *args, **kwargs):
        return self._run({"kind": "apply"}, (f, args, kwargs), True)

    def execute(self, code, silent=True, targets=None, block=None):
        return self._view(targets)._run({"kind": "execute", "code": code, "silent": silent}, None, block)

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

    def gather(self, key, dist="b", targets=None, block=None):
        """Pulls key from every engine and joins the parts (the inverse of
        scatter): arrays are concatenated, lists and tuples joined into one
        list, anything else returned as a list of the parts."""
        view = self._view(targets)
        _check_dist(dist)
        ar = self.client._submit(view._targets, {"kind": "pull", "names": [key], "single": True}, None,
                                 make=lambda c, mid, t, k: AsyncMapResult(c, mid, t, k, lambda v: _join(v, dist)))
        ar._fname = "gather"
        return ar.get() if self._block(block) else ar

    def map(self, f, *sequences, block=None, track=False, return_exceptions=False):
        """f over the sequences' items, split in one block per engine (as
        scatter splits them); the result joins the blocks in order."""
        if not sequences:
            raise ValueError("map needs at least one sequence")
        n = len(self._targets)
        chunks = [[_partition(s, i, n, "b") for s in sequences] for i in range(n)]
        work = [(e, c) for e, c in zip(self._targets, chunks) if len(c[0])]
        if not work:
            return [] if self._block(block) else _done_map(self.client)
        each = [(_map_chunk, (f, *c), {}) for _, c in work]
        ar = self.client._submit([e for e, _ in work], {"kind": "apply"}, None, each=each,
                                 make=lambda c, mid, t, k: AsyncMapResult(c, mid, t, k, _flatten))
        ar._fname = getattr(f, "__name__", "map")
        return ar.get() if self._block(block) else ar

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

    def __setitem__(self, name, value):
        self.push({name: value}, block=True)

    def __getitem__(self, name):
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


def _join(parts, dist):
    """ipyparallel's joinPartitions: arrays concatenated, lists and tuples
    joined (ranges too: ipyparallel would return the parts)."""
    first = parts[0] if parts else None
    if dist == "r" and isinstance(first, (list, tuple, range, np.ndarray)):
        out = [p[i] for i in range(max(len(p) for p in parts)) for p in parts if len(p) > i]
        return np.array(out) if isinstance(first, np.ndarray) else out
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, (list, tuple, range)):
        return _flatten(parts)
    return parts


def _flatten(parts):
    return [x for p in parts for x in p]


def _map_chunk(f, *chunks):
    """Runs on an engine: one block of a DirectView.map."""
    return list(map(f, *chunks))


def _shared(client, seq):
    """seq, in the node's arena if it is a large numpy array that is not there
    yet: parts of it then reach the engines as views of one block."""
    arena = client.arena
    if arena is None or not isinstance(seq, np.ndarray) or seq.dtype.hasobject or seq.ndim == 0 \
            or seq.nbytes < serialize.THRESHOLD or serialize._owner_block(seq) is not None:
        return seq
    whole = arena.empty(seq.shape, dtype=seq.dtype)
    _core.copy(whole, np.ascontiguousarray(seq))
    return whole


def _done_map(client):
    ar = AsyncMapResult(client, None, [], "map", _flatten)
    return ar
