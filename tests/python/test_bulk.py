"""Bulk loading and saving through io_uring (docs/bulk.md): shoal.load and
shoal.save in a process with an arena, every way through (io_uring or
plain reads, O_DIRECT or the page cache), the files it refuses, and
DirectView.load on a real cluster of two nodes, on both event-loop
backends, through lanes and through the controller."""

import os
import subprocess

import numpy as np
import pytest

import shoal
from shoal import bulk, serialize

from procs import Agent, Controller, evaluate

MiB = 1 << 20
WAYS = [dict(), dict(uring=False), dict(direct=False), dict(register=False), dict(depth=1, chunk=4096)]


@pytest.fixture(scope="module")
def arena():
    a = shoal.Arena(heap_size=256 * MiB)
    yield a


@pytest.fixture
def files(tmp_path):
    """Files on the disk (tmp_path: where O_DIRECT works, unlike /dev/shm)."""
    return tmp_path


def uncache(path):
    """Drops path's pages from the page cache, so that a read goes to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("way", WAYS, ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items()) or "default")
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_load_reads_a_npy_file_into_the_arena(arena, files, way, cached):
    a = np.random.default_rng(1).random((1000, 777))  # not a multiple of 4 KiB
    np.save(files / "a.npy", a)
    if not cached:
        uncache(files / "a.npy")
    got = shoal.load(files / "a.npy", arena=arena, **way)
    assert got.dtype == a.dtype and got.shape == a.shape and (got == a).all()
    owner = serialize._owner_block(got)
    assert owner is not None and owner.arena is arena, "it lives in the arena"
    assert got.flags.writeable  # the loader's own, until it is sent


def test_load_fortran_order_raw_binary_and_empty(arena, files):
    f = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.save(files / "f.npy", f)
    got = shoal.load(files / "f.npy", arena=arena)
    assert got.flags.f_contiguous and (got == f).all()
    raw = np.arange(5000, dtype="<i4")
    with open(files / "raw.bin", "wb") as out:
        out.write(b"x" * 100)  # a header of the user's own, skipped by offset
        out.write(raw.tobytes())
    got = shoal.load(files / "raw.bin", dtype="<i4", shape=(50, 100), offset=100, arena=arena)
    assert (got.ravel() == raw).all() and got.shape == (50, 100)
    np.save(files / "empty.npy", np.zeros((0, 3)))
    assert shoal.load(files / "empty.npy", arena=arena).shape == (0, 3)


def test_bad_files_get_clear_errors_and_leak_no_block(arena, files):
    base = arena.stats()["used_blocks"]
    np.save(files / "ok.npy", np.ones(100_000))
    whole = (files / "ok.npy").read_bytes()
    (files / "short.npy").write_bytes(whole[:len(whole) // 2])
    (files / "junk.npy").write_bytes(b"not a numpy file at all" * 100)
    np.save(files / "objects.npy", np.array([1, "a", None], dtype=object))
    cases = [
        (files / "short.npy", {}, EOFError, "shorter than its header says"),
        (files / "junk.npy", {}, ValueError, "not a .npy file"),
        (files / "objects.npy", {}, ValueError, "Python objects"),
        (files, {}, IsADirectoryError, "Is a directory"),
        (files / "missing.npy", {}, FileNotFoundError, "No such file"),
        (files / "ok.npy", {"dtype": "f8", "shape": (10 ** 6,)}, EOFError, "shorter"),
        (files / "ok.npy", {"shape": (3,)}, ValueError, "shape without dtype"),
        (files / "ok.npy", {"dtype": "f8", "shape": (1 << 40,)}, OSError, "arena-size"),
    ]
    for path, kw, exc, text in cases:
        with pytest.raises(exc, match=text):
            shoal.load(path, arena=arena, **kw)
        assert arena.stats()["used_blocks"] == base, f"{path.name} {kw}: a block leaked"


def test_a_file_larger_than_the_arena_is_refused_with_the_sizes(arena, files):
    """A .npy file past the arena's free space: the allocation error says
    how much was asked and how to make the arena larger; nothing is read."""
    path = files / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype="f8", shape=(300 * MiB // 8,))  # sparse
    with pytest.raises(OSError, match=r"asked.*--arena-size"):
        shoal.load(path, arena=arena)


@pytest.mark.parametrize("way", WAYS[:3], ids=["default", "no-uring", "no-direct"])
def test_save_writes_what_np_load_reads(arena, files, way):
    rng = np.random.default_rng(2)
    for a in (rng.random((333, 1001)), np.asfortranarray(rng.random((64, 65))), rng.random((100, 100))[::3, ::2],
              np.arange(7, dtype="u1"), np.zeros((0, 5))):
        shoal.save(files / "out.npy", a, **way)
        back = np.load(files / "out.npy")
        assert back.dtype == a.dtype and back.shape == a.shape and (back == a).all()
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            assert back.flags.f_contiguous and not back.flags.c_contiguous, "written in Fortran order"
        assert (shoal.load(files / "out.npy", arena=arena) == a).all()
    with pytest.raises(ValueError, match="objects"):
        shoal.save(files / "o.npy", np.array([None]))


# ---- DirectView.load on a cluster of two nodes -----------------------------------

@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def two_nodes(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"bulk-{request.param}")
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    ctl = Controller(root / "home", heartbeat_ms=500)
    first = Agent(ctl, root / "run", engines=2, arena_size=512 * MiB, env=env)
    second = Agent(ctl, root / "run2", engines=2, arena_size=512 * MiB, env=env)
    yield ctl, first, second, root
    second.stop()
    first.stop()
    ctl.stop()


@pytest.mark.parametrize("lanes", [True, False], ids=["lanes", "controller"])
def test_a_view_loads_once_per_node_and_every_engine_views_it(two_nodes, lanes):
    """dv.load: each engine gets the file's array, read-only, in its
    node's arena; the engines of a node share one block (one copy per
    node); the client's node is loaded by the client when it has the
    arena, the other by one of its engines."""
    ctl, first, second, root = two_nodes
    a = np.random.default_rng(3).random((512, 1024))  # 4 MiB
    path = root / "shared.npy"
    np.save(path, a)
    with shoal.Client(url_file=str(ctl.conn), lanes=lanes) as rc:
        dv = rc[:]
        assert dv.load("x", path, block=True) is None
        got = evaluate(dv, "import shoal.serialize as s\n"
                           "o = s._owner_block(x)\n"
                           "(float(x.sum()), x.shape, x.flags.writeable, o is not None and o.handle)")
        assert [g[:3] for g in got] == [(float(a.sum()), a.shape, False)] * 4
        by_node = {}
        for e, g in zip(rc.ids, got):
            by_node.setdefault(rc._node_of(e), set()).add(tuple(g[3]))
        assert len(by_node) == 2 and all(len(h) == 1 for h in by_node.values()), \
            f"one block per node: {by_node}"
        # As an AsyncResult, and for some engines only.
        ar = rc[rc.ids[:1]].load("y", path, dtype="u1", shape=(1000,), offset=0)
        assert ar.get(10) == [None]
        # A bad file, on the client's node or another: its error, and the engines go on.
        exc = (ValueError, shoal.RemoteError) if rc.arena is not None else shoal.RemoteError
        (root / "junk.npy").write_bytes(b"junk" * 100)
        with pytest.raises(exc, match="not a .npy file"):
            dv.load("z", root / "junk.npy", block=True)
        assert dv.apply_sync(lambda: 1) == [1] * 4


def test_a_gathered_result_is_saved_and_loaded_back(two_nodes):
    ctl, first, second, root = two_nodes
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        dv = rc[:]
        dv.scatter("part", np.arange(4 * MiB // 8, dtype="f8"), block=True)
        whole = dv.gather("part", block=True)
        shoal.save(root / "gathered.npy", whole)
        assert (np.load(root / "gathered.npy") == np.arange(4 * MiB // 8)).all()
        dv.load("back", root / "gathered.npy", block=True)
        assert evaluate(dv, "float(back[-1])") == [float(4 * MiB // 8 - 1)] * 4


def test_load_without_io_uring_in_a_subprocess(tmp_path):
    """SHOAL_NO_URING=1: plain reads and writes, the same bytes."""
    code = ("import numpy as np, shoal, sys\n"
            "a = np.arange(300_000.0)\n"
            "shoal.save(sys.argv[1], a)\n"
            "b = shoal.load(sys.argv[1], arena=shoal.Arena(heap_size=64 << 20))\n"
            "assert (a == b).all()\n"
            "print(shoal._core.bulk_read(sys.argv[1], 0, bytearray(4096), uring=False)['uring'])\n")
    out = subprocess.run([os.sys.executable, "-c", code, str(tmp_path / "u.npy")], env=dict(os.environ, SHOAL_NO_URING="1"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_the_loaded_block_outlives_the_loaders_name_until_its_node_has_it(two_nodes):
    """On a node the client does not share, one engine loads and the others
    view its block. The loader's own name may go at once (`del x`), while
    another engine of its node is still busy: the block lives until that
    engine has its view. (Before, it failed with a stale handle.)"""
    import time
    ctl, first, second, root = two_nodes
    a = np.arange(200_000.0)
    np.save(root / "held.npy", a)
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        far = [e for e in rc.ids if rc._node_of(e) != rc._local_node]
        assert len(far) == 2
        loader, busy = far
        nap = rc[busy].apply_async(time.sleep, 1.0)  # its push waits behind this
        ar = rc[far].load("x", root / "held.npy", block=False)
        rc[loader].execute("del x", block=True)
        assert ar.get(10) == [None, None]
        nap.get(10)
        assert evaluate(rc[busy], "float(x[-1])") == 199_999.0
