"""Bulk loading and saving of arrays through io_uring (docs/bulk.md).

``load(path)`` reads a ``.npy`` file (or raw binary, given ``dtype`` and
``shape``) straight into an arena block: the file's bytes go from the
device (O_DIRECT, where the filesystem allows it and the alignment fits)
or the page cache into the block, several reads in flight, with no copy
in between; engines then view the block. ``save(path, a)`` writes an
array to a ``.npy`` file the same way. ``DirectView.load`` loads once per
node and gives every engine of the view its view of it.

Where io_uring is missing, or ``SHOAL_NO_URING=1`` is set, plain reads and
writes do the same work.
"""

import os
import struct

import numpy as np
from numpy.lib import format as npy

from . import _core
from ._arrays import _addr, owner_block, span_of

ALIGN = 4096  # what O_DIRECT asks of file offsets and memory addresses
HEADER = 4096  # save() pads the .npy header to this, so that the data can go through O_DIRECT


def _io_options(kw):
    opts = {"uring": not os.environ.get("SHOAL_NO_URING")}
    opts.update(kw)
    return opts


def npy_layout(path):
    """(dtype, shape, fortran_order, offset of the data) of a .npy file.
    Raises ValueError for what is not a .npy file numpy would read, or an
    array of Python objects (they are pickled, not bytes to load)."""
    with open(path, "rb") as f:
        try:
            version = npy.read_magic(f)
            read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
            if read is None:  # 3.0: utf-8 field names, read the same way as 2.0 here
                read = npy.read_array_header_2_0
            shape, fortran, dtype = read(f, max_header_size=1 << 20)
        except ValueError as e:
            raise ValueError(f"{path} is not a .npy file that can be loaded: {e}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path} holds an array of Python objects ({dtype}), which np.load unpickles: "
                         f"it cannot be loaded into shared memory (use np.load(..., allow_pickle=True))")
    return dtype, shape, fortran, offset


def _destination(arena, nbytes, skew):
    """(owner, buffer) for nbytes that start skew bytes past an ALIGN
    boundary: an arena block when arena is given (the owner is its Block),
    else private memory."""
    room = nbytes + skew + ALIGN
    if arena is not None:
        raw = arena.empty((room,), dtype=np.uint8)
    else:
        raw = np.empty(room, dtype=np.uint8)
    first = -_addr(raw) % ALIGN  # the first aligned byte
    return raw[first:first + skew + nbytes]


def load(path, dtype=None, shape=None, offset=0, arena=None, fortran_order=False, **io):
    """The array in the file at path, in an arena block (arena: the node's
    Arena; on an engine, its node's by default) or private memory.

    A .npy file is read by its header; raw binary needs dtype and shape
    (and offset: where the data starts). io: bulk_read's options (depth,
    chunk, uring, direct, register). Raises ValueError for a file that is
    not a loadable .npy, EOFError for one shorter than its header says,
    IsADirectoryError, FileNotFoundError and PermissionError as open does;
    what it allocated is freed then.
    """
    path = os.fspath(path)
    if arena is None:
        from . import _engine
        if _engine.current is not None:
            arena = _engine.current.arena
    if dtype is None:
        if shape is not None:
            raise ValueError("shape without dtype: a .npy file has both in its header; raw binary needs both")
        dtype, shape, fortran_order, offset = npy_layout(path)
    else:
        if shape is None:
            raise ValueError("raw binary needs shape as well as dtype")
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if dtype.hasobject:
            raise ValueError(f"{dtype} holds Python objects: not bytes to load")
        if os.path.isdir(path):
            raise IsADirectoryError(21, "Is a directory", path)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    # Read from the ALIGN boundary at or below the data, so that the body
    # can go through O_DIRECT; the array starts skew bytes in.
    start = offset - offset % ALIGN
    skew = offset - start
    buf = _destination(arena, nbytes, skew)
    if nbytes:
        _core.bulk_read(path, start, buf, **_io_options(io))
    data = buf[skew:]
    return np.ndarray(shape, dtype, buffer=data, order="F" if fortran_order else "C")


def save(path, a, **io):
    """Writes array a to a .npy file at path (made or truncated), as
    np.save writes it, with its header padded to 4 KiB so that the data
    goes through O_DIRECT where the filesystem allows it. A C- or
    Fortran-contiguous array is written from where it is; any other is
    made contiguous first. Returns None."""
    path = os.fspath(path)
    a = np.asanyarray(a)
    if a.dtype.hasobject:
        raise ValueError("an array of Python objects is pickled by np.save, not written as bytes: use np.save")
    fortran = a.flags.f_contiguous and not a.flags.c_contiguous
    if not (a.flags.c_contiguous or fortran):
        a = np.ascontiguousarray(a)
    header = npy.header_data_from_array_1_0(a)
    header["fortran_order"] = fortran
    text = repr({k: header[k] for k in ("descr", "fortran_order", "shape")}).encode("latin1")
    # Magic, version, length, the dict, spaces, a newline: HEADER bytes in all.
    pre = npy.MAGIC_PREFIX + bytes([2, 0])
    room = HEADER - len(pre) - 4
    if len(text) + 1 > room:
        raise ValueError(f"the .npy header of this array ({len(text)} bytes) is past {room}")
    head = pre + struct.pack("<I", room) + text + b" " * (room - len(text) - 1) + b"\n"
    with open(path, "wb") as f:
        f.write(head)
    body = a.reshape(-1, order="F" if fortran else "C").view(np.uint8) if a.size else np.empty(0, np.uint8)
    if body.size:
        _core.bulk_write(path, HEADER, body, **_io_options(io))
    return None


class ArenaRef:
    """An array in the arena of the node it is sent within, by its handle:
    unpickled there as a read-only view holding its own reference (how
    DirectView.load gives the engines of a node the array one of them
    loaded)."""

    def __init__(self, handle, start, layout):
        self.handle, self.start, self.layout = handle, start, layout

    @staticmethod
    def state(a):
        """(handle, start, layout) of a, an array in an arena: what
        ArenaRef is made of, as plain values (to return from an engine)."""
        owner = owner_block(a)
        if owner is None:
            raise ValueError("not an array in an arena")
        return owner.handle, _addr(a) - owner.address, (a.dtype, a.shape, a.strides)

    def __reduce__(self):
        return _view_ref, (self.handle, self.start, self.layout)


def _view_ref(handle, start, layout):
    from . import _engine
    arena = _engine.current.arena if _engine.current is not None else None
    if arena is None:
        raise RuntimeError("an arena array's reference reached a process without that arena")
    dtype, shape, strides = layout
    lo, hi = span_of(shape, strides, dtype.itemsize)
    block = arena.acquire_bytes(tuple(handle), start + lo, hi - lo)
    return np.ndarray(shape, dtype, buffer=block, offset=-lo, strides=strides)


_held = {}  # on an engine: token -> an array DirectView.load keeps until every engine of its node has it


def _load_on_engine(key, path, kwargs, token):
    """Run on one engine of a node by DirectView.load: loads into the
    node's arena, binds key, keeps the array under token until _let_go
    (whatever the user does with key meanwhile, the block lives until the
    node's other engines have their views), and returns what their
    ArenaRef is made of (ArenaRef.state)."""
    import __main__
    a = load(path, **kwargs)
    _held[token] = a
    __main__.__dict__[key] = a
    return ArenaRef.state(a)


def _let_go(token):
    _held.pop(token, None)
