"""Faults a cluster meets in real use: a process killed or paused at a
chosen point, on both event-loop backends. Every task ends (a result, or an
EngineError that names its engine and why) within the bound docs/ gives,
and nothing is left behind (docs/controller.md, "Failures and bounds")."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

import shoal
from shoal import _core, serialize

from procs import Agent, Controller

LOOPS = ["io_uring", "epoll"]


def env_for(loop):
    return {"SHOAL_NO_URING": "1"} if loop == "epoll" else {}


def registry(ctl):
    s = ctl.socket()
    try:
        return ctl.ask(s, _core.MSG_REGISTER)[1]
    finally:
        s.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.02)


def task_body(f, *args, engine):
    """The frames of a TASK to engine that calls f(*args), as a client sends it."""
    return [struct.pack("<I", engine), json.dumps({"kind": "apply", "buffers": []}).encode(),
            serialize.dumps((f, args, {})).payload]


def left_in(runtime):
    """What an agent left in its runtime directory."""
    d = runtime / "shoal"
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.mark.parametrize("loop", LOOPS)
def test_agent_death_fails_every_lane_and_pool_task_at_once(tmp_path, loop):
    """SIGKILL of the agent: its engines die with it; every task in flight
    on a lane, in a pool and through the controller fails with an
    EngineError naming its engine, and new tasks to them fail at once.
    (Before, lane and pool tasks waited for ever.)"""
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    ids = [e["id"] for e in agent.engines]
    engine_pids = [e["pid"] for e in agent.engines]
    try:
        with shoal.Client(url_file=str(ctl.conn)) as rc, \
                shoal.Client(url_file=str(ctl.conn), lanes=False) as through:
            assert rc._routes.lane.lane(ids[0]) is not None, "this test needs lanes"
            first = rc[ids[0]]  # a view made before, used after
            lane = [rc[e].apply_async(time.sleep, 30) for e in ids]
            pool = [rc.load_balanced_view().apply_async(time.sleep, 30) for _ in range(6)]
            ctl_path = [through[e].apply_async(time.sleep, 30) for e in ids]
            time.sleep(0.5)  # the engines have started them
            agent.proc.kill()
            agent.proc.wait()
            t0 = time.monotonic()
            for ar in lane + pool + ctl_path:
                with pytest.raises(shoal.EngineError) as err:
                    ar.get(10)
                msg = str(err.value)
                assert "engine" in msg and ("agent" in msg or "lost" in msg or "reached" in msg), msg
            # Lane and pool tasks are failed by the client itself; the
            # controller path within a heartbeat or two.
            assert time.monotonic() - t0 < 5
            assert "pid %d" % agent.proc.pid in str(lane[0].exception(0)) or "agent" in str(lane[0].exception(0))
            t1 = time.monotonic()
            late = first.apply_async(abs, -1)
            with pytest.raises(shoal.EngineError, match=f"engine {ids[0]}"):
                late.get(10)
            assert time.monotonic() - t1 < 1, "a new task to a lost engine fails at once"
        wait_for(lambda: not any(map(alive, engine_pids)), 5, "an engine outlived its agent")
        wait_for(lambda: not registry(ctl)["nodes"][0]["alive"], 5, "the controller did not lose the node")
    finally:
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_controller_death_fails_its_tasks_and_the_next_client_is_told(tmp_path, loop):
    """SIGKILL of the controller: tasks through it fail with an EngineError
    that says the controller died (before, they waited for ever); lane
    tasks go on; the stale connection file makes the next Client() and
    `shoal status` say that the controller's process is gone, at once."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=200, extra=("--node-timeout-ms", "1000"))
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    ids = [e["id"] for e in agent.engines]
    try:
        with shoal.Client(url_file=str(ctl.conn)) as rc, \
                shoal.Client(url_file=str(ctl.conn), lanes=False) as through:
            slow = [through[ids[1]].apply_async(time.sleep, 30) for _ in range(3)]
            on_lane = rc[ids[0]].apply_async(lambda: (time.sleep(0.5), 7)[1])
            time.sleep(0.3)
            ctl.proc.kill()
            ctl.proc.wait()
            t0 = time.monotonic()
            for ar in slow:
                with pytest.raises(shoal.EngineError, match=f"controller \\(pid {ctl.proc.pid}\\) died"):
                    ar.get(10)
            assert time.monotonic() - t0 < 2
            assert on_lane.get(10) == 7, "a lane does not need the controller"
            with pytest.raises(shoal.EngineError, match="died"):
                through[ids[0]].apply_sync(abs, -1)
            with pytest.raises(ConnectionError, match="died"):
                through.cluster_status()
        t0 = time.monotonic()
        with pytest.raises(OSError, match=f"pid {ctl.proc.pid}\\) is not running: its connection file .* is stale"):
            shoal.Client(url_file=str(ctl.conn))
        assert time.monotonic() - t0 < 1
        env = dict(os.environ, SHOAL_DIR=str(ctl.root))
        p = subprocess.run([sys.executable, "-m", "shoal", "status"], env=env, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 1 and "is not running" in p.stderr and "stale" in p.stderr, p.stderr
        # The agent gives the controller up after its node timeout, and
        # takes its engines and its socket with it.
        assert agent.proc.wait(timeout=15) == 3
        assert left_in(tmp_path / "run") == []
    finally:
        agent.stop()
        if ctl.proc.poll() is None:
            ctl.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pause_of_3_5_s_loses_nothing_by_default(tmp_path, loop):
    """SIGSTOP of the agent for 3.5 s under the default heartbeat policy
    (a node silent for 30 s is lost): the node stays, and the tasks sent
    before and during the pause all answer after it. (Before, the node was
    lost after 3 s, its results refused, and the agent exited.)"""
    ctl = Controller(tmp_path / "home", heartbeat_ms=1000)  # the defaults: 1 s heartbeats, 30 s timeout
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    ids = [e["id"] for e in agent.engines]
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as through, \
                shoal.Client(url_file=str(ctl.conn)) as rc:
            before = [through[e].apply_async(lambda x: (time.sleep(0.2), x)[1], e) for e in ids]
            agent.proc.send_signal(signal.SIGSTOP)
            try:
                during = [through[e].apply_async(abs, -e) for e in ids]
                lane = rc[ids[0]].apply_async(abs, -5)
                time.sleep(3.5)
            finally:
                agent.proc.send_signal(signal.SIGCONT)
            assert [ar.get(20) for ar in before] == ids
            assert [ar.get(20) for ar in during] == ids
            assert lane.get(20) == 5
            assert all(n["alive"] for n in registry(ctl)["nodes"])
            assert through[ids].apply_sync(os.getpid) == [e["pid"] for e in agent.engines]
        assert agent.proc.poll() is None
        assert "lost" not in ctl.log.read_text()
    finally:
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_node_declared_lost_comes_back_with_its_engines_and_namespaces(tmp_path, loop):
    """With a short node timeout (1 s), a pause of 2.5 s loses the node:
    tasks in flight through the controller fail with an EngineError that
    says so. On SIGCONT the agent registers again, and its engines come
    back with their ids and namespaces. (Before, the agent exited and took
    its engines with it.)"""
    ctl = Controller(tmp_path / "home", heartbeat_ms=200, extra=("--node-timeout-ms", "1000"))
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    ids = [e["id"] for e in agent.engines]
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            rc[ids].push({"kept": 42}, block=True)
            agent.proc.send_signal(signal.SIGSTOP)
            try:
                inflight = rc[ids[0]].apply_async(abs, -3)
                wait_for(lambda: not registry(ctl)["nodes"][0]["alive"], 10, "the node was not declared lost")
                with pytest.raises(shoal.EngineError, match=f"engine {ids[0]} was lost with its node"):
                    inflight.get(5)
            finally:
                agent.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: registry(ctl)["nodes"][0]["alive"] and
                     all(e["alive"] for e in registry(ctl)["engines"]), 10, "the node did not come back")
            assert [e["id"] for e in registry(ctl)["engines"]] == ids, "the same ids"
            rc.refresh()
            assert rc[ids].pull("kept", block=True) == [42, 42], "the namespaces are kept"
            assert rc[ids].apply_sync(abs, -4) == [4, 4]
        assert agent.proc.poll() is None
        again = re.search(r"registered again, with engines \[([\d, ]*)\]", ctl.log.read_text())
        assert again and sorted(int(x) for x in again.group(1).split(",")) == sorted(ids)
    finally:
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_results_wait_at_the_agent_while_the_controller_is_paused(tmp_path, loop):
    """SIGSTOP of the controller for 5 s while 4000 results of 32 KiB come
    back: more than the ZeroMQ queues and the socket buffers hold. The agent
    queues what the controller cannot take (before, each send gave up after
    2 s and the result was lost, its task pending for ever), and every
    result arrives after SIGCONT."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=1000)
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    ids = [e["id"] for e in agent.engines]
    raw = ctl.socket()
    try:
        mids = [raw.send(_core.MSG_TASK, task_body(time.sleep, 1.5, engine=e)) for e in ids]
        mids += [raw.send(_core.MSG_TASK, task_body(bytes, 32 << 10, engine=ids[i % 2])) for i in range(4000)]
        time.sleep(1.0)  # all handed to the agent; the engines still sleep
        ctl.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5)  # the engines answer all 4000 meanwhile
        finally:
            ctl.proc.send_signal(signal.SIGCONT)
        got = {}
        deadline = time.monotonic() + 60
        while len(got) < len(mids) and time.monotonic() < deadline:
            hdr, payload, _, _ = raw.recv(timeout=max(deadline - time.monotonic(), 0.01))
            meta = json.loads(bytes(payload[0]))
            assert hdr["type"] == _core.MSG_RESULT and meta["status"] == "ok", meta
            got[hdr["reply_to"]] = meta
        assert set(got) == set(mids), f"{len(mids) - len(got)} results lost"
        assert agent.proc.poll() is None and "lost" not in agent.log.read_text()
    finally:
        agent.stop()
        ctl.stop()


def test_results_past_what_the_agent_keeps_for_a_paused_controller_fail_and_say_so(tmp_path):
    """Past what the agent keeps for a paused controller (1 GiB; 16 MiB
    here, with ZeroMQ's own queue of 1000 messages before it), a result is
    replaced by an EngineError that says so: its client is told, not left
    waiting (before, it was dropped with a log line)."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=1000)
    agent = Agent(ctl, tmp_path / "run", engines=2, env={"SHOAL_AGENT_CTL_BACKLOG": str(16 << 20)})
    ids = [e["id"] for e in agent.engines]
    raw = ctl.socket()
    try:
        mids = [raw.send(_core.MSG_TASK, task_body(time.sleep, 1.0, engine=e)) for e in ids]
        mids += [raw.send(_core.MSG_TASK, task_body(bytes, 64 << 10, engine=ids[i % 2])) for i in range(1500)]
        time.sleep(0.5)  # all handed to the agent; the engines still sleep
        ctl.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "its task fails" in agent.log.read_text(), 20, "no result went past the agent's backlog")
            time.sleep(1)
        finally:
            ctl.proc.send_signal(signal.SIGCONT)
        ok, dropped = 0, []
        deadline = time.monotonic() + 60
        while ok + len(dropped) < len(mids) and time.monotonic() < deadline:
            hdr, payload, _, _ = raw.recv(timeout=max(deadline - time.monotonic(), 0.01))
            meta = json.loads(bytes(payload[0]))
            assert hdr["type"] == _core.MSG_RESULT, meta
            if meta["status"] == "ok":
                ok += 1
            else:
                dropped.append(meta)
        assert ok + len(dropped) == len(mids), f"{len(mids) - ok - len(dropped)} results never came"
        assert dropped and ok >= 2 + 1000 + 200, (ok, len(dropped))
        assert all(m["ename"] == "EngineError" and "was dropped by its node's agent" in m["evalue"]
                   and "MiB were already waiting for the controller" in m["evalue"] for m in dropped), dropped[0]
    finally:
        agent.stop()
        ctl.stop()


def arena_used(ctl, agent):
    from shoal.local import LocalArena
    with LocalArena(agent.node["socket"]) as local:
        return local.arena.stats()["used_bytes"]


def settled_arena(ctl, agent):
    """The arena's used bytes once three readings 0.1 s apart agree."""
    readings = [arena_used(ctl, agent)]
    deadline = time.monotonic() + 10
    while len(readings) < 3 or len(set(readings[-3:])) > 1:
        assert time.monotonic() < deadline, f"the arena did not settle: {readings[-10:]}"
        time.sleep(0.1)
        readings.append(arena_used(ctl, agent))
    return readings[-1]


@pytest.mark.parametrize("loop", LOOPS)
def test_engine_death_mid_task_on_both_paths_and_the_arena_back_to_baseline(tmp_path, loop):
    """SIGKILL of an engine while it runs a task sent by lane and one sent
    through the controller, each with a 64 MiB array: both fail within a
    second with an EngineError naming it, the other engine goes on, and
    the arena holds what it held before."""
    import numpy as np
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    agent = Agent(ctl, tmp_path / "run", engines=2, env=env_for(loop))
    victim, survivor = [e["id"] for e in agent.engines]
    try:
        with shoal.Client(url_file=str(ctl.conn)) as rc, \
                shoal.Client(url_file=str(ctl.conn), lanes=False) as through:
            rc[[victim, survivor]].apply_sync(abs, -1)
            base = arena_used(ctl, agent)
            pid = rc[victim].apply_sync(os.getpid)
            a = np.ones(8 << 20)
            by_lane = rc[victim].apply_async(lambda x: (time.sleep(30), x.sum())[1], a)
            by_ctl = through[victim].apply_async(lambda x: (time.sleep(30), x.sum())[1], a)
            time.sleep(0.5)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            for ar in (by_lane, by_ctl):
                with pytest.raises(shoal.EngineError, match=f"engine {victim}.*died"):
                    ar.get(5)
            assert time.monotonic() - t0 < 1.5
            assert rc[survivor].apply_sync(lambda x: x.sum(), a) == a.sum()
            del a, by_lane, by_ctl
            # At or under it: the dead engine's rings are freed too.
            wait_for(lambda: arena_used(ctl, agent) <= base, 5,
                     f"the arena is not back to its baseline ({base} bytes used before)")
    finally:
        agent.stop()
        ctl.stop()


CLIENT = """
import sys, time, numpy as np, shoal
rc = shoal.Client(url_file=sys.argv[1], lanes=sys.argv[2] == "lanes")
a = np.ones(1 << 17)  # 1 MiB, one arena block a task
ars = [rc[rc.ids[i % 2]].apply_async(lambda x: (time.sleep(0.3), x.sum())[1], a) for i in range(20)]
print("sent", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("path", ["lanes", "controller"])
def test_client_death_with_tasks_in_flight_leaves_nothing(tmp_path, path):
    """SIGKILL of a client with 20 tasks and their 1 MiB arrays in flight: the
    engines finish them, their results go nowhere, the agent releases what
    the client held, and the controller keeps nothing of it; the cluster
    serves the next client."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    agent = Agent(ctl, tmp_path / "run", engines=2)
    try:
        # The baseline after a first client by lanes: it leaves 3 small
        # blocks (256 KiB) that later clients do not add to. An engine frees
        # a task's block after the client has its answer, so the baseline
        # is read once the arena has stopped changing.
        with shoal.Client(url_file=str(ctl.conn)) as rc:
            rc[:].apply_sync(abs, -1)
        base = settled_arena(ctl, agent)
        p = subprocess.Popen([sys.executable, "-c", CLIENT, str(ctl.conn), path], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "sent"
        p.kill()
        p.wait()
        p.stdout.close()
        s = ctl.socket()

        last = {}

        def settled():
            st = ctl.ask(s, _core.MSG_QUERY)[1]
            last.update(tasks_pending=st["tasks_pending"], clients=st["clients"]["with_tasks_or_queued"],
                        arena_used=arena_used(ctl, agent), base=base)
            return last["tasks_pending"] == 0 and last["clients"] == 0 and last["arena_used"] <= base
        wait_for(settled, 20, lambda: f"the controller or the arena kept what the dead client had: {last}")
        with shoal.Client(url_file=str(ctl.conn), lanes=path == "lanes") as rc:
            assert rc[:].apply_sync(abs, -2) == [2, 2]
    finally:
        agent.stop()
        ctl.stop()


def test_a_sender_without_the_key_cannot_starve_the_heartbeats(tmp_path):
    """From a socket without the key: payloads of 300 MiB (over the
    default --max-payload of 256 MiB: refused before any hashing) and
    garbage. The node is not lost, the agent stays, a client is served, and
    the log holds 10 refusals per 10 s, then one line that counts the rest.
    (Before: a 2 GiB payload took 8 s of hashing in the controller's one
    thread, and the agents gave the controller up.)"""
    ctl = Controller(tmp_path / "home", heartbeat_ms=100,
                     extra=("--node-timeout-ms", "1000", "--max-frame", str(512 << 20)))
    agent = Agent(ctl, tmp_path / "run", engines=1)
    try:
        intruder = ctl.socket(key=b"k" * 32)
        big = bytes(300 << 20)
        for _ in range(5):
            intruder.send(_core.MSG_QUERY, [big])
            for _ in range(60):
                intruder.send_raw([b"garbage"] * 3)
        del big
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            deadline = time.monotonic() + 30
            while rc.cluster_status()["refused"]["from_clients"]["oversized"] < 5:
                assert time.monotonic() < deadline, "the big payloads were not refused"
                time.sleep(0.1)
            assert rc[:].apply_sync(abs, -5) == [5]
            st = rc.cluster_status()
        assert all(n["alive"] for n in st["nodes"]) and agent.proc.poll() is None
        assert st["refused"]["from_clients"]["malformed"] == 300
        assert "lost" not in ctl.log.read_text()

        def counted():  # lines logged, and the ones the summary lines count
            log = ctl.log.read_text()
            more = sum(int(n) for n in re.findall(r"\.\.\. and (\d+) more message\(s\) refused in 10 s", log))
            return log.count("refused a message from a client"), more
        wait_for(lambda: sum(counted()) == 305, 25, f"refusals not all logged or counted: {counted()}")
        assert counted()[0] <= 20, "10 lines a window, and the burst spans two at most"
    finally:
        agent.stop()
        ctl.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_replies_an_engine_left_on_its_lane_before_dying_arrive(tmp_path, loop):
    """An engine answers two tasks by lane, then dies (the third task), all
    before the client looks: the two replies still arrive, their blocks
    kept by the agent for the client (before, the engine's death freed
    them: "could not be read: Stale file handle", found by the soak), and
    the arena goes back to its baseline once they are taken."""
    import numpy as np
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    agent = Agent(ctl, tmp_path / "run", engines=1, env=env_for(loop))
    e = agent.engines[0]["id"]
    try:
        with shoal.Client(url_file=str(ctl.conn)) as rc:
            rc[e].apply_sync(abs, -1)
            base = arena_used(ctl, agent)
            big = rc[e].apply_async(np.arange, 1 << 20)  # an 8 MiB reply, in the arena
            small = rc[e].apply_async(abs, -3)
            boom = rc[e].apply_async(os._exit, 3)
            wait_for(lambda: "died" in agent.log.read_text(), 10, "the engine did not die")
            assert small.get(5) == 3
            got = big.get(5)
            assert got.sum() == (1 << 20) * ((1 << 20) - 1) // 2
            with pytest.raises(shoal.EngineError, match=f"engine {e}"):
                boom.get(5)
            del got, big
        wait_for(lambda: arena_used(ctl, agent) <= base, 5, "the kept replies were not let go")
    finally:
        agent.stop()
        ctl.stop()


def test_a_client_that_did_not_wait_does_not_take_the_controller_for_dead(tmp_path):
    """Results due from the controller, and a client that does not wait for
    them for longer than its bound of silence (a long task, a notebook left
    alone): the controller said nothing because there was nothing to say,
    and the results arrive. Silence counts only once a question went
    unanswered. (Before, get() failed at once with 'did not answer'.)"""
    ctl = Controller(tmp_path / "home", heartbeat_ms=200, extra=("--node-timeout-ms", "1000"))
    agent = Agent(ctl, tmp_path / "run", engines=1)
    eid = agent.engines[0]["id"]
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            view = rc[eid]
            assert rc._routes.controller.timeout == 3  # 1 s node timeout + 2
            long = view.apply_async(lambda: (time.sleep(8), 7)[1])
            time.sleep(rc._routes.controller.timeout + 1)  # not waiting; the task goes on after
            assert long.get(20) == 7
            time.sleep(rc._routes.controller.timeout + 1)
            assert view.apply_sync(abs, -2) == 2
    finally:
        agent.stop()
        ctl.stop()


def test_a_client_never_closed_gives_back_its_watch_on_the_controller(tmp_path):
    """The pidfd that watches a local controller is closed with the client,
    also when the client is dropped without close()."""
    import gc
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    try:
        def fds():
            return len(os.listdir("/proc/self/fd"))
        shoal.Client(url_file=str(ctl.conn), lanes=False).close()
        before = fds()
        for _ in range(20):
            rc = shoal.Client(url_file=str(ctl.conn), lanes=False)
            assert rc._routes.controller.pidfd is not None, "this test needs a local controller"
            del rc
            gc.collect()
        assert fds() <= before
    finally:
        ctl.stop()
