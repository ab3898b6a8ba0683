"""Lanes: a local client's tasks go straight to the engines' rings, and
large results come back as views of arena blocks (docs/engine.md, "Lanes")."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shoal
from shoal import serialize

from procs import Agent, Controller, evaluate

MiB = 1 << 20


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def cluster(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("lanes")
    ctl = Controller(root / "home", heartbeat_ms=500)
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    agent = Agent(ctl, root / "run", engines=2, arena_size=2 << 30, env=env)
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture
def rc(cluster):
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    yield c
    c.close()


def anon_bytes(pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_lane_tasks_do_not_touch_the_controller(rc, cluster):
    ctl, agent = cluster
    assert rc[:].apply_sync(os.getpid) == [e["pid"] for e in agent.engines]
    assert all(rc._routes.lane.lanes[e] is not None for e in rc.ids), "each engine of this node has a lane"
    ctl.proc.send_signal(signal.SIGSTOP)  # a frozen controller cannot be on the path
    try:
        dv = rc[:]
        dv.block = True
        assert dv.apply(lambda x: x * 6, 7) == [42, 42]
        a = np.arange(1 << 18, dtype=np.int32).reshape(512, 512)[:, ::2]  # large and not contiguous
        dv.push({"a": a, "b": np.ones(1 << 17)})
        for got in dv.pull("a"):
            assert np.array_equal(got, a)
        assert evaluate(dv, "float(b.sum())") == [float(1 << 17)] * 2
        ar = rc[0].execute("print('on the lane')")
        ar.get(10)
        assert ar.stdout == "on the lane\n"
        with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
            rc[1].apply_sync(lambda: 1 / 0)
    finally:
        ctl.proc.send_signal(signal.SIGCONT)


def test_large_results_are_zero_copy_views_of_the_arena(rc):
    rc[0].execute("import numpy as np\nr = np.arange(8 << 20, dtype=np.float64)", block=True)  # 64 MiB
    gc.collect()
    before = anon_bytes()
    r = rc[0].pull("r", block=True)
    grew = anon_bytes() - before
    assert grew < 16 * MiB, f"the client's private memory grew by {grew / MiB:.0f} MiB for a 64 MiB result"
    owner = serialize._owner_block(r)
    assert owner is not None and owner.arena is rc.arena, "the result is a view of an arena block"
    assert not r.flags.writeable, "results are read-only views"
    assert r[12345] == 12345.0 and r[-1] == (8 << 20) - 1

    # An array that already lives in the arena comes back with no copy at all.
    big = rc.arena.empty((8 << 20,))
    big[:] = 3.0
    rc[0].push({"big": big}, block=True)
    used = rc.arena.stats()["used_bytes"]
    back = rc[0].pull("big", block=True)
    assert rc.arena.stats()["used_bytes"] - used < MiB, "no new block for an array that lives in the arena"
    assert serialize._owner_block(back).handle == serialize._owner_block(big).handle
    assert float(back.sum()) == 3.0 * (8 << 20)

    # When the views go, so do the blocks.
    rc[0].execute("del r, big", block=True)
    del r, owner, big, back
    gc.collect()
    rc[0].apply_sync(abs, 1)  # the engine takes its last releases
    assert wait_for(lambda: rc.arena.stats()["used_bytes"] < used - 60 * MiB), rc.arena.stats()


def test_an_engine_killed_mid_task_fails_it_within_a_second(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2)
    c = shoal.Client(url_file=str(ctl.conn), timeout=10)
    try:
        victim, survivor = [e["id"] for e in agent.engines]
        pid = c[victim].apply_sync(os.getpid)
        assert c._routes.lane.lanes[victim] is not None
        held = c[victim]  # a view made while it ran
        ar = c[victim].apply_async(time.sleep, 60)
        queued = c[victim].apply_async(abs, -1)  # waits behind it in the lane
        both = c[[victim, survivor]].apply_async(time.sleep, 0.5)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(shoal.EngineError) as e:
            ar.get(timeout=5)
        assert time.monotonic() - t0 < 1.0, "the failure arrives within a second"
        assert f"engine {victim} (pid {pid}) died" in str(e.value)
        with pytest.raises(shoal.EngineError):
            queued.get(5)
        with pytest.raises(shoal.CompositeError) as e:
            both.get(5)
        assert [type(x) for x in e.value.elist] == [shoal.EngineError], "one engine failed, the other did not"
        assert both._results[survivor] == (True, None), "the other engine finished its part"
        assert c[survivor].apply_sync(lambda: 1 + 1) == 2, "the other engines keep working"
        with pytest.raises(shoal.EngineError, match="is not running"):
            held.apply_sync(abs, 1)  # the lane is gone; the controller answers
        with pytest.raises(IndexError, match=f"no engine {victim}"):
            c[victim]  # gone from the registry, as ipyparallel's client says
    finally:
        c.close()
        agent.stop()
        ctl.stop()


def test_an_engine_killed_while_it_holds_a_pool_task(tmp_path):
    """The pool records who took each task: when that engine dies, its task
    fails (and only its task); what waits in the pool goes to the others."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2)
    c = shoal.Client(url_file=str(ctl.conn), timeout=10)
    try:
        lview = c.load_balanced_view()
        pids = dict(zip(c.ids, c[:].apply_sync(os.getpid)))
        long = lview.apply_async(lambda: (__import__("time").sleep(60), __import__("os").getpid())[1])
        assert c._routes.pool.pools, "both engines are on this node: the view has a pool"
        rest = [lview.apply_async(lambda x: (__import__("time").sleep(0.05), x)[1], i) for i in range(20)]
        assert wait_for(lambda: c.cluster_status()["unassigned"] < 20, 5)
        pool = next(iter(c._routes.pool.pools.values()))
        task_id = long.task_id  # no dependencies: the task went into the pool as it is
        taker = pool.ring.owner(pool.tasks[task_id])
        assert taker in pids, "the pool says which engine took the long task"
        t0 = time.monotonic()
        os.kill(pids[taker], signal.SIGKILL)
        with pytest.raises(shoal.EngineError) as e:
            long.get(timeout=5)
        assert time.monotonic() - t0 < 1.0, "the failure arrives within a second"
        assert f"engine {taker} (pid {pids[taker]}) died while running task {task_id}" in str(e.value)
        survivor = next(e for e in pids if e != taker)
        assert [ar.get(10) for ar in rest] == list(range(20)), "no other task is lost"
        assert {ar.metadata["engine_id"] for ar in rest} <= {survivor, taker}
        assert lview.map_sync(lambda x: -x, range(8)) == [-x for x in range(8)], "the view goes on"
    finally:
        c.close()
        agent.stop()
        ctl.stop()


def test_closing_a_client_takes_back_what_waits_in_its_pool(cluster, tmp_path):
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    lview = c.load_balanced_view()
    busy = [lview.apply_async(time.sleep, 0.5) for _ in c.ids]
    waiting = [lview.apply_async(lambda p: open(p, "w").close(), str(tmp_path / f"ran{i}")) for i in range(5)]
    time.sleep(0.1)
    c.close()
    for ar in waiting:
        with pytest.raises(shoal.EngineError, match="client was closed"):
            ar.get(1)
    for ar in busy:
        with pytest.raises(shoal.EngineError, match="client was closed"):
            ar.get(1)
    time.sleep(1.0)  # the engines finish the busy tasks and look at the pool again
    assert sorted(p.name for p in tmp_path.glob("ran*")) == [], "no engine started what waited"
    again = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    try:
        assert again.load_balanced_view().map_sync(abs, [-1, -2, -3]) == [1, 2, 3]
    finally:
        again.close()


def test_submissions_wait_for_room_and_lose_nothing(rc, monkeypatch):
    """Each outstanding lane or pool task holds an arena block, and an entry
    of the client's reference table (16384): past MAX_LANE_TASKS a
    submission takes results first. 20,000 at once used to fill the table
    and fail results that could not be read."""
    from shoal import client as client_mod
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(abs, -i) for i in range(20_000)]
    assert [ar.get(60) for ar in ars] == list(range(20_000))
    monkeypatch.setattr(client_mod, "MAX_LANE_TASKS", 64)
    dv = rc[:]
    most = 0
    ars = []
    for i in range(400):
        ars.append(lview.apply_async(abs, -i) if i % 2 else dv.apply_async(abs, -i))
        most = max(most, len(rc._routes.lane.tasks) + len(rc._routes.pool.tasks))
    assert most <= 64
    assert [ar.get(30) for ar in ars] == [i if i % 2 else [i, i] for i in range(400)]


def test_replies_are_let_go_small_ones_with_the_next_task_large_ones_at_once(rc, monkeypatch):
    """A reply whose value holds arena buffers is released at once, so that
    dropping the value frees them with no next task; a small one of a task
    for more engines than cores stays with its engine until the engine's
    next task carries the RELEASE (waking a sleeping engine only for that
    cost a context switch per engine)."""
    rc[:].apply_sync(abs, 1)
    time.sleep(0.1)  # the RELEASEs of that reach the engines
    base = rc.arena.stats()["used_blocks"]
    base_bytes = rc.arena.stats()["used_bytes"]
    ar = rc[0].apply_async(np.ones, 1 << 20)  # 8 MiB, in an arena block of engine 0's
    time.sleep(0.2)  # taken once the engine sleeps: only a wake-up lets it see the RELEASE
    x = ar.get(10)
    del ar
    assert x.sum() == 1 << 20
    assert rc.arena.stats()["used_bytes"] > base_bytes + (7 << 20)
    del x
    gc.collect()
    assert wait_for(lambda: rc.arena.stats()["used_bytes"] < base_bytes + (1 << 20)), (base, rc.arena.stats())
    assert wait_for(lambda: rc.arena.stats()["used_blocks"] <= base), (base, rc.arena.stats())
    # Small replies never pile up: released at once for no more engines
    # than cores, with the next task (one kept per engine) for more.
    for _ in range(50):
        rc[:].apply_sync(abs, -1)
    assert wait_for(lambda: rc.arena.stats()["used_blocks"] <= base), (base, rc.arena.stats())
    from shoal import route_lane
    monkeypatch.setattr(route_lane, "_CORES", 1)  # two engines, "more than cores"
    for _ in range(50):
        rc[:].apply_sync(abs, -1)
    assert rc.arena.stats()["used_blocks"] <= base + len(rc.ids)
    # Taken once the engines sleep: each keeps its reply, not woken for it...
    ar = rc[:].apply_async(abs, -1)
    time.sleep(0.2)
    assert ar.get(10) == [1] * len(rc.ids)
    time.sleep(0.1)
    assert rc.arena.stats()["used_blocks"] == base + len(rc.ids), (base, rc.arena.stats())
    # ...until its next task brings the RELEASE.
    monkeypatch.setattr(route_lane, "_CORES", len(rc.ids))
    rc[:].apply_sync(abs, -1)
    assert wait_for(lambda: rc.arena.stats()["used_blocks"] <= base), (base, rc.arena.stats())


def test_a_client_killed_mid_task_leaves_nothing_behind(rc, cluster):
    # Each engine keeps our last small reply until its next task says it may
    # let go (route_lane.RELEASE_WAKE_BYTES): the same one block each here and below.
    rc[:].apply_sync(abs, 1)
    base = rc.arena.stats()["used_blocks"]
    script = textwrap.dedent(f"""
        import sys, time, numpy as np, shoal
        c = shoal.Client(url_file={str(cluster[0].conn)!r})
        c[0].push({{"junk": np.ones(4 << 20)}})
        c[0].apply_async(time.sleep, 1)
        c[1].apply_async(lambda: __import__("numpy").ones(4 << 20))
        lview = c.load_balanced_view()  # a pool, with tasks taken and waiting
        [lview.apply_async(time.sleep, 0.3) for _ in range(6)]
        assert c._routes.pool.pools
        print("sent", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "sent\n"
    finally:
        p.kill()
        p.wait()
    # Its lanes close, the engines finish and drop them, and every block it
    # or they held for it goes back.
    assert rc[:].apply_sync(abs, -2) == [2, 2]
    rc[:].execute("junk = None", block=True)
    assert wait_for(lambda: rc[:].apply_sync(abs, 1) and rc.arena.stats()["used_blocks"] <= base), \
        (base, rc.arena.stats())


def test_a_view_across_two_nodes_takes_both_paths(rc, cluster, tmp_path):
    ctl, agent = cluster
    other = Agent(ctl, tmp_path / "run2", engines=1)
    c = shoal.Client(url_file=str(ctl.conn), timeout=10)
    try:
        mine, theirs = agent.engines[0]["id"], other.engines[0]["id"]
        pids = c[[mine, theirs]].apply_sync(os.getpid)
        assert pids == [agent.engines[0]["pid"], other.engines[0]["pid"]]
        lanes = c._routes.lane.lanes
        assert lanes[mine] is not None and lanes[theirs] is None, "a lane here, the controller there"
        a = np.arange(1 << 16, dtype=np.float32)
        c[[mine, theirs]].push({"a": a}, block=True)
        assert [float(x) for x in evaluate(c[[mine, theirs]], "a.sum()")] == [float(a.sum())] * 2
    finally:
        c.close()
        other.stop()


def test_bad_lane_requests_get_an_error_and_the_agent_goes_on(rc):
    local = rc.local
    assert "error" in local.ask({"lane": 999})
    assert "error" in local.ask({"lane": -1})
    assert "error" in local.ask({"lane": "zero"})
    assert "error" in local.ask({"lane": 1e300})
    again = local.ask({"lane": 0})
    assert again["block"] == list(rc._routes.lane.lane(0).handle), "asking twice gives the same lane"
    assert rc[:].apply_sync(abs, -4) == [4, 4]


def test_a_restarted_engine_gets_a_lane_of_its_own(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=1, extra=["--restart-engines"])
    c = shoal.Client(url_file=str(ctl.conn), timeout=10)
    try:
        old = agent.engines[0]["id"]
        pid = c[old].apply_sync(os.getpid)
        os.kill(pid, signal.SIGKILL)

        def replaced():
            c.refresh()
            return [e for e in c.ids if e != old]
        assert wait_for(replaced, 10), "a new engine took the dead one's place"
        new = replaced()[0]
        assert c[new].apply_sync(os.getpid) not in (pid, None)
        assert c._routes.lane.lanes[new] is not None, "the new engine is reached through a lane"
        assert c._routes.lane.lanes.get(old) is None
    finally:
        c.close()
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("lanes", [True, False])
def test_shutdown_of_some_engines(tmp_path, lanes):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=3, extra=["--restart-engines"])
    c = shoal.Client(url_file=str(ctl.conn), timeout=10, lanes=lanes)
    try:
        ids = c.ids
        pids = c[:].apply_sync(os.getpid)
        first = c[ids[0]].apply_async(time.sleep, 0.3)
        ar = c.shutdown(targets=ids[:2], block=False)
        late = c[ids[1]].apply_async(abs, -1)  # sent after the shutdown: never run
        assert ar.get(10) == [None, None] and first.get(10) is None, "they finish what they were given"
        with pytest.raises(shoal.EngineError, match="was stopped"):
            late.get(20)
        assert wait_for(lambda: c.refresh() or c.ids == ids[2:], 20), c.ids
        time.sleep(0.5)
        c.refresh()
        assert c.ids == ids[2:], "engines stopped on request are not restarted"
        for pid in pids[:2]:
            assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
        assert c[ids[2]].apply_sync(abs, -1) == 1
        with pytest.raises(NotImplementedError):
            c.shutdown(restart=True)
    finally:
        c.close()
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("where", ["_slot", "_add"])
def test_a_ctrl_c_while_taking_replies_loses_none_and_hangs_nothing(rc, where):
    # Every engine's reply waits in its ring; the client is cut (as by a
    # Ctrl-C) as it starts on the first of them: before taking it off its
    # inbox (LaneRoute._slot), or after, while reading it (AsyncResult._add).
    dv = rc[:]
    ar = dv.apply_async(time.sleep, 0.2)
    time.sleep(1.0)

    class Cut(BaseException):
        pass

    code = shoal.AsyncResult._add.__code__ if where == "_add" else shoal.route_lane.LaneRoute._slot.__code__
    armed = [True]

    def cut(frame, event, _):
        if event == "call" and frame.f_code is code and armed[0]:
            armed[0] = False
            raise Cut()

    sys.settrace(cut)
    try:
        with pytest.raises(Cut):
            ar.wait(10)
    finally:
        sys.settrace(None)
    assert not armed[0], "cut where asked"
    assert ar.wait(10), "every reply was taken, the one cut short included: nothing waits for ever"
    failed = [v for ok, v in ar._results.values() if not ok]
    if where == "_slot":
        assert not failed, "a reply not yet taken off the inbox is taken at the next receiving"
        assert ar.get() == [None] * len(rc.ids)
    else:
        assert len(failed) == 1 and isinstance(failed[0], shoal.EngineError)
        assert "taking the reply was interrupted" in str(failed[0])
        assert sum(ok for ok, _ in ar._results.values()) == len(rc.ids) - 1
    # Each reply's block was released once: the engines go on as before.
    for _ in range(3):
        assert dv.apply_sync(abs, -3) == [3] * len(rc.ids)


class _Handle:
    """What route_lane takes for a message block: only its handle is read."""

    def __init__(self, handle):
        self.handle = handle


@pytest.mark.parametrize("bad", ["magic", "frame past the end", "request", "handle"])
def test_a_malformed_task_block_gets_an_error_and_the_engine_goes_on(rc, monkeypatch, bad):
    """The engine's loop (engine/loop.c) decodes each task's block: one
    that is not a message block, whose frames run past it, whose request
    is not JSON, or whose handle names no block, is answered with an error
    saying so, and the engine serves the next task."""
    import shoal.route_lane as route_lane
    from shoal._msgblock import FRAMES_HDR, FRAMES_MAGIC
    arena = rc.arena

    def block_of(data):
        block = arena.alloc(len(data))
        memoryview(block).cast("B")[:] = data
        return block

    def malformed(_arena, payload, buffers=()):
        if bad == "magic":
            return block_of(b"\x00" * 64)
        if bad == "frame past the end":
            return block_of(FRAMES_HDR.pack(FRAMES_MAGIC, 2, 2, 0) + (1 << 40).to_bytes(8, "little") * 2 + b"x" * 8)
        if bad == "request":
            return arena.pack([b"{not json", bytes(payload[1])], 2)
        return _Handle((arena.stats()["heap_size"] + (1 << 20), 4096, 1))  # past the arena's end

    monkeypatch.setattr(route_lane, "pack_frames", malformed)
    ar = rc[0].apply_async(abs, -3)
    with pytest.raises(shoal.RemoteError) as err:
        ar.get(10)
    monkeypatch.undo()
    expect = {"magic": ("ValueError", "not a shoal message block"),
              "frame past the end": ("ValueError", "a frame runs past its message block"),
              "request": ("JSONDecodeError", ""),
              "handle": ("OSError", "cannot use this arena handle")}[bad]
    assert err.value.ename == expect[0] and expect[1] in str(err.value.evalue), err.value
    assert rc[0].apply_sync(abs, -4) == 4, "the engine serves the next task"
    assert rc[:].apply_sync(abs, -5) == [5, 5]
