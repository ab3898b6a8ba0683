"""Messages that name what went wrong (issue 15, item 8), against real
processes: a client during an agent stall, a push larger than the arena, a
runtime directory another user made, the socket a killed agent left, and
the default arena size inside a memory cgroup."""

import json
import os
import pwd
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shoal
from shoal import _bin
from shoal.local import LocalArena

from procs import Agent, Controller, make_cgroup, remove_cgroup


def test_a_client_during_an_agent_stall_warns_and_goes_through_the_controller(tmp_path):
    """It used to raise a bare socket TimeoutError."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=5000)  # the node is not lost during the stall
    agent = Agent(ctl, tmp_path / "run", engines=1)
    try:
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.warns(RuntimeWarning) as w:
                rc = shoal.Client(url_file=str(ctl.conn), timeout=10)
            assert time.monotonic() - t0 < 9
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        with rc:
            msg = str(w[0].message)
            assert f"pid {agent.proc.pid}" in msg and agent.node["socket"] in msg, msg
            assert "did not answer" in msg and "through the controller" in msg, msg
            assert rc.arena is None
            assert rc[rc.ids[0]].apply_sync(lambda x: 2 * x, 21) == 42
    finally:
        agent.stop()
        ctl.stop()


@pytest.fixture
def small(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=1, arena_size=64 << 20)
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.mark.parametrize("lanes", [True, False])
def test_a_push_larger_than_the_arena_says_the_sizes(small, lanes):
    ctl, agent = small
    with shoal.Client(url_file=str(ctl.conn), timeout=10, lanes=lanes) as rc:
        with pytest.raises(OSError) as err:
            rc[:].push({"x": np.zeros(100 << 17)}, block=True)
        msg = str(err.value)
        assert "104857600 bytes (100.0 MiB) asked" in msg, msg
        assert "the arena holds only 67108864 bytes (64.0 MiB" in msg, msg
        assert "`shoal start --arena-size BYTES`" in msg, msg
        # Room in the arena, but not in one piece: the sizes say so too.
        keep = rc.arena.empty(40 << 20, dtype="u1")
        with pytest.raises(OSError) as err:
            rc[:].push({"x": np.zeros(40 << 17)}, block=True)
        msg = str(err.value)
        assert "41943040 bytes (40.0 MiB) asked" in msg and "the largest free block" in msg, msg
        del keep
        assert rc[:].apply_sync(lambda: 1) == [1], "the cluster goes on"


def run_shoal(env, *args, timeout=90):
    return subprocess.run([sys.executable, "-m", "shoal", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_runtime_directory_of_another_user_is_named_with_its_owner(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    xdg = tmp_path / "xdg"
    squat = xdg / "shoal"
    squat.mkdir(parents=True, mode=0o700)
    os.chown(squat, 65534, 65534)
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(xdg))
    p = run_shoal(env, "start", "--daemonize", "-n", "1", "--arena-size", str(64 << 20), "--timeout", "30")
    try:
        assert p.returncode == 1, p.stdout + p.stderr
        try:
            name = f" ({pwd.getpwuid(65534).pw_name})"
        except KeyError:
            name = ""
        assert f"the runtime directory {squat} belongs to uid 65534{name}, not to this user" in p.stderr, p.stderr
        assert "have it removed" in p.stderr and "XDG_RUNTIME_DIR" in p.stderr, p.stderr
    finally:
        conn = tmp_path / "home" / "profile_default" / "connection.json"
        if conn.exists():  # start stops its controller on failure; make sure
            pid = json.loads(conn.read_text())["pid"]
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)


def test_the_next_agent_removes_the_socket_a_killed_one_left(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    try:
        first = Agent(ctl, tmp_path / "run")
        path = first.node["socket"]
        first.proc.kill()
        first.proc.wait()
        assert os.path.exists(path), "SIGKILL leaves the socket"
        second = Agent(ctl, tmp_path / "run")
        try:
            mine = second.node["socket"]
            assert os.path.dirname(mine) == os.path.dirname(path)
            assert "which nobody listened on" in second.log.read_text()
            assert os.listdir(os.path.dirname(path)) == [os.path.basename(mine)], "nothing stale is left"
            with LocalArena(mine) as local:
                local.arena.check()
        finally:
            second.stop()
        assert not os.path.exists(mine), "a clean stop removes it"
    finally:
        ctl.stop()


def test_a_second_agent_of_a_profile_runs_beside_the_first(tmp_path):
    """More engines on the same host: a second agent of the profile, with
    its own socket; the first's is never taken."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    first = Agent(ctl, tmp_path / "run", engines=1)
    try:
        second = Agent(ctl, tmp_path / "run", engines=1)
        try:
            assert second.node["socket"] != first.node["socket"]
            assert sorted(os.listdir(tmp_path / "run" / "shoal")) == sorted(
                os.path.basename(a.node["socket"]) for a in (first, second))
            for a in (first, second):
                with LocalArena(a.node["socket"]) as local:
                    local.arena.check()
            with shoal.Client(url_file=str(ctl.conn)) as rc:
                assert len(rc.ids) == 2 and rc[:].apply_sync(abs, -1) == [1, 1]
        finally:
            second.stop()
        assert os.path.exists(first.node["socket"])
    finally:
        first.stop()
        ctl.stop()


def test_shoal_stop_removes_the_socket_of_a_killed_agent(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run))
    p = run_shoal(env, "start", "--daemonize", "-n", "1", "--arena-size", str(64 << 20))
    assert p.returncode == 0, p.stderr
    try:
        [path] = [str(run / "shoal" / f) for f in os.listdir(run / "shoal")]
        os.environ["SHOAL_DIR"] = env["SHOAL_DIR"]
        try:
            with shoal.Client() as rc:
                [node] = rc.cluster_status()["nodes"]
        finally:
            del os.environ["SHOAL_DIR"]
        assert node["socket"] == path
        os.kill(node["pid"], signal.SIGKILL)
        time.sleep(0.2)
        assert os.path.exists(path)
    finally:
        p = run_shoal(env, "stop")
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(path), "shoal stop removed the stale socket"


# ---- the default arena size inside a memory cgroup ------------------------------------------

@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_default_arena_is_half_the_cgroup_limit(tmp_path, version):
    limit = 512 << 20
    cg, why = make_cgroup(version == "v1", limit)
    if cg is None:
        pytest.skip(why)
    try:
        def enter():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        ctl = Controller(tmp_path / "home", heartbeat_ms=500)
        try:
            agent = Agent(ctl, tmp_path / "run", arena_size=0, preexec_fn=enter)  # 0: the default
            try:
                with LocalArena(agent.node["socket"]) as local:
                    assert local.info["heap_size"] == limit // 2, "half of the cgroup's limit, not of RAM"
            finally:
                agent.stop()
        finally:
            ctl.stop()
    finally:
        remove_cgroup(cg)
