"""`shoal bench soak`: many tasks, many pushes, engines killed meanwhile.

A soak of the failure model's promise (ARCHITECTURE.md, "Failure model"):
every submitted task ends in a result or an error, none is lost. Several
client processes submit their share of ``--tasks`` at once, each by its
own path:

- ``lanes``: ``Client()``: direct applies to one engine at a time, through
  the lanes; load-balanced applies and maps with ``chunksize=1`` (the
  node's pool);
- ``controller``: ``Client(lanes=False)``: the same, every task through
  the controller;
- ``mixed``: ``Client()``: load-balanced maps with ``chunksize=1``,
  applies to every engine at once, direct applies.

Every client also pushes numpy arrays of a few MiB to every engine (its
share of ``--push-bytes``) and pulls each back from one engine, checking
every element. A *task* is one engine's part of a submission: an apply to
one engine is one, an apply or a push to four engines four, a map with
``chunksize=1`` of 32 items 32. Each ends in one of:

- answered, with the right value (``abs(-k) == k``; a pulled array equal
  to the pushed one);
- wrong: answered with another value (a bug);
- failed, with a reason: the exception's type (``EngineError`` for the
  tasks of a killed engine, which is expected; anything else is not);
- lost: no answer within ``--deadline`` seconds of its submission (a bug).

Meanwhile the killer sends SIGKILL to a random engine every
``--kill-every`` seconds; the cluster runs with ``--restart-engines``, so
the agent starts a new engine (a new id) in its place, and the clients
take it up (their views follow ``rc.ids``).

The resident memory (``VmRSS`` and its anonymous part ``RssAnon``, from
``/proc/PID/status``) of the controller, the agent, the engines and the
clients is read after a warm-up and at the end, and printed side by side.

Output: ``# ...`` lines on the way, one ``soak client=...`` line per
client, ``soak memory ...`` lines per kind of process, and one
``soak summary ...`` line, all ``key=value``. The exit status is 0 when
nothing was lost, no value was wrong and every failure was an
EngineError; 1 otherwise.
"""

import collections
import gc
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB}
ROLES = ("lanes", "controller", "mixed")
# The failures a killed engine explains: its tasks' EngineError, and the
# ImpossibleDependency of a load-balanced task whose retry found no engine
# left to try ("no engine can run it"): with 2 engines killed a second
# apart, a retry can come while the one it has not tried is dead and its
# restart not yet in the client's registry (seen once in 20,000 tasks).
EXPECTED = ("EngineError", "ImpossibleDependency")
WINDOW = 256  # submissions (AsyncResults) a client keeps in flight
MAP_ITEMS = 32  # items of a load-balanced map (chunksize=1: one task each)
PUSH_SIZES = (2 * MiB, 4 * MiB, 6 * MiB, 8 * MiB)
SAMPLES = 3  # messages kept per kind of failure
MIN_AGE = 6.0  # seconds an engine runs before the killer may pick it
NO_ENGINES = 60.0  # seconds a client goes on without any live engine before it gives up


def parse_bytes(text):
    """Bytes from "64M", "2G", "1.5GiB", "4096" (K, M, G: powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size: use a number of bytes with an optional unit, "
                         f"K, M or G (powers of 1024), e.g. 64M or 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def kv(prefix, d):
    return prefix + " " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# ---- memory -----------------------------------------------------------------------------

def memory(pid):
    """{"rss": bytes, "anon": bytes} of a live process (VmRSS and RssAnon
    of /proc/PID/status), or None if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) * KiB
    except (OSError, ValueError):
        return None
    return out if "rss" in out else None


# ---- one client process ---------------------------------------------------------------

class Tally:
    """How each task of one client ended."""

    def __init__(self):
        self.submitted = self.answered = self.wrong = self.lost = 0
        self.push_bytes = self.pushes = self.pulls = 0
        self.failed = collections.Counter()  # exception type -> tasks
        self.samples = collections.defaultdict(list)  # exception type, "wrong", "lost" -> messages
        self.kinds = collections.Counter()  # what was submitted: apply, lb_apply, lb_map, ...

    def sample(self, what, text):
        if len(self.samples[what]) < SAMPLES:
            self.samples[what].append(text[:300])

    def value(self, v, expected, what):
        if isinstance(v, BaseException):
            name = type(v).__name__
            self.failed[name] += 1
            self.sample(name, f"{what}: {v}")
        elif expected(v):
            self.answered += 1
        else:
            self.wrong += 1
            self.sample("wrong", f"{what}: got {v!r:.100}")

    def as_dict(self):
        return {"submitted": self.submitted, "answered": self.answered, "failed": dict(self.failed),
                "wrong": self.wrong, "lost": self.lost, "push_bytes": self.push_bytes, "pushes": self.pushes,
                "pulls": self.pulls, "kinds": dict(self.kinds), "samples": dict(self.samples)}


class _Worker:
    """The work of one client process: submits its share, keeps WINDOW
    submissions in flight, settles each (in submission order) within the
    deadline."""

    def __init__(self, rc, spec):
        self.rc = rc
        self.index, self.role = spec["index"], spec["role"]
        self.share, self.push_share = spec["tasks"], spec["push_bytes"]
        self.deadline, self.stop_at = spec["deadline"], spec.get("stop_at")
        self.t = Tally()
        self.pending = collections.deque()
        self.k = 0  # the next argument: abs(-k) == k
        self.rng = random.Random(spec["seed"])
        self._ids, self._lview = None, None
        self.name = f"_soak_{os.getpid()}"  # the pushed array's name on the engines: this client's own

    def views(self):
        """(ids, load-balanced view) over the live engines, read again when
        the registry changed (rc.ids reads it at most every 0.5 s)."""
        ids = self.rc.ids
        if ids != self._ids:
            self._ids = ids
            self._lview = self.rc.load_balanced_view(ids) if ids else None
        return self._ids, self._lview

    def dv(self, targets):
        """A DirectView of targets, or None if one of them has left the
        registry since the ids were read (killed): the caller picks again
        from the ids read anew, as a user's code would; nothing was sent."""
        try:
            return self.rc[targets]
        except IndexError:
            self._ids = None
            return None

    def next_args(self, n):
        ks = list(range(self.k, self.k + n))
        self.k += n
        return ks

    def submit(self, kind, nparts, make, expected):
        """Counts nparts tasks submitted and makes them (make() -> an
        AsyncResult); a submission that raises fails them all, with its
        reason."""
        self.t.submitted += nparts
        self.t.kinds[kind] += nparts
        try:
            ar = make()
        except Exception as e:
            name = "submit:" + type(e).__name__
            self.t.failed[name] += nparts
            self.t.sample(name, f"{kind}: {e}")
            return None
        self.pending.append((ar, nparts, time.monotonic(), kind, expected))
        return ar

    def settle(self, item):
        ar, nparts, t0, kind, expected = item
        try:
            values = ar.get(timeout=max(0.0, t0 + self.deadline - time.monotonic()), return_exceptions=True)
        except TimeoutError:
            done = ar.progress
            self.t.lost += nparts - done
            self.t.answered += done  # answered in time, not checked (the rest did not come)
            self.t.sample("lost", f"{kind}: {nparts - done} of {nparts} task(s) unanswered after "
                                  f"{self.deadline} s: msg_ids {ar.msg_ids[:4]}")
            return
        except Exception as e:  # get() with return_exceptions raises nothing else: say so if it does
            name = "get:" + type(e).__name__
            self.t.failed[name] += nparts
            self.t.sample(name, f"{kind}: {e}")
            return
        if nparts == 1 and not isinstance(values, list):
            values = [values]
        if len(values) != nparts:
            self.t.wrong += nparts
            self.t.sample("wrong", f"{kind}: {len(values)} values for {nparts} tasks")
            return
        for v, want in zip(values, expected):
            self.t.value(v, want, kind)

    def make_room(self, keep=WINDOW):
        while len(self.pending) >= keep:
            self.settle(self.pending.popleft())

    def push_pull(self, ids):
        """Pushes a fresh array to every engine, waits for it, and pulls
        it back from one engine that took it; both checked."""
        import numpy as np
        size = self.rng.choice(PUSH_SIZES)
        a = np.arange(size // 8, dtype=np.float64)
        a += self.k
        self.k += 1
        self.t.push_bytes += a.nbytes
        self.t.pushes += 1
        dv = self.dv(ids)
        if dv is None:
            return
        ar = self.submit("push", len(ids), lambda: dv.push({self.name: a}, block=False),
                         [lambda v: v is None] * len(ids))
        if ar is None:
            return
        item = self.pending.pop()
        self.settle(item)
        values = ar.get(0, return_exceptions=True)
        took = [e for e, v in zip(ids, values if isinstance(values, list) else [values])
                if not isinstance(v, BaseException)]
        if not took:
            return
        one = self.dv(self.rng.choice(took))
        if one is None:
            return
        self.t.pulls += 1
        if self.submit("pull", 1, lambda: one.pull(self.name, block=False),
                       [lambda v: isinstance(v, np.ndarray) and np.array_equal(v, a)]) is not None:
            self.settle(self.pending.pop())

    def one(self, ids, lview):
        """One submission of this client's kind."""
        r = self.rng.random()
        left = self.share - self.t.submitted
        if self.role in ("lanes", "controller"):
            if r < 0.5:
                one = self.dv(ids[self.k % len(ids)])
                if one is None:
                    return
                k, = self.next_args(1)
                self.submit("apply", 1, lambda: one.apply_async(abs, -k), [lambda v, k=k: v == k])
            elif r < 0.7:
                k, = self.next_args(1)
                self.submit("lb_apply", 1, lambda: lview.apply_async(abs, -k), [lambda v, k=k: v == k])
            else:
                ks = self.next_args(min(MAP_ITEMS, left))
                self.submit("lb_map", len(ks), lambda: lview.map_async(abs, [-k for k in ks], chunksize=1,
                                                                       return_exceptions=True),
                            [lambda v, k=k: v == k for k in ks])
        else:
            if r < 0.6:
                ks = self.next_args(min(MAP_ITEMS, left))
                self.submit("lb_map", len(ks), lambda: lview.map_async(abs, [-k for k in ks], chunksize=1,
                                                                       return_exceptions=True),
                            [lambda v, k=k: v == k for k in ks])
            elif r < 0.8 and len(ids) <= left:
                dv = self.dv(ids)
                if dv is None:
                    return
                k, = self.next_args(1)
                self.submit("apply_all", len(ids), lambda: dv.apply_async(abs, -k), [lambda v, k=k: v == k] * len(ids))
            else:
                one = self.dv(ids[self.k % len(ids)])
                if one is None:
                    return
                k, = self.next_args(1)
                self.submit("apply", 1, lambda: one.apply_async(abs, -k), [lambda v, k=k: v == k])

    def run(self, progress):
        # As many push slots as pushes of the smallest size would need, spread
        # over the share; pushing stops once push_share is reached, so every
        # push it takes comes long before the share's end.
        n_pushes = max(1, -(-self.push_share // min(PUSH_SIZES))) if self.push_share else 0
        every = max(1, self.share // (n_pushes + 1)) if n_pushes else 0
        next_push, last_report = every, time.monotonic()
        none_since = None
        while self.t.submitted < self.share:
            if self.stop_at is not None and time.time() >= self.stop_at:
                break
            ids, lview = self.views()
            if not ids:  # every engine dead at once: their replacements are on their way
                if none_since is None:
                    none_since = time.monotonic()
                elif time.monotonic() - none_since > NO_ENGINES:
                    raise RuntimeError(f"no live engine for {NO_ENGINES:.0f} s: the agent restarts none")
                time.sleep(0.05)
                continue
            none_since = None
            # A push and its pull are len(ids) + 1 tasks: only while that many are left of the share.
            if every and self.t.submitted >= next_push and self.t.push_bytes < self.push_share and \
                    self.share - self.t.submitted >= len(ids) + 1:
                next_push += every
                self.push_pull(ids)
            else:
                self.one(ids, lview)
            self.make_room()
            if time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                progress(self.t)
        self.make_room(1)
        return self.t


def _client_main(spec_json):
    """A client process of the soak: says ready (connected, warmed up),
    waits for go, runs, prints its tally, waits for exit (so that its memory
    is read while it still runs). Protocol: one JSON object per line on
    stdout; commands on stdin. Dies if its parent goes (stdin closed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, on Ctrl-C too
    spec = json.loads(spec_json)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else on the protocol's channel
    go, leave = threading.Event(), threading.Event()

    def commands():
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()
            elif line.strip() == "exit":
                leave.set()
        if not leave.is_set():
            os._exit(3)  # the parent is gone
        leave.set()

    threading.Thread(target=commands, daemon=True).start()

    def say(**what):
        out.write(json.dumps(what) + "\n")
        out.flush()

    from .client import Client
    rc = Client(profile=spec["profile"], timeout=20, lanes=spec["role"] != "controller")
    try:
        ids = rc.ids
        rc[ids].apply_sync(abs, -1)  # lanes opened, functions pickled once
        rc.load_balanced_view(ids).map_sync(abs, range(-len(ids) * 2, 0), chunksize=1)
        say(ready=os.getpid(), lanes=sum(1 for e in ids if rc._routes.lane.lanes.get(e) is not None))
        go.wait()
        w = _Worker(rc, spec)
        t0 = time.monotonic()
        tally = w.run(lambda t: say(progress=t.submitted, answered=t.answered, failed=sum(t.failed.values()),
                                    lost=t.lost))
        seconds = time.monotonic() - t0
        del w
        gc.collect()
        say(result=dict(tally.as_dict(), seconds=seconds, role=spec["role"], index=spec["index"]))
        leave.wait()
    finally:
        rc.close()
    return 0


# ---- the cluster --------------------------------------------------------------------------

class ClusterError(RuntimeError):
    """The cluster could not be started or reached."""


def _start_cluster(profile, n, out):
    print(f"# starting a cluster of {n} engines with --restart-engines (profile {profile})", file=out, flush=True)
    try:
        p = subprocess.run([sys.executable, "-m", "shoal", "start", "-n", str(n), "--daemonize", "--restart-engines",
                            "--timeout", "60", "--profile", profile],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`shoal start` for profile {profile} did not return within 120 s") from None
    if p.returncode != 0:
        raise ClusterError(f"the cluster did not start: {(p.stderr or p.stdout).strip()}")


def _processes(rc, profile):
    """{kind: [pid, ...]} of the cluster's live processes."""
    from .client import _connection_file
    with open(_connection_file(profile, None)) as f:
        ctl = json.load(f)["pid"]
    st = rc.cluster_status()
    return {"controller": [ctl], "agent": [n["pid"] for n in st["nodes"] if n["alive"]],
            "engine": [e["pid"] for e in st["engines"] if e["alive"]]}


def _sample(pids_by_kind):
    """{kind: {pid: memory}} of the live ones."""
    out = {}
    for kind, pids in pids_by_kind.items():
        out[kind] = {p: m for p in pids if (m := memory(p)) is not None}
    return out


def _engine_age(pid):
    """Seconds since engine pid started, or None if pid is not a live
    shoal-engine (gone, or its pid taken by another program)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"shoal-engine" not in f.read():
                return None
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def _mib(n):
    return round(n / MiB, 1)


def memory_rows(start, end):
    """One row per kind of process: how many, RSS and anonymous memory
    (MiB) in all and at most, at the start and at the end."""
    rows = []
    for kind in start:
        row = {"kind": kind}
        for when, sample in (("start", start[kind]), ("end", end.get(kind, {}))):
            ms = list(sample.values())
            row[f"n_{when}"] = len(ms)
            row[f"rss_mib_{when}"] = _mib(sum(m["rss"] for m in ms))
            row[f"anon_mib_{when}"] = _mib(sum(m.get("anon", 0) for m in ms))
            row[f"rss_max_mib_{when}"] = _mib(max((m["rss"] for m in ms), default=0))
            row[f"anon_max_mib_{when}"] = _mib(max((m.get("anon", 0) for m in ms), default=0))
        same = set(start[kind]) & set(end.get(kind, {}))  # the processes that lived through the run
        row["same_pids"] = len(same)
        row["anon_growth_mib_same"] = _mib(sum(end[kind][p].get("anon", 0) - start[kind][p].get("anon", 0)
                                               for p in same))
        rows.append(row)
    return rows


class _Child:
    """One client process and what it said."""

    def __init__(self, spec, logdir):
        self.spec = spec
        self.log = open(os.path.join(logdir, f"client-{spec['index']}.log"), "w+")
        code = f"import sys; from shoal.soak import _client_main; sys.exit(_client_main({json.dumps(spec)!r}))"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.ready = self.result = None
        self.progress = {}
        self.lines = collections.deque()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def take(self):
        while self.lines:
            msg = self.lines.popleft()
            if "ready" in msg:
                self.ready = msg
            elif "progress" in msg:
                self.progress = msg
            elif "result" in msg:
                self.result = msg["result"]

    def tell(self, what):
        try:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def log_tail(self, n=15):
        self.log.flush()
        self.log.seek(0)
        return self.log.read().splitlines()[-n:]

    def stop(self):
        """Ends the process: told to exit once it has reported (it closes
        its client), SIGTERM at once if it has not (a run cut short), then
        SIGKILL. Ours, by pid."""
        self.tell("exit")
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        steps = ((None, 10),) if self.result is not None else ()
        for sig, wait in steps + ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if sig is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


# ---- the whole run -----------------------------------------------------------------------

def run(tasks=1_000_000, clients=3, push_bytes=2 * GiB, kill_every=5.0, seconds=None, n_engines=None,
        profile=None, deadline=120.0, json_path=None, out=sys.stdout):
    """Runs the soak; returns its summary (a dict, also printed as
    ``soak summary ...``). profile=None starts a cluster (n_engines,
    default one per core and at least 2, with --restart-engines) and stops
    it at the end, whatever happens; a profile soaks that running cluster
    (whose engines are killed too) and leaves it running. Raises
    ClusterError if the cluster does not start or cannot be reached."""
    from .client import Client
    from .cluster import _profile_processes, _stop_profile
    if tasks < 1 or clients < 1:
        raise ValueError("tasks and clients must be at least 1")
    own = profile is None
    if own:
        n_engines = n_engines or max(2, os.cpu_count() or 1)
        profile = f"soak-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rc = None
    children = []
    logdir = tempfile.TemporaryDirectory(prefix="shoal-soak-")
    summary = None
    try:
        if own:
            _start_cluster(profile, n_engines, out)
        try:
            rc = Client(profile=profile, timeout=10, lanes=False)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the cluster of profile '{profile}': {e}") from None
        rc[rc.ids].apply_sync(abs, -1)
        procs = _processes(rc, profile)
        print(f"# cluster '{profile}' ({'started for this run' if own else 'already running'}): controller pid "
              f"{procs['controller'][0]}, agent pids {procs['agent']}, engine pids {procs['engine']}",
              file=out, flush=True)
        start_at = time.time()
        stop_at = start_at + seconds if seconds else None
        for i in range(clients):
            share = tasks // clients + (1 if i < tasks % clients else 0)
            spec = {"index": i, "role": ROLES[i % len(ROLES)], "profile": profile, "tasks": share,
                    "push_bytes": push_bytes // clients, "deadline": deadline, "seed": i + 1,
                    "stop_at": stop_at}
            children.append(_Child(spec, logdir.name))
        t_ready = time.monotonic() + 60
        while not all(c.ready for c in children):
            for c in children:
                c.take()
                if c.proc.poll() is not None and not c.ready:
                    raise RuntimeError(f"client {c.spec['index']} ({c.spec['role']}) exited with status "
                                       f"{c.proc.returncode} before it was ready:\n  " + "\n  ".join(c.log_tail()))
            if time.monotonic() > t_ready:
                raise RuntimeError("the clients were not ready within 60 s")
            time.sleep(0.05)
        print(f"# clients: " + ", ".join(f"{c.spec['role']} pid {c.pid} ({c.spec['tasks']} tasks, "
                                         f"{c.ready['lanes']} lanes)" for c in children), file=out, flush=True)
        procs["client"] = [c.pid for c in children]
        mem_start = _sample(procs)
        arena_start = rc.arena.stats() if rc.arena is not None else None
        print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {tasks} tasks, {push_bytes / GiB:.2f} GiB "
              f"of pushes, {clients} clients, {len(procs['engine'])} engines on {os.cpu_count()} cores, "
              f"an engine killed every {kill_every} s" if kill_every else "no engine killed", file=out, flush=True)
        t0 = time.monotonic()
        for c in children:
            c.tell("go")
        killed, next_kill, next_report = [], t0 + (kill_every or 0) / 2, t0 + 10
        first = set(procs["engine"])
        rng = random.Random(0)
        while not all(c.result for c in children):
            time.sleep(0.05)
            for c in children:
                c.take()
                if c.proc.poll() is not None and not c.result:
                    c.take()
                    if not c.result:
                        raise RuntimeError(f"client {c.spec['index']} ({c.spec['role']}) exited with status "
                                           f"{c.proc.returncode} before it finished:\n  " + "\n  ".join(c.log_tail()))
            now = time.monotonic()
            if kill_every and now >= next_kill and not all(c.result for c in children):
                next_kill = now + kill_every
                # Only engines older than the agent's window for deaths "right
                # after starting" (5 s; five in a row and it gives the engine
                # up, node_agent/agent.c): the soak is of failures, not of that guard.
                # The engines of the start may go at any time.
                pids = [p for p in _processes(rc, profile)["engine"]
                        if (p in first and _engine_age(p) is not None) or (_engine_age(p) or 0) > MIN_AGE]
                if pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        killed.append(victim)
                    except ProcessLookupError:
                        pass
            if now >= next_report:
                next_report = now + 10
                sub = sum(c.result["submitted"] if c.result else c.progress.get("progress", 0) for c in children)
                ans = sum(c.result["answered"] if c.result else c.progress.get("answered", 0) for c in children)
                print(f"# {now - t0:.0f} s: submitted {sub}, answered {ans}, engines killed {len(killed)}",
                      file=out, flush=True)
        elapsed = time.monotonic() - t0
        # The end: replacements of the last engines killed have started; every client still runs.
        time.sleep(min(2.0, kill_every or 0))
        procs_end = _processes(rc, profile)
        procs_end["client"] = [c.pid for c in children]
        mem_end = _sample(procs_end)
        arena_end = rc.arena.stats() if rc.arena is not None else None
        status = rc.cluster_status()
        for c in children:
            c.stop()
        results = [c.result for c in children]
        for r in results:
            failed = " ".join(f"failed_{k}={v}" for k, v in sorted(r["failed"].items()))
            print(kv("soak", {"client": r["index"], "role": r["role"], "submitted": r["submitted"],
                              "answered": r["answered"], "failed": sum(r["failed"].values()), "wrong": r["wrong"],
                              "lost": r["lost"], "seconds": r["seconds"],
                              "tasks_per_s": r["submitted"] / max(r["seconds"], 1e-9),
                              "push_bytes": r["push_bytes"], "pushes": r["pushes"], "pulls": r["pulls"]})
                  + (" " + failed if failed else ""), file=out)
            for what, texts in sorted(r["samples"].items()):
                for text in texts:
                    print(f"#   client {r['index']} {what}: {text}", file=out)
        failed = collections.Counter()
        for r in results:
            failed.update(r["failed"])
        rows = memory_rows(mem_start, mem_end)
        for row in rows:
            print(kv("soak memory", row), file=out)
        summary = {"submitted": sum(r["submitted"] for r in results), "answered": sum(r["answered"] for r in results),
                   "failed": sum(failed.values()), "wrong": sum(r["wrong"] for r in results),
                   "lost": sum(r["lost"] for r in results), "seconds": elapsed,
                   "tasks_per_s": sum(r["submitted"] for r in results) / elapsed,
                   "push_bytes": sum(r["push_bytes"] for r in results), "clients": clients,
                   "engines": len(procs["engine"]), "engines_killed": len(killed),
                   "engines_end": len(procs_end["engine"]), "tasks_pending_end": status["tasks_pending"]}
        unexpected = {k: v for k, v in failed.items() if k not in EXPECTED}
        summary["unexpected_failures"] = sum(unexpected.values())
        line = kv("soak summary", summary) + "".join(f" failed_{k}={v}" for k, v in sorted(failed.items()))
        if arena_start and arena_end:
            summary["arena_used_mib_start"] = _mib(arena_start["used_bytes"])
            summary["arena_used_mib_end"] = _mib(arena_end["used_bytes"])
            summary["arena_blocks_start"], summary["arena_blocks_end"] = (arena_start["used_blocks"],
                                                                          arena_end["used_blocks"])
            line += (f" arena_used_mib_start={summary['arena_used_mib_start']} arena_used_mib_end="
                     f"{summary['arena_used_mib_end']} arena_blocks_start={summary['arena_blocks_start']} "
                     f"arena_blocks_end={summary['arena_blocks_end']}")
        summary["failed_by_reason"] = dict(failed)
        summary["ok"] = summary["lost"] == 0 and summary["wrong"] == 0 and not unexpected and \
            summary["answered"] + summary["failed"] + summary["wrong"] + summary["lost"] == summary["submitted"]
        line += f" ok={int(summary['ok'])}"
        if not summary["ok"]:
            _log_tail(profile, out)
        print(line, file=out, flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"summary": summary, "clients": results, "memory": rows,
                           "memory_start": {k: {str(p): m for p, m in v.items()} for k, v in mem_start.items()},
                           "memory_end": {k: {str(p): m for p, m in v.items()} for k, v in mem_end.items()}},
                          f, indent=1)
            print(f"# written to {json_path}", file=out)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            for c in children:
                c.stop()
            if rc is not None:
                rc.close()
            if own:
                left = _stop_profile(profile)
                left += _profile_processes(profile)
                print(f"# cluster '{profile}' stopped" if not left else
                      f"# warning: processes {sorted(set(left))} of cluster '{profile}' could not be stopped",
                      file=out, flush=True)
            logdir.cleanup()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
    return summary


def _log_tail(profile, out, n=30):
    """The last lines of the cluster's log (the agent's and the controller's words), before it goes."""
    from .client import _profile_dir
    try:
        with open(os.path.join(_profile_dir(profile), "cluster.log"), errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return
    for line in lines:
        print(f"#   log: {line}", file=out)


def _main_thread():
    return threading.current_thread() is threading.main_thread()
