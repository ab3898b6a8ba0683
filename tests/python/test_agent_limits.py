"""shoal-agent under many local clients (issue 15, item 6): a connection's
slot and its process's pidfd go when they are no longer needed, so clients
opened and closed by the thousand leave the agent serving; and when the
agent must refuse a process (out of fds, tables full), the process is told
the real reason and the client says it, naming the agent."""

import gc
import resource
import time

import pytest

import shoal
from shoal.local import AgentUnavailable, LocalArena

from procs import Agent, Controller


@pytest.fixture(params=["io_uring", "epoll"])
def cluster(request, tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    agent = Agent(ctl, tmp_path / "run", engines=1, env=env)
    yield ctl, agent
    agent.stop()
    ctl.stop()


def limit_fds(agent, n):
    """Lowers the agent's RLIMIT_NOFILE to n (soft and hard)."""
    resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (n, n))


def agent_fds(agent):
    import os
    return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))


def test_thousands_of_clients_opened_and_closed_leave_the_agent_serving(cluster):
    """5000 open/close cycles of a Client in one process, under a limit of
    256 fds for the agent: each cycle used to keep a peer slot and a pidfd
    until the process ended, so the agent refused every new client after
    ~240 cycles here (4095 without the limit), saying nothing."""
    ctl, agent = cluster
    limit_fds(agent, 256)
    before = agent_fds(agent)
    t0 = time.monotonic()
    for i in range(5000):
        rc = shoal.Client(url_file=str(ctl.conn), timeout=10)
        assert rc.arena is not None, f"cycle {i}: no arena"
        if i % 500 == 0:  # a lane now and then: its doorbell and rings go with the connection
            assert rc._routes.lane.lane(rc.ids[0]) is not None, f"cycle {i}: no lane"
        rc.close()
    took = time.monotonic() - t0
    assert agent_fds(agent) <= before + 2, "what a closed client used is given back"
    with shoal.Client(url_file=str(ctl.conn), timeout=10) as rc:
        assert rc.arena is not None
        assert rc._routes.lane.lane(rc.ids[0]) is not None
        assert rc[rc.ids[0]].apply_sync(lambda x: x + 1, 41) == 42
    assert agent.proc.poll() is None
    print(f"5000 cycles in {took:.1f} s")


def test_a_process_that_keeps_arrays_is_still_released_when_it_dies(cluster, tmp_path):
    """The connection's slot goes when it closes; the process's references
    are still released when it dies (its pidfd is kept while it holds any)."""
    import subprocess
    import sys
    import textwrap
    ctl, agent = cluster
    with LocalArena(agent.node["socket"]) as local:
        base = local.arena.stats()["used_blocks"]
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from shoal.local import LocalArena
            la = LocalArena({agent.node['socket']!r})
            keep = la.arena.empty(100_000)
            la.close()  # the connection closes; the array keeps the arena attached
            print("ready", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert local.arena.stats()["used_blocks"] == base + 1
        finally:
            child.kill()
            child.wait()
            child.stdin.close()
            child.stdout.close()
        deadline = time.monotonic() + 5
        while local.arena.stats()["used_blocks"] != base and time.monotonic() < deadline:
            time.sleep(0.02)
        assert local.arena.stats()["used_blocks"] == base, "its block was released at its death"
    assert "released 1 arena references" in agent.log.read_text()


def test_a_refusal_for_want_of_fds_says_so_and_names_the_agent(cluster):
    ctl, agent = cluster
    limit_fds(agent, agent_fds(agent) + 8)
    held = []
    try:
        with pytest.raises(AgentUnavailable) as err:
            for _ in range(50):
                held.append(LocalArena(agent.node["socket"], timeout=5))
        msg = str(err.value)
        assert f"pid {agent.proc.pid}" in msg and agent.node["socket"] in msg, msg
        assert "open files" in msg and "ulimit -n" in msg, msg
        assert "uid" not in msg, msg
        assert "refused process" in agent.log.read_text()
        # A Client goes on without the arena, saying why, and still works.
        with pytest.warns(RuntimeWarning, match=r"open files.*goes without the node's arena") as w:
            rc = shoal.Client(url_file=str(ctl.conn), timeout=10)
        with rc:
            assert f"pid {agent.proc.pid}" in str(w[0].message)
            assert rc.arena is None
            assert rc[rc.ids[0]].apply_sync(lambda x: x + 1, 1) == 2
    finally:
        for local in held:
            local.close()
    gc.collect()
    with shoal.Client(url_file=str(ctl.conn), timeout=10) as rc:
        assert rc.arena is not None, "the agent serves again once fds are free"
