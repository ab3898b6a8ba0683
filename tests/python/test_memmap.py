"""numpy memmaps by reference, and shared and copy-on-write arrays from the
client (docs/serialization.md, "Memmaps" and "Shared and copy-on-write
arrays"), on a real cluster of three engines on both event-loop backends,
through lanes and through the controller; and a node in a mount namespace
of its own, where the client's file is not the same file."""

import os

import numpy as np
import pytest

import shoal

from procs import Agent, Controller, evaluate, make_cgroup, private_mount, remove_cgroup

MiB = 1 << 20


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def cluster(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"memmap-{request.param}")
    ctl = Controller(root / "home", heartbeat_ms=500)
    agent = Agent(ctl, root / "run", engines=3, arena_size=1 << 30,
                  env={"SHOAL_NO_URING": "1"} if request.param == "epoll" else {})
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture(params=["lanes", "controller"])
def rc(request, cluster):
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10, lanes=request.param == "lanes")
    c.clear(block=True)
    yield c
    c.close()


def anon_kib(pid):
    """The private memory of process pid (RssAnon), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError(f"no RssAnon for {pid}")


def a_file(tmp_path, mode, n=4 * MiB // 8, name="data.f8"):
    """A memmap of n float64s 0, 1, 2, ... in a new file, in mode."""
    path = tmp_path / name
    m = np.memmap(path, dtype="f8", mode="w+", shape=(n,))
    m[:] = np.arange(n)
    m.flush()
    del m
    return np.memmap(path, dtype="f8", mode=mode, shape=(n,))


def test_a_pushed_memmap_is_mapped_by_each_engine_not_copied(rc, tmp_path):
    """A 64 MiB memmap pushed to three engines: a pickle of a few hundred
    bytes, each engine maps the file (an np.memmap of the same file and
    mode), and no engine's private memory grows by its size."""
    m = a_file(tmp_path, "r", n=64 * MiB // 8)
    pids = rc[:].apply_sync(os.getpid)
    before = [anon_kib(p) for p in pids]
    from shoal import serialize
    assert len(serialize.dumps(m).payload) < 1000, "the memmap went by value"
    rc[:].push({"m": m}, block=True)
    got = evaluate(rc[:], "(type(m).__name__, m.filename, m.mode, m.flags.writeable, float(m.sum()))")
    n = m.size
    assert got == [("memmap", str(tmp_path / "data.f8"), "r", False, float(n * (n - 1) // 2))] * 3
    grown = [anon_kib(p) - b for p, b in zip(pids, before)]
    assert max(grown) < 16 * 1024, f"engines' private memory grew by {grown} KiB for a 64 MiB memmap"
    # Read-only is read-only there too.
    with pytest.raises(shoal.CompositeError, match="read-only"):
        rc[:].execute("m[0] = 1", block=True)


def test_r_plus_is_one_memory_for_every_engine_and_the_client(rc, tmp_path):
    """mode r+: a write by one engine is seen by the others and by the
    client's own memmap; flush() writes it to the file."""
    m = a_file(tmp_path, "r+")
    dv = rc[:]
    dv.push({"m": m}, block=True)
    first, *others = rc.ids
    rc[first].execute("m[7] = -1.5\nm.flush()", block=True)
    assert evaluate(rc[others], "float(m[7])") == [-1.5] * len(others)
    assert m[7] == -1.5
    m[8] = -2.5  # and the client's write, the engines'
    assert evaluate(dv, "float(m[8])") == [-2.5] * 3
    assert np.fromfile(tmp_path / "data.f8", dtype="f8", count=9)[7] == -1.5


def test_c_is_copy_on_write_for_each_engine(rc, tmp_path):
    """mode c: each engine may write, and nobody else sees it."""
    m = a_file(tmp_path, "c")
    dv = rc[:]
    dv.push({"m": m}, block=True)
    dv.scatter("me", rc.ids, flatten=True, block=True)
    dv.execute("m[3] = me", block=True)
    assert evaluate(dv, "float(m[3])") == [float(e) for e in rc.ids]
    assert m[3] == 3.0
    assert np.fromfile(tmp_path / "data.f8", dtype="f8", count=4)[3] == 3.0


def test_a_copy_on_write_memmap_the_sender_wrote_to_goes_by_value(rc, tmp_path):
    """The client writes to its own c memmap: the file does not have that
    write, so the engines get the client's bytes (and a note), not the
    file's; before any write it goes by reference."""
    m = a_file(tmp_path, "c", n=1 << 15)
    ar = rc[:].apply_async(lambda a: (type(a).__name__, float(a[0])), m)
    assert ar.get(10) == [("memmap", 0.0)] * 3 and all("notes" not in md for md in ar.metadata)
    m[0] = 42.0
    ar = rc[:].apply_async(lambda a: (type(a).__name__, float(a[0]), a.flags.writeable), m)
    assert ar.get(10) == [("ndarray", 42.0, True)] * 3
    assert all("wrote to its copy-on-write memmap" in md["notes"][0] for md in ar.metadata)


def test_a_sparse_view_goes_by_value_as_its_elements(tmp_path):
    """Every 4096th element of a 32 MiB memmap, by value: 64 KiB of
    elements, not the 32 MiB between them."""
    from shoal import serialize
    m = a_file(tmp_path, "r", n=4 * MiB)
    s = serialize.dumps(m[::4096], memmaps="value")
    assert sum(memoryview(f).nbytes for f in s.frames) + len(s.payload) < 2 * 8 * 1024 + 1000
    back = serialize.loads(s.payload, s.buffers, s.frames)
    assert (back == m[::4096]).all()


def test_memmap_arguments_views_and_results_go_by_reference(rc, tmp_path):
    """As an argument, a strided view of a memmap reaches the engine as
    the same elements of the file; a memmap an engine returns comes back
    by reference to a client on its node (lanes), as bytes with a note
    through the controller."""
    m = a_file(tmp_path, "r+", n=1 << 16)
    view = m.reshape(256, 256)[10:20, ::-3]
    e = rc.ids[0]
    back = rc[e].apply_sync(lambda a: (type(a).__name__, a.shape, a.strides, a.tolist()), view)
    assert back == ("memmap", view.shape, view.strides, view.tolist())
    ar = rc[e].apply_async(lambda a: a[5:9], m)
    got = ar.get(10)
    assert got.tolist() == [5.0, 6.0, 7.0, 8.0]
    if rc._routes.lane.use:
        assert isinstance(got, np.memmap) and got.filename == str(m.filename)
        assert "notes" not in ar.metadata
        m[6] = 60.0
        assert got[1] == 60.0, "the result is the file's memory"
    else:
        assert type(got) is np.ndarray
        assert "its bytes were sent" in " ".join(ar.metadata["notes"])


def test_scatter_of_a_memmap_maps_each_engine_its_rows(rc, tmp_path):
    m = a_file(tmp_path, "r+", n=3000).reshape(1000, 3)
    dv = rc[:]
    dv.scatter("part", m, block=True)
    parts = evaluate(dv, "(type(part).__name__, part.shape, float(part[0, 0]), part.offset)")
    assert [p[:3] for p in parts] == [("memmap", (334, 3), 0.0), ("memmap", (333, 3), 1002.0),
                                      ("memmap", (333, 3), 2001.0)]
    assert [p[3] for p in parts] == [0, 334 * 24, 667 * 24]
    dv.execute("part[0, 0] = -part[0, 0] - 1", block=True)
    assert m[[0, 334, 667], 0].tolist() == [-1.0, -1003.0, -2002.0]
    # Gathered back: the engines' rows joined, the writes in them.
    assert dv.gather("part", block=True)[334, 0] == -1003.0


def test_load_balanced_and_map_take_memmaps_by_reference(rc, tmp_path):
    m = a_file(tmp_path, "r", n=1 << 16)
    lv = rc.load_balanced_view()
    assert lv.apply_sync(lambda a: (type(a).__name__, float(a[-1])), m) == ("memmap", float(m.size - 1))
    sums = rc[:].map_sync(lambda part: float(part.sum()), m)
    assert sum(sums) == float(m.sum())


def test_a_memmap_whose_file_was_deleted_or_replaced_goes_by_value_and_says_so(rc, tmp_path):
    """The client maps a file, then it is deleted (or replaced by another
    under its name): the engines get the client's bytes, not the file
    that now has that name, and the metadata says why."""
    gone = a_file(tmp_path, "r", n=1 << 15, name="gone.f8")
    os.unlink(tmp_path / "gone.f8")
    replaced = a_file(tmp_path, "r", n=1 << 15, name="replaced.f8")
    other = tmp_path / "other.f8"
    np.full(1 << 15, 9.0).tofile(other)
    os.replace(other, tmp_path / "replaced.f8")
    for m, why in ((gone, "deleted or replaced"), (replaced, "deleted or replaced")):
        ar = rc[:].apply_async(lambda a: (type(a).__name__, float(a.sum()), a.flags.writeable), m)
        assert ar.get(10) == [("ndarray", float(m.sum()), False)] * 3
        for md in ar.metadata:
            assert why in " ".join(md["notes"]), md


def test_a_memmap_whose_file_was_truncated_is_refused_at_the_send(rc, tmp_path):
    """The file is truncated after the client mapped it: its pages past
    the new end cannot be read (SIGBUS), here or by an engine, so the send
    fails with the sizes; nothing is sent, and the cluster goes on."""
    m = a_file(tmp_path, "r", n=1 << 15, name="short.f8")
    os.truncate(tmp_path / "short.f8", 1024)
    with pytest.raises(ValueError, match="shorter than the memmap reaches"):
        rc[:].apply_sync(lambda a: float(a[-1]), m[100:])
    assert rc[:].apply_sync(lambda a: float(a[0]), m[:128]) == [0.0] * 3, "what lies inside the file still goes"


# ---- shared and copy-on-write arrays from the client -----------------------------------

def test_a_shared_array_is_one_memory_for_the_engines_and_the_client(rc):
    """rc.shared(a) (r+): each engine fills its rows, the client sees
    every write, and later pushes reach the same memory."""
    if rc.arena is None:
        with pytest.raises(RuntimeError, match="no arena"):
            rc.shared(np.zeros(4))
        return
    out = rc.shared(np.zeros((3, 100_000)))
    dv = rc[:]
    dv.push({"out": out}, block=True)
    dv.scatter("row", list(range(3)), flatten=True, block=True)
    dv.execute("out[row, :] = row + 1", block=True)
    assert (out == np.arange(1, 4)[:, None]).all()
    assert evaluate(dv, "type(out).__name__, out.mode, out.flags.writeable") == [("SharedArray", "r+", True)] * 3
    # A small one is shared too (out of band whatever its size).
    tiny = rc.shared(np.zeros(3))
    dv.push({"tiny": tiny}, block=True)
    dv.execute("tiny[row] = 7", block=True)
    assert tiny.tolist() == [7.0, 7.0, 7.0]


def test_sharing_an_array_received_read_only_makes_a_copy(rc):
    """A result the client holds read-only (an arena view through lanes)
    is everyone's: rc.shared copies it, and shoal.shared's r+ send does
    too, so the engines that had it still see it unchanged."""
    e = rc.ids[0]
    got = rc[e].apply_sync(lambda: __import__("numpy").arange(100_000.0))
    if rc.arena is None:
        return
    assert not got.flags.writeable
    mine = rc.shared(got)
    assert mine.flags.writeable and not np.shares_memory(mine, got)
    dv = rc[:]
    dv.push({"w": shoal.shared(got)}, block=True)
    dv.execute("w[0] = -1", block=True)
    assert got[0] == 0.0, "a read-only array was written through"


def test_a_copy_on_write_array_lets_each_engine_write_alone(rc):
    """shared(a, mode="c"): each engine may write; nobody else sees it,
    and an engine's copy costs only the pages it wrote."""
    a = np.arange(4 * MiB // 8, dtype="f8")
    for cow in (shoal.shared(a, mode="c"), *([rc.shared(a, mode="c")] if rc.arena is not None else [])):
        dv = rc[:]
        dv.push({"cow": cow}, block=True)
        dv.scatter("me", rc.ids, flatten=True, block=True)
        dv.execute("cow[0] = me", block=True)
        assert evaluate(dv, "float(cow[0]), float(cow[1]), cow.flags.writeable") == \
            [(float(e), 1.0, True) for e in rc.ids]
        assert cow[0] == 0.0


def test_a_shared_array_of_private_memory_is_shared_by_the_engines_of_one_send(rc):
    """shoal.shared(a) of an array of the client's own memory: the engines
    of one push share one copy (in the arena: the client's writes and
    theirs are apart)."""
    a = np.zeros(3)
    dv = rc[:]
    dv.push({"s": shoal.shared(a)}, block=True)
    dv.scatter("row", list(range(3)), flatten=True, block=True)
    dv.execute("s[row] = row + 1", block=True)
    if rc.arena is not None:  # one block of the arena for every engine of the node
        assert evaluate(dv, "s.tolist()") == [[1.0, 2.0, 3.0]] * 3
    assert a.tolist() == [0.0, 0.0, 0.0]
    # A strided view of private memory: the same elements, writable there.
    b = np.arange(20.0).reshape(4, 5)[::-2, 1::2]
    dv.push({"t": shoal.shared(b)}, block=True)
    assert evaluate(dv, "t.tolist(), t.flags.writeable") == [(b.tolist(), True)] * 3


def test_shared_refuses_what_cannot_be_shared():
    with pytest.raises(ValueError, match="mode"):
        shoal.shared(np.zeros(3), mode="w")
    with pytest.raises(TypeError, match="objects"):
        shoal.shared(np.array([object()]))


# ---- a node where the client's file is not the same file ---------------------------------

@pytest.fixture
def elsewhere(tmp_path):
    """A controller, a node with one engine, and a second node with one
    engine in a mount namespace of its own, where tmp_path/data is an
    empty tmpfs: the files the client makes there do not exist for it."""
    if os.geteuid() != 0:
        pytest.skip("making a mount namespace needs root")
    data = tmp_path / "data"
    data.mkdir()
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    here = Agent(ctl, tmp_path / "run", engines=1)
    try:
        away = Agent(ctl, tmp_path / "run2", engines=1, preexec_fn=private_mount(data))
    except BaseException:
        here.stop()
        ctl.stop()
        raise
    yield ctl, here, away, data
    away.stop()
    here.stop()
    ctl.stop()


@pytest.mark.parametrize("lanes", [True, False])
def test_an_engine_without_the_file_gets_its_bytes_once_and_says_so(elsewhere, lanes):
    """The engine of the other node does not have the file (missing there),
    then has another file under its name: both times it gets the bytes
    (by the controller), with a note in its metadata; the engine of the
    client's node maps the file."""
    ctl, here, away, data = elsewhere
    n = 1 << 16
    path = data / "x.f8"
    np.arange(n, dtype="f8").tofile(path)
    m = np.memmap(path, dtype="f8", mode="r", shape=(n,))
    near, far = here.engines[0]["id"], away.engines[0]["id"]
    with shoal.Client(url_file=str(ctl.conn), lanes=lanes) as rc:
        assert rc._on_this_node(near) and not rc._on_this_node(far)
        f = lambda a: (type(a).__name__, float(a.sum()))  # noqa: E731
        for step in ("missing", "another file"):
            if step == "another file":
                rc[far].execute(f"import numpy as np\nnp.zeros({n}).tofile({str(path)!r})", block=True)
            ar = rc[[near, far]].apply_async(f, m)
            assert ar.get(10) == [("memmap", float(m.sum())), ("ndarray", float(m.sum()))], step
            assert "notes" not in ar.metadata[0]
            assert "its bytes were sent" in ar.metadata[1]["notes"][0]
            assert ("cannot be opened" if step == "missing" else "not the file") in ar.metadata[1]["notes"][0]
        # What went by value to the far engine is read-only, as the file was.
        with pytest.raises(shoal.RemoteError, match="read-only"):
            rc[far].apply_sync(lambda a: a.__setitem__(0, 1), m)
        # A FileNotSame of the user's own code is its result: the task is
        # not run again (it ran once on each engine).
        @shoal.interactive  # in the engine's namespace
        def mine(a):
            global runs
            runs = globals().get("runs", 0) + 1
            raise __import__("shoal").FileNotSame("the user's own")
        with pytest.raises(shoal.CompositeError, match="the user's own"):
            rc[[near, far]].apply_sync(mine, m)
        assert rc[[near, far]].pull("runs", block=True) == [1, 1]


# ---- under a memory limit ---------------------------------------------------------------

@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_memmap_larger_than_the_nodes_memory_limit_reaches_every_engine(tmp_path, version):
    """The agent and its two engines in a memory cgroup of 384 MiB (v2 or
    v1, whichever has a memory controller here), a 1 GiB memmap pushed to
    both, each summing all of it: its
    pages are the page cache's, which the kernel takes back under the
    limit; no engine is killed. (Before: each engine unpickled a private
    1 GiB copy, and the OOM killer took one.)"""
    cg, why = make_cgroup(version == "v1", 384 * MiB)
    if cg is None:
        pytest.skip(why)
    ctl = agent = None
    try:
        def enter():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        ctl = Controller(tmp_path / "home", heartbeat_ms=500)
        agent = Agent(ctl, tmp_path / "run", engines=2, arena_size=128 * MiB, preexec_fn=enter)
        m = a_file(tmp_path, "r", n=1024 * MiB // 8, name="big.f8")
        with shoal.Client(url_file=str(ctl.conn)) as rc:
            pids = rc[:].apply_sync(os.getpid)
            rc[:].push({"m": m}, block=True)
            n = m.size
            assert evaluate(rc[:], "float(m.sum())") == [float(n * (n - 1) // 2)] * 2
            assert rc[:].apply_sync(os.getpid) == pids, "an engine was replaced"
        with open(os.path.join(cg, "memory.events" if version == "v2" else "memory.oom_control")) as f:
            events = dict(line.split() for line in f)
        assert events.get("oom_kill", "0") == "0", events
    finally:
        if agent is not None:
            agent.stop()
        if ctl is not None:
            ctl.stop()
        remove_cgroup(cg)
