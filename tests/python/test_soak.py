"""`shoal bench soak` (shoal.soak) in small, and what it found: a
load-balanced map over a list of engines that all died waited for ever."""

import os
import signal
import subprocess
import sys
import time

import pytest

import shoal

from procs import Agent, Controller


@pytest.mark.parametrize("lanes", [True, False])
def test_a_map_over_engines_that_all_died_fails_its_items_not_waits(tmp_path, lanes):
    # Found by the soak: a map's items not yet handed out when the last
    # engine of its view died were never handed out, and never failed
    # (view.py, LoadBalancedMapResult._fill found no engine and returned).
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2, extra=["--restart-engines"])
    c = shoal.Client(url_file=str(ctl.conn), timeout=10, lanes=lanes)
    try:
        ids = c.ids
        pids = c[ids].apply_sync(os.getpid)
        lview = c.load_balanced_view(ids)
        ar = lview.map_async(time.sleep, [0.1] * 200, chunksize=1, return_exceptions=True)
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        values = ar.get(timeout=30)
        assert len(values) == 200
        failed = [v for v in values if isinstance(v, BaseException)]
        assert failed and all(isinstance(v, shoal.EngineError) for v in failed), failed[:3]
        assert all(v is None for v in values if not isinstance(v, BaseException))
        # The view's engines are gone for good (new ones have new ids): a new map fails at once.
        deadline = time.monotonic() + 10
        while set(c.ids) & set(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        late = lview.map_async(abs, [1, 2, 3], chunksize=1, return_exceptions=True)
        values = late.get(timeout=10)
        assert len(values) == 3 and all(isinstance(v, shoal.EngineError) for v in values), values
        assert "every engine of its load-balanced view" in str(values[0])
    finally:
        c.close()
        agent.stop()
        ctl.stop()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _strays(needle):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and _alive(int(entry)):
            found.append((int(entry), cmd))
    return found


def test_a_small_soak_loses_nothing_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run))
    shm_before = set(os.listdir("/dev/shm"))
    out = tmp_path / "soak.json"
    p = subprocess.run([sys.executable, "-m", "shoal", "bench", "soak", "--tasks", "20000", "--push-bytes", "64M",
                        "--kill-every", "1", "--clients", "2", "--deadline", "30", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("soak summary "))
    s = dict(kv.split("=", 1) for kv in line.split()[2:])
    assert int(s["lost"]) == 0 and int(s["wrong"]) == 0 and s["ok"] == "1", line
    assert int(s["submitted"]) == 20000
    assert int(s["answered"]) + int(s["failed"]) == int(s["submitted"]), line
    assert int(s["failed"]) == int(s.get("failed_EngineError", 0)), "every failure is an engine's death"
    assert int(s["engines_killed"]) >= 1, line
    assert int(s["push_bytes"]) >= 48 << 20, line
    clients = [x for x in p.stdout.splitlines() if x.startswith("soak client=")]
    assert len(clients) == 2 and "role=lanes" in clients[0] and "role=controller" in clients[1]
    kinds = {x.split()[2].split("=")[1] for x in p.stdout.splitlines() if x.startswith("soak memory ")}
    assert kinds == {"controller", "agent", "engine", "client"}
    import json
    assert json.loads(out.read_text())["summary"]["lost"] == 0
    # Nothing left behind: processes, the profile, the agent's socket, shared memory.
    profile = next(x for x in p.stdout.splitlines() if x.startswith("# cluster '")).split("'")[1]
    assert "stopped" in p.stdout.splitlines()[-1]
    assert not _strays(profile)
    assert not os.path.exists(tmp_path / "home" / f"profile_{profile}")
    assert not [f for f in os.listdir(run / "shoal") if profile in f] if (run / "shoal").exists() else True
    assert not [f for f in set(os.listdir("/dev/shm")) - shm_before if "shoal" in f or profile in f]


def test_sigterm_stops_the_soak_and_its_cluster(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run))
    p = subprocess.Popen([sys.executable, "-m", "shoal", "bench", "soak", "--tasks", "1000000", "--push-bytes", "64M",
                          "--kill-every", "1", "--clients", "3"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pids = []
        for line in p.stdout:
            if line.startswith("# cluster '"):
                profile = line.split("'")[1]
            if line.startswith("# clients:"):
                pids = [int(x) for x in line.split("pid ")[1:] for x in [x.split()[0]]]
                break
        assert len(pids) == 3, "the clients started"
        time.sleep(1)
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err and "stopped" in rest
    assert not _strays(profile)
    assert not any(_alive(pid) for pid in pids)
    assert not os.path.exists(tmp_path / "home" / f"profile_{profile}")
