"""Arrays that travel their own way: numpy memmaps by reference to their
file, and arrays shared writable or copy-on-write (docs/serialization.md,
"Memmaps" and "Shared and copy-on-write arrays").

The picklers of shoal.serialize call :func:`reduce` for every ndarray that
is not a plain array of its own memory; it returns NotImplemented for
arrays that pickle as usual (their large buffers out of band).

- **A memmap** (``np.memmap``, or any array that views one) goes as its
  file's identity and the place of its bytes in it: ``_open_mapped``
  maps the file on the receiver, with the memmap's mode (``r`` read-only,
  ``r+``/``w+`` shared, ``c`` copy-on-write). If the sender no longer
  reaches the file it mapped (deleted, replaced), or the pickler was asked
  for values (``memmaps="value"``), the bytes go instead, out of band, with
  a note for the receiver's metadata.
- **A SharedArray** (:func:`shared`) goes as its bytes, out of band even
  when small, marked so that the receiver views the arena block writable
  (``r+``: every process sees every write) or maps it copy-on-write
  (``c``: writes stay with the receiver).
"""

import mmap
import os
import pickle
import socket
import weakref

import numpy as np

from ._core import Block

MODES = ("r", "r+", "c")


def _addr(a):
    """The address of array a's first element (any strides)."""
    return a.__array_interface__["data"][0]


class FileNotSame(OSError):
    """A memmap's file is not the same file here as where it was sent from
    (missing, another inode, shorter, or changed): raised by the receiver,
    which then gets its bytes instead (see Client: the retry by value),
    unless ``resendable`` is False (a file that shrank: its bytes cannot be
    read where it was sent from either)."""

    resendable = True


class SharedArray(np.ndarray):
    """An ndarray that engines receive writable: ``mode`` "r+" (one
    memory: every engine, and the client when the array lives in its
    arena, sees every write) or "c" (copy-on-write: each receiver may
    write, and nobody else sees it). Views and slices keep the mode. Made
    by :func:`shared` or ``Client.shared``."""

    mode = "r+"

    def __array_finalize__(self, obj):
        self.mode = getattr(obj, "mode", "r+") if isinstance(obj, SharedArray) else "r+"

    def __reduce_ex__(self, protocol):
        # For a pickler without shoal's reducer (pickle.dumps by the user):
        # the bytes as a plain array's, the mode kept.
        return _rebuild, (self.view(np.ndarray), (), SharedArray, self.mode)


def shared(a, mode="r+"):
    """Marks array a to be received writable by engines: mode "r+" (shared:
    every engine sees every write) or "c" (copy-on-write: each engine's
    writes are its own). Returns a SharedArray over a's memory, no copy.

    For the client to see the engines' writes, and for every send to reach
    the same memory, a must live in the node's arena (``Client.shared``
    puts it there; so do ``rc.arena.empty`` and gathered results). An array
    of private memory is copied into the arena at each send, once per node:
    the engines of one send share it, the client keeps its own.
    """
    if mode not in ("r+", "c"):
        raise ValueError(f"mode must be 'r+' (shared writable) or 'c' (copy-on-write), not {mode!r}")
    a = np.asarray(a)
    if a.dtype.hasobject:
        raise TypeError("an array of Python objects cannot be shared: its items are pointers into this process")
    out = a.view(SharedArray)
    out.mode = mode
    return out


def owner_block(obj):
    """The arena Block whose memory obj's buffer is, or None."""
    seen = 0
    while obj is not None and seen < 64:
        if isinstance(obj, Block):
            return None if obj.private else obj  # a copy-on-write block's writes are this process's alone
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


# ---- memmaps: where their bytes are -------------------------------------------------

def _boot_id():
    """This machine's boot id: the same file is the same (device, inode) only on one kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


BOOT_ID = _boot_id()
HOST = socket.gethostname()


def _mapping(arr):
    """(mmap, np.memmap) whose file mapping arr's memory is, or None."""
    seen, x, mm_array = 0, arr, None
    while x is not None and seen < 64:
        if isinstance(x, np.memmap) and mm_array is None:
            mm_array = x
        if isinstance(x, mmap.mmap):
            return (x, mm_array) if mm_array is not None else None
        x = x.base if isinstance(x, np.ndarray) else None
        seen += 1
    return None


def span(arr):
    """(lo, hi): the bytes arr reaches, from its first element's address."""
    return span_of(arr.shape, arr.strides, arr.itemsize)


def span_of(shape, strides, itemsize):
    """span of an array of that shape, strides and itemsize."""
    if not all(shape):
        return 0, 0
    lo = hi = 0
    for n, st in zip(shape, strides):
        if st < 0:
            lo += st * (n - 1)
        else:
            hi += st * (n - 1)
    return lo, hi + itemsize


def _maps_entry(addr):
    """(path, device, inode, file offset of addr) of the file mapping at
    addr in this process, from /proc/self/maps; path None if the file was
    deleted; None if addr is in no file mapping."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(v, 16) for v in fields[0].split("-"))
            if low <= addr < high:
                if len(fields) < 6 or not fields[5].startswith("/"):
                    return None
                major, minor = (int(v, 16) for v in fields[3].split(":"))
                path = fields[5].rstrip("\n")
                if path.endswith(" (deleted)"):
                    path = None
                else:
                    path = path.replace("\\012", "\n")
                return path, os.makedev(major, minor), int(fields[4]), int(fields[2], 16) + addr - low
    return None


def _dev_may_differ(path):
    """Whether path is on a filesystem whose stat device is not the one
    /proc/self/maps shows (btrfs, overlayfs)."""
    try:
        with open("/proc/self/mountinfo") as f:
            best, fstype = "", ""
            for line in f:
                pre, post = line.split(" - ", 1)
                point = pre.split()[4]
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, post.split()[0]
        return fstype in ("btrfs", "overlay")
    except OSError:
        return False


def _has_private_pages(addr):
    """Whether the mapping at addr has pages of this process's own
    (Anonymous in /proc/self/smaps): a copy-on-write mapping that was
    written to."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and ":" not in first:
                low, high = (int(v, 16) for v in first.split("-"))
                inside = low <= addr < high
            elif inside and first == "Anonymous:":
                return int(line.split()[1]) > 0
    return False


_files = weakref.WeakKeyDictionary()  # mmap -> (path, device, inode, file offset of its first byte, address)


def mode_of(arr, mm_array):
    """numpy's mode of the memmap arr views, as the receiver maps it: "r",
    "r+" (w+ too) or "c"; "r" for a view that is not writeable."""
    mode = {"w+": "r+", "readwrite": "r+", "write": "r+", "readonly": "r", "copyonwrite": "c"}.get(
        mm_array.mode, mm_array.mode)
    if mode not in MODES:
        mode = "c"
    return mode if mode == "c" or arr.flags.writeable else "r"


def file_ref(arr, m):
    """What a receiver needs to map arr's bytes from their file itself:
    (path, boot id, device, inode, size, mtime_ns, offset of element 0 in
    the file, lo, hi, dtype, shape, strides, mode, memmap?); or a string
    that says why that cannot be (the file was deleted or replaced since
    it was mapped). m: _mapping(arr)."""
    mm, mm_array = m
    mode = mode_of(arr, mm_array)
    base = _addr(np.frombuffer(mm, np.uint8)) if len(mm) else 0
    known = _files.get(mm)
    st = None
    if known is not None:
        try:
            st = os.stat(known[0])
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != known[1:3]:
            known = None  # renamed, replaced or deleted since: look again
    if known is None:
        entry = _maps_entry(base)
        if entry is None:
            return "its mapping was not found in /proc/self/maps"
        path, dev, ino, off = entry
        if path is None:
            return f"{mm_array.filename or 'its file'} was deleted or replaced after it was mapped"
        try:
            st = os.stat(path)
        except OSError as e:
            return f"{path} cannot be reached ({e.strerror})"
        # The inode says it: the device /proc/self/maps gives is the
        # underlying one on btrfs subvolumes and overlayfs, not stat's.
        if st.st_ino != ino or (st.st_dev != dev and not _dev_may_differ(path)):
            return f"{path} is no longer the file that was mapped"
        known = _files[mm] = (path, st.st_dev, st.st_ino, off, base)
    path, dev, ino, off, _ = known
    if mode == "c" and _has_private_pages(base):
        # Checked at each send: a write since the last one makes pages of its own.
        return "the sender wrote to its copy-on-write memmap: those writes are in its memory only"
    lo, hi = span(arr)
    offset = off + _addr(arr) - base
    if st.st_size < offset + hi:
        # Neither the receiver nor we can read those pages (SIGBUS).
        raise ValueError(f"the memmap's file {path} is {st.st_size} bytes now, shorter than the memmap reaches "
                         f"({offset + hi} bytes): it was truncated after it was mapped, and the pages past its "
                         f"end cannot be read, here or by an engine")
    return (path, BOOT_ID, dev, ino, st.st_size, st.st_mtime_ns, offset, lo, hi, arr.dtype, arr.shape,
            arr.strides, mode, isinstance(arr, np.memmap))


_ACCESS = {"r": mmap.ACCESS_READ, "r+": mmap.ACCESS_WRITE, "c": mmap.ACCESS_COPY}


def _open_mapped(ref):
    """The array of a file_ref, mapped from its file here. Raises
    FileNotSame if the file here is not the one the sender mapped."""
    path, boot, dev, ino, size, mtime, offset, lo, hi, dtype, shape, strides, mode, as_memmap = ref
    try:
        fd = os.open(path, (os.O_RDWR if mode == "r+" else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise FileNotSame(e.errno, f"the memmap's file {path} cannot be opened on {HOST}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        # On the sender's kernel the same file is the same (device, inode);
        # on another machine (a shared filesystem), the same inode, size and
        # modification time.
        same = (st.st_dev, st.st_ino) == (dev, ino) if boot == BOOT_ID else \
            (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, size, mtime)
        if not same:
            raise FileNotSame(f"{path} on {HOST} is not the file the memmap was made of "
                              f"(device, inode, size or modification time differ)")
        if st.st_size < offset + hi:
            e = FileNotSame(f"{path} on {HOST} is {st.st_size} bytes, shorter than the memmap reaches "
                            f"({offset + hi})")
            e.resendable = False
            raise e
        if mode == "r+" and boot != BOOT_ID:
            # Writes through a file that two machines share (NFS) are not
            # seen by the other machine at once: r+ holds on one machine.
            raise FileNotSame(f"{path} is shared between machines: writes to it (mode r+) would not be seen "
                              f"by the other machine at once")
        start = (offset + lo) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, offset + hi - start, access=_ACCESS[mode], offset=start)
    finally:
        os.close(fd)
    arr = np.ndarray.__new__(np.memmap if as_memmap else np.ndarray, shape, dtype, buffer=mm,
                             offset=offset - start, strides=strides)
    if as_memmap:  # as np.memmap sets them: flush() writes the pages back
        arr._mmap, arr.filename, arr.offset, arr.mode = mm, path, offset, mode
    return arr


# ---- by value ----------------------------------------------------------------------

def _in_arena(arr):
    return owner_block(arr) is not None


def window(arr, shared=False):
    """(win, offset, strides): a 1-d uint8 array over the bytes arr reaches
    (see span), in the same memory, the offset of arr's first element in
    it, and arr's strides; a contiguous copy of arr, 0 and the copy's
    strides if its memory cannot be viewed so."""
    lo, hi = span(arr)
    if hi - lo > 2 * arr.nbytes and not (shared and _in_arena(arr)):
        # A sparse view (every 4096th element): its elements, not the span
        # between them. Only a shared array in the arena keeps its memory.
        c = np.ascontiguousarray(arr)
        return c.reshape(-1).view(np.uint8), 0, c.strides
    x, seen = arr, 0
    while isinstance(x.base, np.ndarray) and seen < 64:
        x, seen = x.base, seen + 1
    try:
        whole = np.frombuffer(x.base, np.uint8) if x.base is not None else x.reshape(-1, order="A").view(np.uint8)
    except (TypeError, ValueError, BufferError):
        whole = None
    if whole is not None and whole.size:
        start = _addr(arr) + lo - _addr(whole)
        if 0 <= start and start + (hi - lo) <= whole.size:
            return whole[start:start + hi - lo], -lo, arr.strides
    c = np.ascontiguousarray(arr)
    return c.reshape(-1).view(np.uint8), 0, c.strides


def _rebuild(buf, layout, cls, mode):
    """The receiver's side of reduce_by_value: an array of cls over buf
    (an arena Block viewed as mode asks, a frame, or bytes in band).
    layout: (dtype, shape, strides, offset) or () for buf itself."""
    arr = np.ndarray(layout[1], layout[0], buffer=buf, offset=layout[3], strides=layout[2]) if layout else \
        np.asarray(buf)
    if mode != "r" and not arr.flags.writeable:
        arr = arr.copy()  # bytes in band or a read-only frame: a copy of its own is this receiver's
    if cls is SharedArray:
        arr = arr.view(SharedArray)
        arr.mode = mode
    return arr


def reduce_by_value(pickler, arr, mode, cls, note=None):
    """arr's bytes as one out-of-band buffer that the receiver views as mode
    asks ("r" read-only, "r+" shared writable, "c" copy-on-write)."""
    win, offset, strides = window(arr, shared=mode == "r+")
    pb = pickle_buffer(pickler, win, mode)
    if note:
        pickler.notes.append(note)
    return _rebuild, (pb, (arr.dtype, arr.shape, strides, offset), cls, mode)


def pickle_buffer(pickler, win, mode):
    pb = pickle.PickleBuffer(win)
    pickler.buffer_modes[id(pb)] = mode
    pickler.held.append(pb)  # so that its id is not another's before the callback has seen it
    return pb


def reduce(pickler, obj):
    """The reduction of ndarray obj, or NotImplemented to pickle it as usual."""
    if type(obj) is np.ndarray and obj.base is None:
        return NotImplemented
    if isinstance(obj, SharedArray):
        return reduce_by_value(pickler, obj, obj.mode, SharedArray)
    m = _mapping(obj)
    if m is None or obj.size == 0:
        return NotImplemented
    ref = file_ref(obj, m) if pickler.memmaps == "reference" else pickler.memmaps_why
    if isinstance(ref, tuple):
        pickler.files.append(ref[0])
        return _open_mapped, (ref,)
    # By value: read-only stays so; a writable one is the receiver's own
    # (copy-on-write), as the file's pages cannot be shared from here.
    mode = "r" if mode_of(obj, m[1]) == "r" else "c"
    return reduce_by_value(pickler, obj.view(np.ndarray), mode, np.ndarray,
                           f"{m[1].filename or 'a memmap'}: its bytes were sent, not the file ({ref}); "
                           + ("a private copy: writes to it reach neither the file nor anyone else" if mode == "c"
                              else "read-only"))
