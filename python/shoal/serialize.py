"""Serializing Python objects for engines: pickle protocol 5, large buffers out of band.

Objects are pickled with cloudpickle at protocol 5, so that functions,
lambdas and classes defined in ``__main__`` travel by value. Such a
function runs on the engine with the engine's namespace as its globals, as
in ipyparallel (see "Functions of __main__" in docs/serialization.md):

- a name it uses that the client's ``__main__`` binds to a module, a
  class or a function travels with it and is bound in the engine's
  namespace, as if pushed (so helpers and imports need no push, and a
  helper edited in a notebook is the edited one on the engines);
- every other name (data) is the engine's: what push and execute put there.
  The client's value of it is never sent (an array the client also holds
  would otherwise travel again with every call).

``use_cloudpickle()`` sends functions with their globals instead (data
too, as ipyparallel's use_cloudpickle does), ``use_dill()`` pickles with
dill, ``use_pickle()`` restores the default. Every buffer of at least
``threshold`` bytes (64 KiB by default; numpy arrays that are C- or
Fortran-contiguous, bytes-like objects) leaves the pickle:

- with an arena (a process on a node with an agent), it goes into an arena
  block, copied once whatever the number of receivers; a buffer that already
  lives in the arena is referenced where it is, not copied at all. Only a
  reference travels: ``("arena", handle, start, nbytes)``;
- without one, it travels as a separate message frame: ``("frame", index)``.

The receiver rebuilds the object with the buffers as zero-copy views: arena
buffers are read-only unless the caller asks otherwise (see docs/arena.md,
"Semantics of shared arrays").
"""

import functools
import io
import mmap
import os
import pickle
import socket
import sys
import types
import weakref
from dataclasses import dataclass, field

import cloudpickle
import numpy as np
from cloudpickle import cloudpickle as _cp

from . import _arrays
from ._arrays import FileNotSame, SharedArray, shared
from ._arrays import owner_block as _owner_block  # where view.py and client.py find it
from ._core import Arena, address, copy

THRESHOLD = 64 * 1024


@dataclass
class Serialized:
    """What :func:`dumps` produced.

    ``payload`` is the pickle itself; ``buffers`` says where each out-of-band
    buffer is, in order; ``frames`` are the buffers that travel as message
    frames; ``keep`` holds one reference to every arena block the buffers
    live in, so that they stay alive until the receivers have taken their own
    (drop it once every receiver has acquired, or the task has ended).
    """

    payload: bytes
    buffers: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    keep: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the receiver should be told (a memmap sent by value)
    files: list = field(default_factory=list)  # the files of the memmaps that went by reference


# Values pickled as plain pickle would (no buffers, nothing by value):
# most task results. cloudpickle's Pickler costs ~2 us to set up, as much as
# the rest of a small reply's serializing.
_PLAIN = frozenset((type(None), bool, int, float, complex, str))


def _engine_namespace():
    """The namespace that functions of the sender's ``__main__`` get as
    their globals where they are unpickled: this process's ``__main__``
    (on an engine, the user's namespace)."""
    return sys.modules["__main__"].__dict__


class _EngineNamespace:
    """Stands for the receiver's namespace in a pickle."""

    def __reduce__(self):
        return _engine_namespace, ()


_CODE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         functools.partial, np.ufunc)


def _is_interactive(func):
    """A function of ``__main__`` (a script's, IPython's, a notebook's), or
    one made so by @interactive: it runs in the engine's namespace."""
    return getattr(func, "__module__", None) == "__main__"


def _set_engine_first(func, state):
    """cloudpickle's state setter for a function of ``__main__``: its globals
    are the receiver's namespace (see _EngineNamespace); the names the
    sender sent with it (modules, classes, functions) are bound there, over
    what was there, as a push would."""
    g = func.__globals__
    builtins_ = g.get("__builtins__")
    _cp._function_setstate(func, state)  # updates g with the names sent, and sets __builtins__
    if builtins_ is not None:
        g["__builtins__"] = builtins_  # the receiver's own, not cloudpickle's module's


class _Arrays:
    """What every pickler of shoal's has: memmaps by reference, shared and
    copy-on-write arrays (shoal._arrays), and what _dump tells it."""

    memmaps = "reference"  # or "value": memmaps go as their bytes
    memmaps_why = "sent by value"  # the note's reason, with "value"
    buffer_modes = {}  # id(PickleBuffer) -> how the receiver views it ("r", "r+", "c"); set per dump
    held = []  # those PickleBuffers, alive until the dump is done
    notes = []  # what the receiver is told (shoal._arrays.reduce_by_value)
    files = []  # the paths of memmaps sent by reference


def _with_arrays(base):
    """base (a Pickler class) with shoal's reduction of arrays."""
    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            r = _arrays.reduce(self, obj)
            if r is not NotImplemented:
                return r
        parent = getattr(base, "reducer_override", None)
        return parent(self, obj) if parent is not None else NotImplemented
    return type(base.__name__, (_Arrays, base), {"reducer_override": reducer_override,
                                                  "__module__": __name__, "__doc__": base.__doc__})


class _Pickler(_Arrays, cloudpickle.Pickler):
    """cloudpickle, with the rule above for functions of ``__main__``."""

    _namespace = _EngineNamespace()  # one object: the pickle's memo gives each function the same dict

    _whole = False  # pickling a function for _function_blob: the whole of it, not its blob

    def reducer_override(self, obj):
        # The functions every pickled function of __main__ names go by
        # reference at once: cloudpickle's look-up of where a function
        # lives costs ~1.5 us each, and a no-op task names four of them.
        if obj.__class__ is types.FunctionType:
            if obj in _BY_REFERENCE:
                return NotImplemented
            if not self._whole and _is_interactive(obj):
                kept = _function_blob(obj)
                if kept is not None:
                    return _load_function, kept
            return self._function_reduce(obj)
        if isinstance(obj, np.ndarray):
            r = _arrays.reduce(self, obj)
            if r is not NotImplemented:
                return r
        return _reducer_override(self, obj)

    def _dynamic_function_reduce(self, func):
        if not _is_interactive(func):
            return super()._dynamic_function_reduce(func)
        state, slotstate = _cp._function_getstate(func)
        captured = slotstate["__globals__"]
        if captured:
            slotstate["__globals__"] = {k: v for k, v in captured.items() if isinstance(v, _CODE)}
        # As cloudpickle's _function_getnewargs, with the receiver's
        # namespace for globals (and empty cells, filled by the state setter).
        closure = None if func.__closure__ is None else \
            tuple(_cp._make_empty_cell() for _ in range(len(func.__code__.co_freevars)))
        return _cp._make_function, (func.__code__, self._namespace, None, None, closure), (state, slotstate), \
            None, None, _set_engine_first


# A plain function of __main__ (no defaults, closure, attributes or
# annotations; what it names of __main__ only modules and what pickles by
# reference), sent again and again (a loop of apply, a task per item),
# is pickled once: its pickle (~20 us to make) is kept while the function
# and what it names stay the same objects, and a receiver unpickles each
# such pickle once (~8 us), then hands out the same function, binding the
# names it came with again, as each unpickling would. Code objects are
# immutable, and such a function carries nothing else of its own.
_FUNCTIONS = weakref.WeakKeyDictionary()  # function -> (what it was made of, (its pickle, the names it binds))
_LOADED = {}  # its pickle -> (the function, the names it binds and their values), on the receiving side
_LOADED_MAX = 256


def _function_blob(func):
    """(the pickle of func alone, the names of __main__ it binds where it
    is unpickled), made once while func stays the same; None if func is
    not plain enough to keep them."""
    if func.__defaults__ or func.__kwdefaults__ or func.__closure__ is not None or func.__dict__ or \
            func.__annotations__:
        return None
    g = func.__globals__
    named = []
    for name in _cp._extract_code_globals(func.__code__):
        value = g.get(name)
        if isinstance(value, _CODE):
            if not _by_reference(value):
                return None  # sent by value: it may change without changing its identity
            named.append((name, value))
    made_of = (func.__code__, func.__name__, func.__qualname__, func.__doc__, tuple(named))
    kept = _FUNCTIONS.get(func)
    if kept is not None and kept[0] == made_of:
        return kept[1]
    kept = (_dump(func, pickler=_WholePickler), tuple(name for name, _ in named))
    _FUNCTIONS[func] = (made_of, kept)
    return kept


def _by_reference(value):
    """Whether value (one of _CODE) pickles as a reference to where it lives,
    not as its contents: a module, a function or class of an importable
    module, a builtin function of a module, a ufunc. A method, a partial,
    and anything of __main__ go by value."""
    if isinstance(value, types.ModuleType) or isinstance(value, np.ufunc):
        return True
    if isinstance(value, types.BuiltinFunctionType):
        return value.__self__ is None or isinstance(value.__self__, types.ModuleType)
    if isinstance(value, (types.FunctionType, type)):
        return _cp._should_pickle_by_reference(value)
    return False


def _load_function(blob, names):
    """A function of the sender's __main__ from its pickle (see
    _FUNCTIONS), unpickled the first time; each time, the names it was sent
    with are bound in its globals (this process's namespace) to what they
    were unpickled as, over what is there, as unpickling binds them."""
    kept = _LOADED.get(blob)
    if kept is None:
        func = pickle.loads(blob)
        g = func.__globals__
        kept = func, [(name, g[name]) for name in names if name in g]
        if len(_LOADED) >= _LOADED_MAX:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[blob] = kept
    else:
        kept[0].__globals__.update(kept[1])
    return kept[0]


def forget_functions():
    """Drops the functions _load_function unpickled (an engine's clear)."""
    _LOADED.clear()


class _WholePickler(_Pickler):
    """_Pickler for the pickle _function_blob keeps: the function itself, not a reference to its pickle."""

    _whole = True


_reducer_override = cloudpickle.Pickler.reducer_override
_BY_REFERENCE = frozenset((_engine_namespace, _set_engine_first, _cp._make_function, _cp._function_setstate,
                           _load_function))
_CloudPickler = _with_arrays(cloudpickle.Pickler)  # results, and use_cloudpickle()

# What pickles functions for the engines (use_cloudpickle, use_dill and
# use_pickle choose), and the function that pickles with it.
_pickler = _Pickler


def _dump(obj, buffer_callback=None, pickler=None, memmaps="reference", memmaps_why=None, modes=None, notes=None,
          files=None):
    """obj pickled; modes (a dict) gets how the receiver views each
    out-of-band buffer that is not read-only, notes (a list) what it is
    told, files (a list) the memmaps' files sent by reference."""
    f = io.BytesIO()
    p = (pickler or _pickler)(f, protocol=5, buffer_callback=buffer_callback)
    if isinstance(p, _Arrays):
        p.memmaps, p.memmaps_why = memmaps, memmaps_why or "sent by value"
        p.buffer_modes, p.held = ({} if modes is None else modes), []
        p.notes, p.files = ([] if notes is None else notes), ([] if files is None else files)
    p.dump(obj)
    return f.getvalue()


def use_pickle():
    """Functions of ``__main__`` run in the engine's namespace (the
    default; see the module's doc). Returns None."""
    global _pickler
    _pickler = _Pickler


def use_cloudpickle():
    """Functions travel with the globals they use, data included (plain
    cloudpickle, as ipyparallel's use_cloudpickle): they no longer see
    the engine's namespace. Returns None."""
    global _pickler
    _pickler = _CloudPickler


def use_dill():
    """Pickles with dill (which must be installed here and on the
    engines). Raises ImportError if it is not. Returns None."""
    global _pickler
    try:
        import dill
    except ImportError:
        raise ImportError("use_dill() needs dill, which is not installed: pip install dill "
                          "(on the client's and the engines' machines)") from None
    _pickler = _with_arrays(dill.Pickler)


def dumps(obj, arena=None, threshold=THRESHOLD, reply=False, memmaps="reference", memmaps_why=None):
    """Serializes obj; large buffers go out of band (see the module's doc).

    arena: the node's :class:`shoal.Arena`, or None to send buffers as frames.
    reply: obj is an engine's result. A function in it keeps the globals
    it uses (plain cloudpickle): it is not bound into the client's namespace.
    memmaps: "reference" sends a memmap as its file's identity (the
    receiver maps the file), "value" as its bytes, with a note that says
    so and why (memmaps_why) in ``notes``.
    """
    if type(obj) in _PLAIN:
        return Serialized(payload=pickle.dumps(obj, protocol=5))
    out = Serialized(payload=b"")
    modes = {}

    def out_of_band(pb):
        mode = modes.get(id(pb))  # a shared or copy-on-write array's: out of band whatever its size
        try:
            raw = pb.raw()
        except BufferError:
            return True  # not contiguous: pickle copies it in band
        if raw.nbytes < threshold and mode is None:
            return True
        more = (mode,) if mode in ("r+", "c") else ()
        if arena is None:
            out.buffers.append(("frame", len(out.frames)) + more)
            out.frames.append(raw)
            return False
        owner = _owner_block(pb)
        # Shared writable (r+) is never made of memory that is read-only
        # where it is (an array received read-only): that gets a copy.
        if owner is not None and owner.arena is arena and not (mode == "r+" and raw.readonly):
            start = address(raw) - owner.address
            out.buffers.append(("arena", owner.handle, start, raw.nbytes) + more)
            out.keep.append(owner)
            return False
        block = arena.alloc(max(raw.nbytes, 1))
        copy(block, raw)  # in parallel: mapping fresh shared pages is the cost
        out.buffers.append(("arena", block.handle, 0, raw.nbytes) + more)
        out.keep.append(block)
        return False

    pickler = (_CloudPickler if _pickler is _Pickler else _pickler) if reply else None
    out.payload = _dump(obj, out_of_band, pickler, memmaps, memmaps_why, modes, out.notes, out.files)
    return out


class Pickled:
    """obj pickled once, to be sent many times (a map's function, in each
    of its tasks): pickling it again for each would cost as much (a
    function of ``__main__`` travels by value) and give the same bytes.
    The receiver gets obj itself."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return pickle.loads, (self.data,)


def pickled_once(obj):
    """A :class:`Pickled` of obj; obj itself if it cannot be pickled, or
    holds buffers that would leave the pickle (they would need a place of
    their own in each message)."""
    out = []
    try:
        data = _dump(obj, out.append)
    except Exception:
        return obj  # each task then fails with the error, as it would have
    return obj if out else Pickled(data)


def loads(payload, buffers=(), frames=(), arena=None, readonly=True):
    """Rebuilds an object from :func:`dumps`'s output.

    Arena buffers are acquired (one reference each, held by the rebuilt
    arrays) and viewed without copying; ``readonly=False`` gives writable
    views that every process on the node sees (an explicit opt-in). Raises
    OSError for a stale or malformed reference, ValueError for an unknown
    buffer kind.
    """
    bufs = []
    for b in buffers:
        if b[0] == "arena":
            if arena is None:
                raise ValueError("this message references arena buffers, but no arena is attached")
            handle, start, nbytes = b[1:4]
            mode = b[4] if len(b) > 4 else None  # a shared ("r+") or copy-on-write ("c") array's
            bufs.append(arena.acquire_bytes(tuple(handle), start, nbytes, readonly=readonly and mode != "r+",
                                            private=mode == "c"))
        elif b[0] == "frame":
            bufs.append(frames[b[1]])
        else:
            raise ValueError(f"unknown buffer kind {b[0]!r}")
    return pickle.loads(payload, buffers=bufs)


__all__ = ["THRESHOLD", "Serialized", "Pickled", "dumps", "loads", "pickled_once", "use_pickle", "use_cloudpickle",
           "use_dill", "Arena", "SharedArray", "shared", "FileNotSame"]
