"""The cluster of ipyparallel's tests, on shoal: the adapter's stand-in for
the wheel's ipyparallel/tests/__init__.py (kept beside it as _wheel_init.py).

ipyparallel's setup() starts an ipcontroller and one ipengine in profile
'iptest'; add_engines(n) starts n more ipengines; teardown() stops them all.
Here the same three functions run a real shoal cluster:

- setup(): `python -m shoal start -n 2 --daemonize` in profile
  compat-<pid> (pid: this pytest process), in $SHOAL_DIR (the runner's, of
  its own). The wheel's tests connect with Client(profile='iptest'), so
  profile_iptest is a symlink to it. Two engines, not one: every test class
  asks for at least two (ClusterTestCase.engine_count), and so both share
  one node, with lanes, as a user's cluster of one machine does.
- add_engines(n): starts one more `shoal-agent --engines n` (another node of
  the same cluster, on this machine: the way another machine joins) and
  waits until the cluster has them. Returns one entry per engine, as the
  wheel's does (ClusterTestCase counts them).
- teardown(): `shoal stop` (the controller stops every node), then waits for
  every process of the cluster and kills what is left, and removes the
  profile.

Every pid of the cluster (controller, agents, engines) is appended to
$COMPAT_PIDS, which the runner checks once the run is over: none may be
left. Importing this module does nothing else, since engines import it too
(functions of the test modules are pickled by reference).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from ipyparallel import Client

launchers = []  # the agents started by add_engines (Popen: poll() as ipyparallel's launchers)

ENGINES_AT_START = 2
START_TIMEOUT = 60
AGENT_ARGS = ["--arena-size", str(4 << 30), "--prefault", "0"]  # sparse; nothing faulted in ahead


def cluster_profile():
    """This run's profile: compat-<pid of this pytest process>."""
    return f"compat-{os.getpid()}"


def _shoal_dir():
    d = os.environ.get("SHOAL_DIR")
    if not d:
        raise RuntimeError("SHOAL_DIR is not set: run the compat tests through scripts/compat.sh")
    return d


def _profile_dir(name):
    return os.path.join(_shoal_dir(), f"profile_{name}")


def _record(pids):
    path = os.environ.get("COMPAT_PIDS")
    if path and pids:
        with open(path, "a") as f:
            f.write("".join(f"{pid} {cluster_profile()}\n" for pid in pids))


def _cluster_pids():
    """The pids of the controller and of every node and engine it knows."""
    pids = []
    try:
        with open(os.path.join(_profile_dir(cluster_profile()), "connection.json")) as f:
            pids.append(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        return pids
    try:
        rc = Client(profile=cluster_profile(), timeout=5)
    except Exception:
        return pids
    try:
        st = rc.queue_status()
        pids += [n["pid"] for n in st.get("nodes", [])] + [e["pid"] for e in st.get("engines", [])]
    except Exception:
        pass
    finally:
        rc.close()
    return pids


def _shoal(*args, timeout):
    return subprocess.run([sys.executable, "-m", "shoal", *args, "--profile", cluster_profile()],
                          capture_output=True, text=True, timeout=timeout)


def setup():
    os.makedirs(_shoal_dir(), exist_ok=True)
    link = _profile_dir("iptest")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(f"profile_{cluster_profile()}", link)
    p = _shoal("start", "-n", str(ENGINES_AT_START), "--daemonize", "--timeout", str(START_TIMEOUT),
               "--arena-size", str(4 << 30), "--prefault", "0", timeout=START_TIMEOUT + 30)
    _record(_cluster_pids())
    if p.returncode != 0:
        teardown()
        raise RuntimeError(f"the shoal cluster did not start: {(p.stderr or p.stdout).strip()}")


def add_engines(n=1, profile=None, total=False):
    """Adds n engines (total=True: as many as make n in all) to the cluster.
    `profile` (the wheel's 'iptest') is ignored: there is one cluster."""
    from shoal import _bin
    rc = Client(profile=cluster_profile())
    try:
        base = len(rc)
        if total:
            n = max(n - base, 0)
        if n == 0:
            return []
        log = open(os.path.join(_profile_dir(cluster_profile()), "cluster.log"), "ab")
        agent = subprocess.Popen([_bin.find("shoal-agent"), "--profile", cluster_profile(),
                                  "--engines", str(n), *AGENT_ARGS],
                                 env=dict(os.environ, SHOAL_PYTHON=sys.executable),
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        launchers.append(agent)
        _record([agent.pid])
        deadline = time.monotonic() + START_TIMEOUT
        while len(rc) < base + n:
            if agent.poll() is not None:
                raise RuntimeError(f"a shoal agent for {n} more engine(s) exited with status {agent.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timeout waiting for {n} more engine(s)")
            time.sleep(0.05)
            rc.refresh()
        _record(_cluster_pids())
        return [agent] * n
    finally:
        rc.close()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _ours(pid):
    """pid is still a process of this cluster (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return cluster_profile().encode() in cmd or f"SHOAL_DIR={_shoal_dir()}".encode() in env


def teardown():
    pids = set(_cluster_pids()) | {a.pid for a in launchers}
    _record(sorted(pids))
    if os.path.exists(os.path.join(_profile_dir(cluster_profile()), "connection.json")):
        try:
            p = _shoal("stop", timeout=60)
            if p.returncode != 0:
                print(f"shoal stop: {(p.stderr or p.stdout).strip()}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            print("shoal stop did not return within 60 s", file=sys.stderr)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        for a in launchers:
            a.poll()  # reaps the agents we started
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid) and _ours(pid):
            print(f"compat teardown: pid {pid} of profile {cluster_profile()} still runs: SIGKILL", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    while launchers:
        a = launchers.pop()
        try:
            a.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    for name in ("iptest", cluster_profile()):
        path = _profile_dir(name)
        if os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
