"""The `shoal` command: start (daemonized and in the foreground), status, stop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import shoal


@pytest.fixture
def env(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    e = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run))
    return e


def shoal_cmd(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "shoal", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def cluster_pids(env):
    with open(os.path.join(env["SHOAL_DIR"], "profile_default", "connection.json")) as f:
        ctl = json.load(f)["pid"]
    os.environ["SHOAL_DIR"] = env["SHOAL_DIR"]
    try:
        with shoal.Client() as rc:
            st = rc.cluster_status()
    finally:
        del os.environ["SHOAL_DIR"]
    return [ctl] + [n["pid"] for n in st["nodes"]] + [e["pid"] for e in st["engines"]], st


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_start_daemonized_status_use_and_stop(env):
    p = shoal_cmd(env, "start", "-n", "2", "--daemonize", "--arena-size", str(1 << 30))
    assert p.returncode == 0, p.stderr
    assert "engines [0, 1]" in p.stdout
    pids, st = cluster_pids(env)
    assert len(pids) == 4 and all(alive(x) for x in pids)
    s = shoal_cmd(env, "status")
    assert s.returncode == 0 and "2 engine(s)" in s.stdout and "arena:" in s.stdout
    again = shoal_cmd(env, "start", "-n", "1", "--daemonize")
    assert again.returncode == 1 and "already running" in again.stderr
    sock = st["nodes"][0]["socket"]
    assert os.path.exists(sock)
    stop = shoal_cmd(env, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not any(alive(x) for x in pids), "no shoal process remains"
    assert not os.path.exists(sock) and not os.path.exists(
        os.path.join(env["SHOAL_DIR"], "profile_default", "connection.json"))
    assert shoal_cmd(env, "stop").returncode == 1


def test_foreground_start_stops_everything_on_ctrl_c(env):
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "start", "-n", "2", "--arena-size", str(1 << 30)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        line = proc.stdout.readline()
        assert "engines [0, 1]" in line, line + proc.stderr.read()
        pids, _ = cluster_pids(env)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        deadline = time.monotonic() + 5
        while any(alive(x) for x in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(x) for x in pids), "Ctrl-C leaves no shoal process behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for x in pids:  # a failed test leaves nothing running either
            if alive(x):
                os.kill(x, signal.SIGKILL)


def test_usage_errors(env):
    assert shoal_cmd(env, "start", "-n", "0").returncode == 2
    p = shoal_cmd(env, "status")
    assert p.returncode == 1 and "no connection file" in p.stderr


def test_start_passes_the_arena_options_to_the_agent(env):
    """--retain 0: a large free goes back to the system at once (the
    default keeps up to half the arena, tests/python/test_agent.py)."""
    p = shoal_cmd(env, "start", "-n", "1", "--daemonize", "--arena-size", str(256 << 20), "--prefault", "0",
                  "--retain", "0")
    assert p.returncode == 0, p.stderr
    try:
        os.environ["SHOAL_DIR"] = env["SHOAL_DIR"]
        try:
            with shoal.Client() as rc:
                x = rc.arena.empty(100 << 20, dtype="u1")
                x[:] = 1
                del x
                st = rc.arena.stats()
        finally:
            del os.environ["SHOAL_DIR"]
        assert st["heap_size"] == 256 << 20 and st["released_bytes"] >= 96 << 20
    finally:
        assert shoal_cmd(env, "stop").returncode == 0


def test_start_passes_the_controller_policies_on(env):
    p = shoal_cmd(env, "start", "-n", "1", "--daemonize", "--node-timeout-ms", "5000", "--heartbeat-ms", "500",
                  "--client-backlog", str(8 << 20), "--max-frame", str(64 << 20), "--max-payload", str(1 << 20),
                  "--max-skew-ms", "60000", "--no-curve")
    assert p.returncode == 0, p.stderr
    try:
        info = json.loads(open(os.path.join(env["SHOAL_DIR"], "profile_default", "connection.json")).read())
        assert (info["node_timeout_ms"], info["max_frame"], info["max_payload"]) == (5000, 64 << 20, 1 << 20)
        assert info["max_skew_ms"] == 60000 and info["curve"] is None
    finally:
        assert shoal_cmd(env, "stop").returncode == 0
    p = shoal_cmd(env, "start", "-n", "1", "--daemonize", "--node-timeout-ms", "100", "--heartbeat-ms", "500")
    assert p.returncode == 1 and "--node-timeout-ms (100) must be at least two heartbeats" in p.stderr, p.stderr
    p = shoal_cmd(env, "start", "-n", "1", "--curve", "--no-curve")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr, p.stderr


def foreign_connection_file(env, pid, **change):
    """A connection file at the profile's place as a copy from another machine
    has it: its controller's pid is pid (here, a process of ours), its boot
    id another kernel's, its controller's address one that nothing answers."""
    pdir = os.path.join(env["SHOAL_DIR"], "profile_default")
    os.makedirs(pdir, mode=0o700, exist_ok=True)
    info = {"version": 1, "pid": pid, "boot_id": "00000000-0000-0000-0000-000000000000", "start_time": 1,
            "ip": "192.0.2.1", "client": "tcp://127.0.0.1:9", "agent": "tcp://127.0.0.1:9", "key": "00" * 32,
            "signature_scheme": "hmac-sha256", "node_timeout_ms": 2000, **change}
    path = os.path.join(pdir, "connection.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path


def test_a_copied_connection_files_pids_are_never_signalled_here(env):
    """A copy of another machine's connection file names that machine's pids:
    `shoal stop` here never signals them (a process of ours with that pid
    lives on), and `shoal start` leaves the copy alone, saying whose it is."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = foreign_connection_file(env, sleeper.pid)
        p = shoal_cmd(env, "stop", timeout=60)
        assert p.returncode == 1 and "does not run on this machine" in p.stderr, p.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None, "shoal stop signalled a pid of the file's machine here"
        p = shoal_cmd(env, "start", "-n", "1", "--daemonize")
        assert p.returncode == 1 and "of another machine" in p.stderr, p.stderr
        assert os.path.exists(path)
        # The same file from this machine's boot, but another pid namespace (a container's).
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        foreign_connection_file(env, sleeper.pid, boot_id=boot, pid_ns="pid:[1]")
        p = shoal_cmd(env, "stop", timeout=60)
        assert p.returncode == 1 and "does not run on this machine" in p.stderr, p.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_connection_file_of_this_machine_is_said_and_removed(env):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    path = foreign_connection_file(env, gone.pid, boot_id=boot, pid_ns=os.readlink("/proc/self/ns/pid"))
    p = shoal_cmd(env, "stop", timeout=60)
    assert p.returncode == 1 and "stale" in p.stderr, p.stderr
    assert not os.path.exists(path)


def test_agent_joins_a_cluster_in_the_foreground_and_exits_with_its_agent(env, tmp_path):
    """`shoal agent --join FILE` adds a node with its engines; the copy goes
    to the profile's place where there was none; in the foreground it exits
    with the agent's status (here 0, stopped by the cluster's stop)."""
    other = dict(env, SHOAL_DIR=str(tmp_path / "other"))
    p = shoal_cmd(env, "start", "-n", "1", "--daemonize")
    assert p.returncode == 0, p.stderr
    conn = os.path.join(env["SHOAL_DIR"], "profile_default", "connection.json")
    try:
        agent = subprocess.Popen([sys.executable, "-m", "shoal", "agent", "--join", conn, "-n", "2"], env=other,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = agent.stdout.readline()
        assert "joined the cluster" in line and "engines [1, 2]" in line, (line, agent.stderr.read())
        copy = os.path.join(other["SHOAL_DIR"], "profile_default", "connection.json")
        assert os.stat(copy).st_mode & 0o777 == 0o600
        p = shoal_cmd(other, "status")
        assert "2 node(s), 3 engine(s)" in p.stdout, p.stdout
    finally:
        shoal_cmd(env, "stop")
    assert agent.wait(timeout=30) == 0
