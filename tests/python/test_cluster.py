"""A real cluster - controller, agent, engines - driven by shoal.Client."""

import os
import signal
import time

import numpy as np
import pytest

import shoal
from shoal import _core

from procs import Agent, Controller, evaluate

MiB = 1 << 20


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def cluster(request, tmp_path_factory):
    """A controller and an agent with two engines, on each event-loop backend."""
    root = tmp_path_factory.mktemp("cluster")
    ctl = Controller(root / "home", heartbeat_ms=500)
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    agent = Agent(ctl, root / "run", engines=2, arena_size=3 << 30, env=env)
    if request.param == "epoll":
        assert agent.node["loop"] == "epoll"
    os.environ["SHOAL_DIR"] = str(ctl.root)
    yield ctl, agent
    agent.stop()
    ctl.stop()
    os.environ.pop("SHOAL_DIR", None)


@pytest.fixture(params=["lanes", "controller"])
def rc(request, cluster):
    """A client whose tasks take lanes to the engines, or go through the controller."""
    c = shoal.Client(timeout=10, lanes=request.param == "lanes")
    yield c
    c.close()


def test_engines_are_separate_processes_with_persistent_state(rc, cluster):
    assert rc.ids == [0, 1]
    pids = rc[:].apply_sync(os.getpid)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert sorted(pids) == sorted(e["pid"] for e in cluster[1].engines)
    rc[:].execute("counter = 0", block=True)
    for _ in range(3):
        rc[:].execute("counter += 1", block=True)
    assert rc[:].pull("counter", block=True) == [3, 3]
    reply = rc[0].execute("counter * 10", silent=False, block=True).get()
    assert reply.execute_result["data"]["text/plain"] == "30", "execute shows the last expression's value"
    assert rc[:].execute("counter * 10", block=True).execute_result == [None, None], "unless silent"


def test_apply_async_and_async_result(rc):
    ar = rc[1].apply_async(lambda x, y=1: x * y, 6, y=7)
    assert isinstance(ar, shoal.AsyncResult)
    assert ar.wait(10) and ar.ready() and ar.successful()
    assert ar.get(timeout=1) == 42
    view = rc[[0, 1]]
    view.block = True
    assert view.apply(lambda: 5) == [5, 5]


def test_stdout_is_captured(rc):
    ar = rc[0].execute("print('hello from the engine')")
    ar.get(10)
    assert ar.stdout == "hello from the engine\n"


def test_a_stream_kept_by_user_code_writes_into_the_task_that_runs(rc):
    """A logging handler made in one task keeps the engine's sys.stderr; what
    it writes in a later task is that later task's stderr, as with
    ipyparallel, not lost."""
    rc[0].execute("import logging, sys\nlog = logging.getLogger('kept')\nlog.propagate = False\n"
                  "log.handlers[:] = [logging.StreamHandler()]", block=True)
    ar = rc[0].execute("log.warning('from a later task')")
    ar.get(10)
    assert ar.stderr == "from a later task\n"
    ar = rc[0].execute("print('next')")
    ar.get(10)
    assert ar.stdout == "next\n" and ar.stderr == "", "each task starts with empty streams"


def test_push_pull_objects(rc):
    dv = rc[:]
    dv.block = True
    obj = {"a": [1, 2, 3], "b": ("x", None), "c": {1.5, 2.5}}
    dv.push({"obj": obj, "n": 7})
    assert dv.pull("obj") == [obj, obj]
    assert dv.pull(["n", "obj"]) == [[7, obj], [7, obj]]
    dv["y"] = "why"
    assert dv["y"] == ["why", "why"]


@pytest.mark.parametrize("make", [
    lambda: np.arange(10.0),
    lambda: np.arange(300_000, dtype="i4").reshape(300, 1000),        # large: through the arena
    lambda: np.asfortranarray(np.arange(200_000.0).reshape(400, 500)),
    lambda: np.arange(400_000.0)[::3],                               # non-contiguous
    lambda: np.array(3.25),                                          # 0-d
    lambda: np.array([{"k": 1}, "s", None], dtype=object),           # object
    lambda: np.arange(100_000).astype("M8[s]"),
    lambda: (np.arange(70_000) % 2).astype(bool),
    lambda: np.arange(50_000, dtype=np.complex128),
    lambda: np.array(["ab", "cde"] * 20_000),
])
def test_push_pull_arrays_round_trip(rc, make):
    a = make()
    rc[:].push({"a": a}, block=True)
    back = rc[:].pull("a", block=True)
    for b in back:
        assert b.dtype == a.dtype and b.shape == a.shape
        if a.dtype == object:
            assert list(b) == list(a)
        else:
            np.testing.assert_array_equal(b, a)


def test_exceptions_carry_the_remote_traceback(rc):
    def fail(x):
        raise ValueError(f"bad value {x}")
    with pytest.raises(shoal.RemoteError) as e:
        rc[0].apply_sync(fail, 3)
    err = e.value
    assert err.ename == "ValueError" and err.evalue == "bad value 3" and err.engine_id == 0
    assert "in fail" in err.traceback and "ValueError: bad value 3" in err.traceback
    assert "_engine.py" not in err.traceback, "the engine's own frames are left out"
    assert "engine 0" in str(err) and f"task {err.task_id}" in str(err)
    with pytest.raises(shoal.RemoteError, match="NameError"):
        rc[1].execute("undefined_name + 1", block=True)
    with pytest.raises(shoal.RemoteError, match="not defined on this engine"):
        rc[1].pull("nothing_here", block=True)
    # A list of engines raises a CompositeError of every engine's error, as ipyparallel does.
    with pytest.raises(shoal.CompositeError) as e:
        rc[[0, 1]].apply_sync(fail, 4)
    assert [(x.engine_id, x.ename) for x in e.value.elist] == [(0, "ValueError"), (1, "ValueError")]
    assert str(e.value).splitlines() == ["one or more exceptions raised in: apply",
                                         "[0:apply]: ValueError: bad value 4", "[1:apply]: ValueError: bad value 4"]
    assert isinstance(e.value, shoal.RemoteError) and repr(e.value) == "CompositeError(2)"


def test_timeouts(rc):
    ar = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(shoal.TimeoutError):
        ar.get(timeout=0.05)
    assert isinstance(shoal.TimeoutError("x"), TimeoutError)
    assert ar.get(timeout=10) is None


def test_a_large_array_reaches_every_engine_through_the_arena(rc):
    if rc.arena is None:
        pytest.skip("no local agent arena")
    a = np.ones(1024 * MiB // 8)  # 1 GiB
    a[::4096] = np.arange(len(a[::4096]))
    rc[:].execute("import os\n"
                  "def anon():\n"
                  "    for line in open('/proc/self/status'):\n"
                  "        if line.startswith('RssAnon:'):\n"
                  "            return int(line.split()[1]) * 1024\n"
                  "before = anon()", block=True)
    rc[:].push({"big": a}, block=True)
    grew = evaluate(rc[:], "anon() - before")
    for g in grew:
        assert g < 64 * MiB, f"an engine's private memory grew by {g / MiB:.0f} MiB for a 512 MiB array"
    sums = evaluate(rc[:], "float(big.sum()), big.flags.writeable")
    assert sums == [(float(a.sum()), False)] * 2, "identical data, read-only views"
    used = rc.arena.stats()["used_bytes"]
    assert a.nbytes <= used < 2 * a.nbytes, "one copy in the arena, shared by both engines"
    rc[:].execute("del big", block=True)


def test_sigkill_of_an_engine_fails_its_task_quickly_and_others_go_on(cluster, tmp_path):
    ctl, _ = cluster
    # A node of its own, so that the other tests keep their two engines.
    agent = Agent(ctl, tmp_path / "run2", engines=2)
    c = shoal.Client(timeout=10)
    try:
        mine = [e["id"] for e in agent.engines]
        victim, survivor = mine
        pid = c[victim].apply_sync(os.getpid)
        ar = c[victim].apply_async(time.sleep, 60)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(shoal.EngineError) as e:
            ar.get(timeout=5)
        assert time.monotonic() - t0 < 1.0, "the failure arrives within a second"
        assert f"engine {victim}" in str(e.value) and "died" in str(e.value)
        assert c[survivor].apply_sync(lambda: 1 + 1) == 2, "the other engines keep working"
        c.refresh()
        assert victim not in c.ids
        with pytest.raises(shoal.CompositeError) as refused:  # past the client's own check
            c._submit([victim], {"kind": "execute", "code": "1"}, None).get(5)
        assert isinstance(refused.value.elist[0], shoal.EngineError)
        assert "is not running" in str(refused.value.elist[0])
    finally:
        c.close()
        agent.stop()


def test_cluster_status_and_registry(rc):
    status = rc.cluster_status()
    assert status["tasks_pending"] == 0
    assert len(status["queue"]) >= 2
    slow = [rc[0].apply_async(time.sleep, 0.3) for _ in range(3)]
    status = rc.cluster_status()
    assert status["queue"][0] == 3 and status["queue"][1] == 0 and status["tasks_pending"] == 3
    for ar in slow:
        ar.get(10)
    status = rc.cluster_status()
    assert status["tasks_pending"] == 0 and status["queue"][0] == 0


def test_engines_are_restarted_only_when_asked(cluster, tmp_path):
    ctl, _ = cluster
    agent = Agent(ctl, tmp_path / "run3", engines=1, extra=["--restart-engines"])
    c = shoal.Client(timeout=10)
    try:
        old = agent.engines[0]["id"]
        pid = c[old].apply_sync(os.getpid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        new = None
        while time.monotonic() < deadline and new is None:
            c.refresh()
            fresh = [e for e in c._engines if e["alive"] and e["node"] == agent.node["id"] and e["id"] != old]
            new = fresh[0]["id"] if fresh else None
            time.sleep(0.05)
        assert new is not None, "a new engine took the dead one's place"
        assert old not in c.ids
        assert c[new].apply_sync(os.getpid) not in (pid, None)
    finally:
        c.close()
        agent.stop()


def test_output_is_streamed_while_the_task_runs(rc):
    ar = rc[0].execute("import time, sys\n"
                       "print('first', flush=True)\n"
                       "time.sleep(0.1)\n"
                       "print('second', file=sys.stderr, flush=True)\n"
                       "time.sleep(2)\n"
                       "print('last')")
    deadline = time.monotonic() + 5
    while "first" not in ar.stdout and time.monotonic() < deadline:
        ar.ready()
        time.sleep(0.02)
    assert ar.stdout .startswith("first\n"), "stdout arrives while the task runs"
    assert not ar.ready()
    while "second" not in ar.stderr and time.monotonic() < deadline:
        ar.ready()
        time.sleep(0.02)
    assert "second" in ar.stderr
    ar.get(10)
    assert ar.stdout == "first\nlast\n" and ar.stderr == "second\n"


# ---- found in review ------------------------------------------------------------

def used_blocks_settle_to(rc, limit, within=2.0):
    """The arena's used blocks, read until they are at most limit or within
    seconds have passed: an engine frees a reply block when the client's
    RELEASE reaches it, which may be just after the client has its next
    result (the RELEASE rides behind that task)."""
    deadline = time.monotonic() + within
    while (used := rc.arena.stats()["used_blocks"]) > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return used


def test_thousands_of_tasks_queue_on_one_engine(rc):
    rc[0].apply_sync(abs, 0)  # the lane to engine 0 (its blocks) is open before the count
    base = rc.arena.stats()["used_blocks"] if rc.arena else None
    ars = [rc[0].apply_async(abs, -i) for i in range(3000)]
    assert [ar.get(60) for ar in ars] == list(range(3000)), "none fails for a full task ring"
    if base is not None:
        rc[0].apply_sync(abs, 1)  # lets the engine take its last RELEASEs
        assert used_blocks_settle_to(rc, base + 2) <= base + 2, "no reply block leaks"


def test_a_flood_of_flushed_output_neither_breaks_the_engine_nor_leaks(rc):
    base = rc.arena.stats()["used_blocks"] if rc.arena else None
    ar = rc[1].execute("for i in range(3000):\n    print(i, flush=True)")
    ar.get(60)
    assert ar.stdout.splitlines() == [str(i) for i in range(3000)]
    assert rc[1].apply_sync(abs, -5) == 5
    if base is not None:
        rc[1].apply_sync(abs, 1)
        assert used_blocks_settle_to(rc, base + 2) <= base + 2, "output blocks are freed"


def test_duplicate_and_empty_targets(rc, cluster):
    assert rc[[0, 0, 1, 0]].apply_sync(os.getpid) == rc[[0, 1]].apply_sync(os.getpid)
    with pytest.raises(ValueError, match="no engines"):
        rc[5:].execute("touched = 1")
    with pytest.raises(ValueError, match="twice"):
        rc._submit([0, 0], {"kind": "execute", "code": "1"}, None)  # bypassing the view's checks
    # The controller refuses them too, from a client that skips the checks.
    import json as _json
    import struct
    sock = cluster[0].socket()
    mid = sock.send(_core.MSG_TASK, [struct.pack("<2I", 0, 0), _json.dumps({"kind": "execute", "code": "1",
                                                                            "buffers": []}).encode(), b""])
    hdr, payload, _, _ = sock.recv(timeout=5)
    assert hdr["type"] == _core.MSG_ERROR and hdr["reply_to"] == mid
    assert "twice" in _json.loads(bytes(payload[0]))["error"]


def test_a_thread_waiting_does_not_block_another(rc):
    import threading
    slow = rc[0].apply_async(time.sleep, 2)
    waiter = threading.Thread(target=slow.get, args=(30,))
    waiter.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert rc[1].apply_sync(abs, -3) == 3
    assert time.monotonic() - t0 < 1.0, "the other thread's wait did not hold us up"
    waiter.join()


def test_a_client_that_stops_reading_does_not_freeze_the_controller(rc, cluster):
    ctl, _ = cluster
    import struct
    import json as _json
    from shoal import serialize
    greedy = ctl.socket()  # sends and never reads
    s = serialize.dumps((abs, (-1,), {}))
    body = [struct.pack("<I", 0), _json.dumps({"kind": "apply", "buffers": []}).encode(), s.payload]
    for _ in range(3000):
        greedy.send(_core.MSG_TASK, body)
    t0 = time.monotonic()
    assert rc[1].apply_sync(abs, -7) == 7
    assert time.monotonic() - t0 < 30
    assert ctl.proc.poll() is None


def test_results_finished_just_before_death_arrive(cluster, tmp_path):
    ctl, _ = cluster
    agent = Agent(ctl, tmp_path / "run4", engines=1)
    c = shoal.Client(timeout=10)
    try:
        e = agent.engines[0]["id"]
        # Both queued at once: the engine replies to the first, then dies.
        ok = c[e].apply_async(abs, -11)
        boom = c[e].apply_async(os._exit, 3)
        assert ok.get(10) == 11, "the reply the engine finished before dying still arrives"
        with pytest.raises(shoal.EngineError):
            boom.get(10)
    finally:
        c.close()
        agent.stop()


def test_engines_die_with_their_agent(cluster, tmp_path):
    ctl, _ = cluster
    agent = Agent(ctl, tmp_path / "run5", engines=2)
    pids = [e["pid"] for e in agent.engines]
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
              for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:
        assert not os.path.exists(f"/proc/{p}") or \
            open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", f"engine {p} outlived its agent"
