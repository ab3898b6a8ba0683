"""Serializing Python objects for engines: pickle protocol 5, large buffers out of band.

Objects are pickled with cloudpickle (so functions and lambdas defined in
``__main__`` travel by value) at protocol 5. Every buffer of at least
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

import pickle
from dataclasses import dataclass, field

import cloudpickle
import numpy as np

from ._core import Arena, Block, address, copy

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


def _owner_block(obj):
    """The arena Block whose memory obj's buffer is, or None."""
    seen = 0
    while obj is not None and seen < 64:
        if isinstance(obj, Block):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, pickle.PickleBuffer):
            obj = memoryview(obj).obj
        else:
            return None
        seen += 1
    return None


# Values pickled as plain pickle would (no buffers, nothing by value):
# most task results. cloudpickle's Pickler costs ~2 us to set up, as much as
# the rest of a small reply's serializing.
_PLAIN = frozenset((type(None), bool, int, float, complex, str))


def dumps(obj, arena=None, threshold=THRESHOLD):
    """Serializes obj; large buffers go out of band (see the module's doc).

    arena: the node's :class:`shoal.Arena`, or None to send buffers as frames.
    """
    if type(obj) in _PLAIN:
        return Serialized(payload=pickle.dumps(obj, protocol=5))
    out = Serialized(payload=b"")

    def out_of_band(pb):
        try:
            raw = pb.raw()
        except BufferError:
            return True  # not contiguous: pickle copies it in band
        if raw.nbytes < threshold:
            return True
        if arena is None:
            out.buffers.append(("frame", len(out.frames)))
            out.frames.append(raw)
            return False
        owner = _owner_block(pb)
        if owner is not None and owner.arena is arena:
            start = address(raw) - owner.address
            out.buffers.append(("arena", owner.handle, start, raw.nbytes))
            out.keep.append(owner)
            return False
        block = arena.alloc(raw.nbytes)
        copy(block, raw)  # in parallel: mapping fresh shared pages is the cost
        out.buffers.append(("arena", block.handle, 0, raw.nbytes))
        out.keep.append(block)
        return False

    out.payload = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
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
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=out.append)
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
            _, handle, start, nbytes = b
            bufs.append(arena.acquire_bytes(tuple(handle), start, nbytes, readonly=readonly))
        elif b[0] == "frame":
            bufs.append(frames[b[1]])
        else:
            raise ValueError(f"unknown buffer kind {b[0]!r}")
    return pickle.loads(payload, buffers=bufs)


__all__ = ["THRESHOLD", "Serialized", "Pickled", "dumps", "loads", "pickled_once", "Arena"]
