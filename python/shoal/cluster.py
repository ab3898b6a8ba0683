"""shoal.Cluster: start a cluster from Python, as ipyparallel's Cluster does.

    with shoal.Cluster(n=4) as rc:      # a Client of a fresh 4-engine cluster
        rc[:].apply_sync(f)
    # stopped: no process and no shared memory remain

The cluster runs `shoal start --daemonize` in a profile of its own (a fresh
name, removed once the cluster stops, unless one is given), so that it
never meets another cluster.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid


class Cluster:
    """A controller, a node agent and n engines, started and stopped from Python."""

    def __init__(self, n=None, profile=None, arena_size=None, timeout=60, **kwargs):
        if kwargs:
            raise TypeError(f"Cluster does not take {', '.join(sorted(kwargs))}")
        self.n = n or os.cpu_count() or 1
        self._own_profile = profile is None  # ours to remove once stopped
        self.profile = profile or f"cluster-{uuid.uuid4().hex[:8]}"
        self.arena_size = arena_size
        self.timeout = timeout
        self._running = False
        self._client = None

    def __repr__(self):
        return f"<Cluster(n={self.n}, profile={self.profile!r}, {'running' if self._running else 'stopped'})>"

    def _shoal(self, *args, timeout):
        return subprocess.run([sys.executable, "-m", "shoal", *args, "--profile", self.profile],
                              capture_output=True, text=True, timeout=timeout)

    def start_cluster_sync(self, n=None):
        """Starts the controller, the agent and the engines; returns once they are ready."""
        if self._running:
            raise RuntimeError(f"the cluster of profile {self.profile!r} is already running")
        args = ["start", "-n", str(n or self.n), "--daemonize", "--timeout", str(self.timeout)]
        if self.arena_size:
            args += ["--arena-size", str(self.arena_size)]
        try:
            p = self._shoal(*args, timeout=self.timeout + 30)
        except BaseException:
            # Ctrl-C (or our timeout) while `shoal start` waited for the
            # engines: what it started runs on in a session of its own.
            _stop_profile(self.profile, remove=self._own_profile)
            raise
        if p.returncode != 0:
            raise RuntimeError(f"the cluster did not start: {(p.stderr or p.stdout).strip()}")
        self._running = True

    def connect_client_sync(self, **kwargs):
        """A Client of this cluster."""
        from .client import Client
        self._client = Client(profile=self.profile, **kwargs)
        return self._client

    def start_and_connect_sync(self, n=None, **kwargs):
        """Starts the cluster and returns a Client of it."""
        self.start_cluster_sync(n)
        try:
            return self.connect_client_sync(**kwargs)
        except BaseException:
            self.stop_cluster_sync()
            raise

    def stop_cluster_sync(self):
        """Stops every process of the cluster; nothing of it remains."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._running:
            p = self._shoal("stop", timeout=60)
            self._running = False
            if self._own_profile and p.returncode == 0:
                from .client import _profile_dir
                shutil.rmtree(_profile_dir(self.profile), ignore_errors=True)
            if p.returncode != 0:
                raise RuntimeError(f"the cluster did not stop cleanly: {(p.stderr or p.stdout).strip()}")

    def __enter__(self):
        return self.start_and_connect_sync()

    def __exit__(self, *exc):
        self.stop_cluster_sync()


def _profile_processes(profile):
    """The pids of the processes started for profile: those whose command
    line says ``--profile <profile>`` (the controller, the agent) and their
    descendants (the engines)."""
    argv, parent = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv[int(entry)] = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    want = ["--profile".encode(), profile.encode()]
    mine, pid = set(), os.getpid()  # never ourselves, nor what started us
    while pid > 1 and pid not in mine:
        mine.add(pid)
        pid = parent.get(pid, 0)
    found = {pid for pid, args in argv.items()
             if pid not in mine and any(args[i:i + 2] == want for i in range(len(args) - 1))}
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def _stop_profile(profile, remove=True):
    """Stops whatever still runs for profile and (remove=True) removes its
    directory.

    For a start that was cut short (Ctrl-C while ``shoal start`` waited for
    the engines), which leaves the controller and the agent running in a
    session of their own, and for a stop that failed: ``shoal stop`` if the
    controller wrote its connection file, then SIGTERM (and SIGKILL after
    10 s) to any process of the profile but this one and its ancestors.
    Returns the pids that could not be stopped (none, unless SIGKILL
    failed)."""
    from .client import _alive, _connection_file, _profile_dir
    if os.path.exists(_connection_file(profile, None)):
        try:
            subprocess.run([sys.executable, "-m", "shoal", "stop", "--profile", profile],
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass  # the signals below
    pids = _profile_processes(profile)
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        if not pids:
            break
    if remove:
        shutil.rmtree(_profile_dir(profile), ignore_errors=True)
    return pids
