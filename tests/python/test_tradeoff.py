"""`shoal bench tradeoff` (shoal.tradeoff): the rows, the table's summary,
the plot, bad arguments, and that the cluster it starts leaves nothing
behind, on Ctrl-C too. Sizes are tiny: the figures are not checked, only
that they are consistent with each other (the machine is noisy)."""

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import shoal
from shoal import tradeoff

SIZES = [1024, 128 << 10, 1 << 20]
PASSES = [0, 3]


@pytest.fixture
def env(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run))


def bench(env, *args, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "shoal", "bench", "tradeoff", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def strays(*needles):
    """Live processes whose command line mentions any of needles."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles) and alive(int(entry)):
            found.append((int(entry), cmd))
    return found


def pids_of(stdout):
    """Every pid the run announced: controller, agents, engines, socket workers."""
    pids = []
    for line in stdout.splitlines():
        if line.startswith("# cluster '") and "pid" in line or line.startswith("# socket workers"):
            pids += [int(x) for x in re.findall(r"\d+", line.split(":", 1)[1])]
    return pids


def parse_rows(stdout):
    rows = []
    for line in stdout.splitlines():
        if line.startswith("tradeoff "):
            row = dict(kv.split("=", 1) for kv in line.split()[1:])
            rows.append({k: float(v) if "." in v or "e" in v else int(v) for k, v in row.items()})
    return rows


def expected_summary(rows):
    """The summary lines, worked out from the rows here, not by shoal.tradeoff."""
    def label(size):
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if size % scale == 0:
                return f"{size // scale} {unit}"
        return f"{size} B"

    lines = []
    for passes in sorted({r["passes"] for r in rows}):
        mine = sorted((r for r in rows if r["passes"] == passes), key=lambda r: r["size"])
        said = []
        for path in ("arena", "socket"):
            pays = [r[f"{path}_s"] < r["serial_s"] for r in mine]
            first = next((i for i in range(len(mine)) if all(pays[i:])), None)
            if first is not None:
                said.append(f"from {label(mine[first]['size'])} on ({path})")
            elif any(pays):
                where = ", ".join(label(r["size"]) for r, p in zip(mine, pays) if p)
                said.append(f"not from any size on ({path}; faster at {where} only)")
            else:
                said.append(f"never in the measured range ({path})")
        lines.append(f"passes={passes} ({mine[-1]['ns_per_element']:.2f} ns/element): parallel pays "
                     f"{', '.join(said)}")
    return lines


def check_rows(rows, sizes, passes):
    assert sorted((r["size"], r["passes"]) for r in rows) == sorted((s, p) for s in sizes for p in passes)
    for r in rows:
        for way in ("serial", "arena", "socket"):
            assert 0 < r[f"{way}_min_s"] <= r[f"{way}_s"] <= r[f"{way}_max_s"], r
        for path in ("arena", "socket"):
            assert math.isclose(r[f"{path}_speedup"], r["serial_s"] / r[f"{path}_s"], rel_tol=1e-4), r
        assert math.isclose(r["ns_per_element"], r["serial_s"] / (r["size"] // 8) * 1e9, rel_tol=1e-4), r
        assert r["reps"] >= 3


def test_cli_run_table_plot_and_nothing_left(env, tmp_path):
    png, rows_json = tmp_path / "t.png", tmp_path / "rows.json"
    p = bench(env, "-n", "2", "--sizes", "1K,128K,1M", "--costs", "3", "--reps", "3", "--png", str(png),
              "--json", str(rows_json), cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    rows = parse_rows(p.stdout)
    check_rows(rows, SIZES, PASSES)  # the cost 0 (moving only) is measured though not asked for
    assert all(r["engines"] == 2 for r in rows)
    for saved, printed in zip(json.loads(rows_json.read_text()), rows):
        assert saved.keys() == printed.keys()
        assert all(math.isclose(saved[k], printed[k], rel_tol=1e-4) for k in saved)
    summary = [line for line in p.stdout.splitlines() if line.startswith("passes=")]
    assert summary == expected_summary(rows)
    # The table: one line per case, its speedups as printed in the key=value lines.
    table = [line.split() for line in p.stdout.splitlines() if re.match(r"\s+\d+ [KM]iB\s", line)]
    assert len(table) == len(rows)
    for r in rows:
        line = next(t for t in table if f"{t[0]} {t[1]}" == tradeoff.size_label(r["size"])
                    and int(t[2]) == r["passes"])
        for col, key in ((4, "serial_s"), (5, "arena_s"), (6, "socket_s")):
            assert float(line[col]) == pytest.approx(r[key], abs=1e-6)
        assert float(line[7]) == pytest.approx(r["arena_speedup"], abs=0.006)
        assert float(line[8]) == pytest.approx(r["socket_speedup"], abs=0.006)
        pays = [p for p in ("arena", "socket") if r[f"{p}_speedup"] > 1]
        assert line[9:9 + max(len(pays), 1)] == (pays or ["-"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Its own cluster and workers are gone, and so is the cluster's profile.
    pids = pids_of(p.stdout)
    assert len(pids) == 1 + 1 + 2 + 2, p.stdout
    assert not [x for x in pids if alive(x)], "a process of the run outlived it"
    profile = re.search(r"# cluster '([^']+)'", p.stdout).group(1)
    assert not (tmp_path / "home" / f"profile_{profile}").exists()
    assert not strays(profile, env["XDG_RUNTIME_DIR"])


@pytest.mark.parametrize("args, says", [
    (["--sizes", "1X"], "argument --sizes: '1X' is not a size"),
    (["--sizes", "4"], "less than one float64"),
    (["--sizes", ","], "no sizes given"),
    (["--costs", "1,two"], "argument --costs: 'two' is not a cost"),
    (["--costs", "-1"], "is not a cost"),
    (["--reps", "2"], "--reps must be at least 3"),
    (["-n", "0"], "-n must be at least 1"),
])
def test_bad_arguments_are_usage_errors(env, args, says):
    p = bench(env, *args)
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not p.stdout


def test_a_cluster_that_does_not_start_or_is_not_there(env, tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # the profile cannot be made under a file
    p = bench(dict(env, SHOAL_DIR=str(blocked)), "-n", "1", "--sizes", "1K", "--no-png")
    assert p.returncode == 1, p.stderr
    assert "shoal bench tradeoff: the cluster did not start: shoal: cannot make the profile's directory" \
        in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = bench(env, "--profile", "nothing-here", "--sizes", "1K", "--no-png")
    assert p.returncode == 1 and "no connection file" in p.stderr, p.stderr
    assert not strays(env["XDG_RUNTIME_DIR"])


@pytest.mark.parametrize("sig, when", [(signal.SIGINT, "# shoal bench tradeoff:"),
                                       (signal.SIGTERM, "# shoal bench tradeoff:"),
                                       (signal.SIGINT, "# starting a cluster")])
def test_interrupted_run_leaves_nothing_behind(env, tmp_path, sig, when):
    # Many runs after the line the signal waits for: the run must still be
    # measuring when the signal comes, however late a busy machine lets this
    # test send it (CI once saw the whole run end first, with 3 runs a case).
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "bench", "tradeoff", "-n", "2", "--sizes", "16M",
                             "--costs", "16", "--reps", "500", "--no-png"], env=dict(env, PYTHONFAULTHANDLER="1"),
                            cwd=tmp_path,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(when):
                break
        assert seen and seen[-1].startswith(when), "".join(seen) + proc.stderr.read()
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
            out, err = proc.communicate(timeout=30)
            started = re.search(r"profile (tradeoff-[\w-]+)\)", "".join(seen))
            if started:  # its cluster, which the run could not stop
                subprocess.run([sys.executable, "-m", "shoal", "stop", "--profile", started.group(1)], env=env,
                               capture_output=True, timeout=60)
            raise AssertionError(f"still running 60 s after signal {sig}:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted; its cluster was stopped" in err, err
    assert "Traceback" not in err, err  # the socket workers end quietly too
    stdout = "".join(seen) + out
    profile = re.search(r"profile (tradeoff-[\w-]+)\)", stdout).group(1)
    pids = pids_of(stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (strays(profile, env["XDG_RUNTIME_DIR"]) or any(map(alive, pids))):
        time.sleep(0.05)
    assert not strays(profile, env["XDG_RUNTIME_DIR"], "_worker_main"), "a process of the run outlived it"
    assert not [x for x in pids if alive(x)]
    assert not (tmp_path / "home" / f"profile_{profile}").exists()


def test_run_on_a_running_cluster_leaves_it_running(env, monkeypatch):
    for k in ("SHOAL_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(k, env[k])
    cluster = shoal.Cluster(n=2)
    with cluster as rc:
        out = io.StringIO()
        rows = tradeoff.run([1024, 256 << 10], [2], n_engines=1, profile=cluster.profile, reps=3, png=None,
                            out=out)
        check_rows(rows, [1024, 256 << 10], [0, 2])
        assert all(r["engines"] == 1 for r in rows)
        text = out.getvalue()
        assert "already running" in text and "stopped" not in text
        assert [line for line in text.splitlines() if line.startswith("passes=")] == expected_summary(rows)
        assert tradeoff.summary_lines(rows) == expected_summary(rows)
        # The cluster still works, and the engine keeps nothing of the run.
        assert rc[:].apply_sync(lambda: "_shoal_tradeoff_x" in globals()) == [False, False]


def test_missing_matplotlib_is_said_before_anything_starts(env):
    code = ("import sys; sys.modules['matplotlib'] = None; from shoal import cli; "
            "sys.exit(cli.main(['bench', 'tradeoff', '--sizes', '1K']))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "needs matplotlib" in p.stderr and "--no-png" in p.stderr, p.stderr
    assert "starting a cluster" not in p.stdout


def _own_listening_ports():
    """The loopback TCP ports this process listens on (its sockets' inodes
    found in /proc/net/tcp in state LISTEN)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].split(":")[1], 16))
    return ports


def test_socket_workers_take_only_connections_that_know_their_token(tmp_path):
    """Any user of the machine may connect to a loopback port, and the
    socket path unpickles what its workers answer: a stranger that connects
    first (and would answer with a pickle that runs code) is closed unread."""
    import socket
    import struct
    import threading

    before = _own_listening_ports()
    made = {}
    t = threading.Thread(target=lambda: made.setdefault("w", tradeoff.SocketWorkers(2, timeout=30)))
    t.start()
    deadline = time.monotonic() + 10
    while not (_own_listening_ports() - before) and time.monotonic() < deadline:
        time.sleep(0.001)
    port, = _own_listening_ports() - before
    # An answer as a worker frames it (_send_obj) that runs a command when unpickled.
    evil = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(struct.pack("<QI", len(evil), 0) + evil)
        t.join(30)
        w = made["w"]
        try:
            assert len(w.socks) == 2
            w.scatter("a", __import__("numpy").arange(4.0))
            assert w.call(__import__("numpy").sum, "a") == [1.0, 5.0]
        finally:
            w.close()
    assert not (tmp_path / "pwned").exists()
