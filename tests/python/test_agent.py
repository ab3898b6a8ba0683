"""shoal-agent against a real controller: registration, the arena over its
Unix socket, reclaiming after a killed process, and its exits. Every test
runs on both event-loop backends (io_uring, and epoll via SHOAL_NO_URING=1).
"""

import gc
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from shoal import _core
from shoal.local import LocalArena

from procs import Agent, Controller


@pytest.fixture(params=["io_uring", "epoll"])
def cluster(request, tmp_path):
    # Heartbeats every 200 ms; a node silent for 600 ms is lost.
    ctl = Controller(tmp_path / "home", extra=("--node-timeout-ms", "600"))
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    agent = Agent(ctl, tmp_path / "run", env=env)
    yield ctl, agent, request.param
    agent.stop()
    ctl.stop()


def test_the_node_registers_with_its_socket_and_backend(cluster):
    ctl, agent, backend = cluster
    node = agent.node
    assert node["host"] == socket.gethostname() and node["alive"]
    if backend == "epoll":
        assert node["loop"] == "epoll"
    else:
        assert node["loop"] in ("io_uring", "epoll")  # epoll where io_uring is blocked
    path = node["socket"]
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_a_local_process_gets_the_arena(cluster):
    ctl, agent, _ = cluster
    with LocalArena(agent.node["socket"]) as local:
        assert local.info["node"] == agent.node["id"]
        assert local.info["heap_size"] == 256 << 20
        x = local.arena.empty(1000)
        x[:] = 1
        assert local.arena.stats()["holders"] == 2  # the agent and us
        del x
        gc.collect()


@pytest.mark.parametrize("retain", [None, 0])
def test_freed_memory_is_kept_up_to_half_the_arena(tmp_path, retain):
    """By default the agent's arena keeps freed memory for reuse up to half
    its size, so a large array pushed round after round finds the last
    round's pages; --retain 0 gives every large free back at once."""
    ctl = Controller(tmp_path / "home")
    extra = ["--prefault", "0"] + ([] if retain is None else ["--retain", str(retain)])
    agent = Agent(ctl, tmp_path / "run", arena_size=256 << 20, extra=extra)
    try:
        with LocalArena(agent.node["socket"]) as local:
            x = local.arena.empty(100 << 20, dtype="u1")  # over a quarter of the arena, under half
            x[:] = 1
            committed = local.arena.stats()["committed_bytes"]
            assert committed >= 100 << 20
            del x
            gc.collect()
            st = local.arena.stats()
            if retain is None:
                assert st["released_bytes"] == 0 and st["committed_bytes"] == committed, "kept for reuse"
                y = local.arena.empty(100 << 20, dtype="u1")
                assert local.arena.stats()["committed_bytes"] == committed, "the same pages, used again"
                del y
                gc.collect()
            else:
                assert st["released_bytes"] >= 96 << 20, "given back"
    finally:
        agent.stop()
        ctl.stop()


def test_another_uid_is_refused_the_arena(cluster):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    ctl, agent, _ = cluster
    path = agent.node["socket"]
    # The child becomes uid 65534 but keeps root's file-system uid, so that
    # the socket's 0600 mode lets it connect and only the agent's
    # SO_PEERCRED check (which sees the effective uid) stands in the way.
    code = textwrap.dedent(f"""
        import ctypes, os, sys
        from shoal.local import LocalArena  # before dropping privileges: nobody cannot read root's Python
        os.setresgid(65534, 65534, 0)
        os.setresuid(65534, 65534, 0)
        ctypes.CDLL(None).setfsuid(0)
        try:
            LocalArena({path!r})
        except ConnectionError as e:
            print("refused:", e)
            sys.exit(0)
        sys.exit(1)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    # The agent says why, and the client names the agent.
    assert f"the shoal agent (pid {agent.proc.pid}, socket {path}) refused" in p.stdout, p.stdout
    assert f"serves the processes of uid {os.geteuid()} only, and this one is uid 65534" in p.stdout, p.stdout
    assert "uid 0 only, and this one is uid 65534" in agent.log.read_text()


def test_what_a_killed_process_held_is_released(cluster):
    ctl, agent, _ = cluster
    with LocalArena(agent.node["socket"]) as local:
        base = local.arena.stats()["used_blocks"]
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from shoal.local import LocalArena
            la = LocalArena({agent.node['socket']!r})
            keep = [la.arena.empty(100_000) for _ in range(3)]
            print("ready", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        assert local.arena.stats()["used_blocks"] == base + 3
        child.kill()
        child.wait()
        deadline = time.monotonic() + 5
        while local.arena.stats()["used_blocks"] != base and time.monotonic() < deadline:
            time.sleep(0.02)
        assert local.arena.stats()["used_blocks"] == base, "the agent released the dead process's blocks"
        assert local.arena.stats()["holders"] == 2
        local.arena.check()
        child.stdin.close()
        child.stdout.close()
    assert "released 3 arena references" in agent.log.read_text()


def test_sigterm_stops_the_agent_cleanly(cluster):
    ctl, agent, _ = cluster
    path = agent.node["socket"]
    assert agent.stop() == 0
    assert not os.path.exists(path), "the socket is removed"


def test_the_agent_exits_when_the_controller_dies(cluster):
    ctl, agent, _ = cluster
    path = agent.node["socket"]
    ctl.proc.send_signal(signal.SIGKILL)
    ctl.proc.wait()
    # The node timeout (600 ms), two heartbeats asked after, plus a 2 s grace.
    assert agent.proc.wait(timeout=15) == 3
    assert "it is gone" in agent.log.read_text()
    assert not os.path.exists(path)


def test_shutdown_from_a_client_reaches_the_agent(cluster):
    ctl, agent, _ = cluster
    ctl.ask(ctl.socket(), _core.MSG_SHUTDOWN)
    assert agent.proc.wait(timeout=10) == 0
    assert "shutdown asked by the controller" in agent.log.read_text()


def test_a_frozen_agent_is_lost_by_the_controller(cluster):
    ctl, agent, _ = cluster
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        c = ctl.socket()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            _, reg = ctl.ask(c, _core.MSG_REGISTER)
            if not reg["nodes"][0]["alive"]:
                break
            time.sleep(0.05)
        assert not reg["nodes"][0]["alive"], "600 ms of silence (--node-timeout-ms) lose the node"
        assert "no word from it for" in ctl.log.read_text()
    finally:
        agent.proc.send_signal(signal.SIGCONT)


def test_garbage_on_the_unix_socket_does_not_hurt_the_agent(cluster):
    ctl, agent, _ = cluster
    path = agent.node["socket"]
    junk = [b"not json at all\n", b'{"role": "engine", "index": 0, "pid": 1}\n', b'{"role": "engine"}\n',
            b"\x00\xff" * 3000 + b"\n", b"x" * 10000, b'{"role": 7}\n']
    for data in junk:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        greeting, fds, _, _ = socket.recv_fds(s, 4096, 1)
        for fd in fds:
            os.close(fd)
        s.sendall(data)
        if b'"role": "engine", "index": 0' in data:
            reply = s.recv(4096)
            assert b"not an engine of this agent" in reply, reply
        s.close()
    assert agent.proc.poll() is None
    with LocalArena(path) as local:
        local.arena.check()
    _, reg = ctl.ask(ctl.socket(), _core.MSG_REGISTER)
    assert reg["nodes"][0]["alive"]
    assert "claimed to be engine 0; refused" in agent.log.read_text()


def test_closing_a_local_arena_with_arrays_alive_keeps_them_valid(cluster):
    ctl, agent, _ = cluster
    local = LocalArena(agent.node["socket"])
    x = local.arena.empty(1000)
    x[:] = 5
    local.close()  # does not raise: the array keeps the arena mapped
    assert x.sum() == 5000
    del x
    gc.collect()


def test_a_short_drop_is_survived(cluster):
    ctl, agent, _ = cluster
    agent.proc.send_signal(signal.SIGSTOP)  # silent for half a heartbeat period; 600 ms lose it
    time.sleep(0.1)
    agent.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    _, reg = ctl.ask(ctl.socket(), _core.MSG_REGISTER)
    assert reg["nodes"][0]["alive"], "a drop shorter than the node timeout loses nothing"
    assert agent.proc.poll() is None
    with LocalArena(agent.node["socket"]) as local:
        local.arena.check()


@pytest.mark.parametrize("args", [["--retain", "abc"], ["--prefault", "12x"], ["--arena-size", "-1"],
                                  ["--arena-size", ""], ["--engines", "99999"], ["--engines", "two"],
                                  ["--retain", "99999999999999999999999"]])
def test_the_agent_refuses_numbers_it_cannot_read(args, tmp_path):
    """A number that does not parse is an error, not 0 (which means "none"
    for --retain and --prefault, and "the default" for --arena-size)."""
    from shoal import _bin
    p = subprocess.run([_bin.find("shoal-agent"), "--profile", "nosuch", *args], capture_output=True, text=True,
                       timeout=10, env=dict(os.environ, SHOAL_DIR=str(tmp_path)))
    assert p.returncode == 2, p
    assert f"--{args[0][2:]} wants" in p.stderr and repr(args[1]) in p.stderr.replace('"', "'"), p.stderr


@pytest.mark.parametrize("args", [["--heartbeat-ms", "abc"], ["--heartbeat-ms", "10s"], ["--heartbeat-ms", "5"]])
def test_the_controller_refuses_a_heartbeat_it_cannot_read(args, tmp_path):
    from shoal import _bin
    p = subprocess.run([_bin.find("shoal-controller"), "--profile", "nosuch", *args], capture_output=True,
                       text=True, timeout=10, env=dict(os.environ, SHOAL_DIR=str(tmp_path)))
    assert p.returncode == 2, p
    if not args[1].isdigit():  # not a number at all: said so, not taken for 0 (or 10 for "10s")
        assert "--heartbeat-ms wants a number" in p.stderr and repr(args[1]) in p.stderr, p.stderr
