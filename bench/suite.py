"""shoal against its peers on the same work, in one run: ipyparallel, Ray,
Dask distributed, joblib (loky) and multiprocessing.Pool.

Each system gets the same number of workers, started (and warmed up) before
any timing. Each figure is the median of --reps runs, with min and max.
Workloads (issue 5):
  first      a new client's first calls: round trips of a no-op task on one
             worker, 5000 of them right after the system started (before any
             other workload): p50 of calls 1-200 beside p50 of calls 1000-5000
  rtt        round trip of a no-op task on one worker: p50 and p99 over 1000 calls,
             after a second of them
  tiny-map   tiny tasks through the system's load-balanced map, one result per
             item: tasks/s (count scaled down for slow systems, see below;
             as many runs as fill ~3 s, at least --reps, at most 51)
  tiny-async the same tasks submitted one by one, then all results gathered
  broadcast  one array of each --sizes-mib to every worker (on 8 workers):
             seconds until every worker holds it, in one round: a call on
             each worker that keeps it and answers (Ray: an actor per
             worker; joblib and multiprocessing, which have no such thing:
             a task per worker given it), and the node's peak memory
             growth meanwhile
  resident   an array that already lives in the shared store (shoal: made by
             an engine, so in the arena; Ray: put once) to every worker:
             seconds, for each --sizes-mib (systems without a store: skipped)
  scatter-gather  a 1 GiB array split across the workers and joined back
  uneven     the seed's example: 100 tasks sleeping fixed random times
             (0-1 s, scaled by --uneven-scale), one task each: the makespan
             against the ideal max(sum / workers, longest)
  reduce     the sum of one array split across all the workers: time to the
             answer, splitting included
Memory on these virtual machines: a page of guest memory that the host
does not back yet costs ~2.3 s per GiB to touch, one it backs ~0.05 s, and
memory freed for more than a few seconds goes back to the host
(virtio-balloon free page reporting: 3 GiB freed for 10 s took 2.2 s to
touch again, for 30 s 7.2 s). So a run that allocates fresh memory is slow
or fast by luck; touching the node's memory once beforehand does not last.
One "key=value" line per (system, workload, size); a JSON file of them;
bench/plots.py draws the PNGs. Run through bench/run_suite.sh, which makes
the benchmark's own venv.

Tiny tasks: a system that would take over --tiny-budget seconds for
--tiny-tasks tasks is measured on as many as it does in that time (from a
probe of 500), and the line says how many. A workload that does not fit in
the node's memory (a system that copies an array to each worker) is
skipped, and the line says why.
"""

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

MiB = 1 << 20
GiB = 1 << 30


# ---- what runs on the workers ---------------------------------------------------

def noop():
    return None


def tiny(x):
    return x + 1


def nap(d):
    import time
    time.sleep(d)
    return d


def part_sum(a):
    return float(a.sum())


def last_of(a):
    return float(a[-1]) + len(a)


def identity(a):
    return a


def make_ones(n):
    import numpy
    return numpy.ones(n)


def hold(a):
    """Keeps a in the worker's namespace as bench_a (shoal and ipyparallel
    send it decorated with their `interactive`, so that its globals are the
    engine's) and answers with what last_of does: one round, as Ray's
    Holder.hold."""
    global bench_a
    bench_a = a
    return float(a[-1]) + len(a)


# ---- the node ---------------------------------------------------------------------

def meminfo():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info


def node_used():
    m = meminfo()
    return m["MemTotal"] - m["MemAvailable"]


class PeakUse:
    """The node's peak used memory while the block runs (sampled every 2 ms):
    a system that copies an array to each worker and frees it at the end of
    the task is caught in the act."""

    def __enter__(self):
        import threading
        self.peak, self.done = node_used(), False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done:
            self.peak = max(self.peak, node_used())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, node_used())


def show(r):
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


def summary(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), reps=len(xs))


# ---- the systems ------------------------------------------------------------------

class IppLike:
    """shoal and ipyparallel: the same API."""

    copies = False  # ipyparallel sends each engine a copy
    shared_copies = 1  # copies of an array on the node besides the caller's, when not one per worker

    def lview(self):
        return self.rc.load_balanced_view()

    def rtt(self):
        self.rc[self.rc.ids[0]].apply_sync(noop)

    def tiny_map(self, n):
        return self.lview().map_sync(tiny, range(n))

    def tiny_async(self, n):
        lv = self.lview()
        ars = [lv.apply_async(tiny, i) for i in range(n)]
        return [ar.get() for ar in ars]

    def broadcast(self, a):
        # One round, as Ray's: the array goes with the call that keeps it.
        return self.rc[:].apply_sync(self.mod.interactive(hold), a)

    def release(self):
        self.rc[:].execute("bench_a = None; bench_x = None", block=True)

    def resident(self, size):
        """An array made by an engine (for shoal: a view of its arena block)."""
        return self.rc[self.rc.ids[0]].apply_sync(make_ones, size // 8)

    def scatter_gather(self, a):
        dv = self.rc[:]
        dv.scatter("bench_x", a, block=True)
        return dv.gather("bench_x", block=True)

    def uneven(self, durations):
        return self.lview().map_sync(nap, durations)

    def reduce(self, a):
        dv = self.rc[:]
        dv.scatter("bench_x", a, block=True)
        return sum(dv.apply_sync(part_sum, self.mod.Reference("bench_x")))


class Shoal(IppLike):
    name = "shoal"

    def start(self, n):
        import shoal
        from shoal.cli import main as shoal_cli
        self.mod = shoal
        self.profile = f"suite{os.getpid()}"
        assert shoal_cli(["start", "-n", str(n), "--daemonize", "--profile", self.profile]) == 0
        self.rc = shoal.Client(profile=self.profile)
        self.rc.wait_for_engines(n, timeout=60)

    def stop(self):
        import shutil
        from shoal.cli import main as shoal_cli
        from shoal.client import _profile_dir
        self.rc.close()
        shoal_cli(["stop", "--profile", self.profile])
        shutil.rmtree(_profile_dir(self.profile), ignore_errors=True)


class Ipyparallel(IppLike):
    name = "ipyparallel"
    copies = True

    def start(self, n):
        import ipyparallel as ipp
        self.mod = ipp
        self.cluster = ipp.Cluster(n=n, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=120)

    def stop(self):
        self.rc.close()
        self.cluster.stop_cluster_sync()


class Ray:
    name = "ray"
    copies = False  # its object store: workers read zero-copy views
    shared_copies = 1

    def start(self, n):
        import ray
        self.ray, self.n = ray, n
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.f = {name: ray.remote(fn) for name, fn in
                  (("noop", noop), ("tiny", tiny), ("nap", nap), ("part_sum", part_sum), ("identity", identity))}

        @ray.remote(num_cpus=0)
        class Holder:  # one per worker process, for "every worker holds it"
            def hold(self, a):
                self.a = a
                return last_of(a)

            def drop(self):
                self.a = None

        self.holders = [Holder.remote() for _ in range(n)]
        ray.get([h.drop.remote() for h in self.holders])
        ray.get([self.f["noop"].remote() for _ in range(4 * n)])
        from ray.util.multiprocessing import Pool
        # Ray's map. Its actors take no CPU of the scheduler's, so that they
        # leave the tasks of the other workloads room to run.
        self.pool = Pool(n, ray_remote_args={"num_cpus": 0})
        self.pool.map(noop_x, range(4 * n))

    def stop(self):
        self.pool.terminate()
        self.ray.shutdown()

    def rtt(self):
        self.ray.get(self.f["noop"].remote())

    def tiny_map(self, n):
        return self.pool.map(tiny, range(n))  # Ray's map: ray.util.multiprocessing.Pool

    def tiny_async(self, n):
        t = self.f["tiny"]
        return self.ray.get([t.remote(i) for i in range(n)])

    def broadcast(self, a):
        if not isinstance(a, self.ray.ObjectRef):
            a = self.ray.put(a)  # once into the store; each worker views it
        return self.ray.get([h.hold.remote(a) for h in self.holders])

    def resident(self, size):
        return self.ray.put(np.ones(size // 8))

    def release(self):
        self.ray.get([h.drop.remote() for h in self.holders])

    def scatter_gather(self, a):
        refs = [self.ray.put(p) for p in np.array_split(a, self.n)]
        return np.concatenate(self.ray.get([self.f["identity"].remote(r) for r in refs]))

    def uneven(self, durations):
        return self.ray.get([self.f["nap"].remote(d) for d in durations])

    def reduce(self, a):
        refs = [self.ray.put(p) for p in np.array_split(a, self.n)]
        return sum(self.ray.get([self.f["part_sum"].remote(r) for r in refs]))


class Dask:
    name = "dask"
    copies = True  # each worker gets its own copy, over TCP

    def start(self, n):
        from dask.distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(n)
        self.workers = list(self.client.scheduler_info()["workers"])
        self.held = None

    def stop(self):
        self.client.close()
        self.cluster.close()

    def rtt(self):
        self.client.submit(noop, pure=False).result()

    def tiny_map(self, n):
        return self.client.gather(self.client.map(tiny, range(n), pure=False))

    def tiny_async(self, n):
        futs = [self.client.submit(tiny, i, pure=False) for i in range(n)]
        return self.client.gather(futs)

    def broadcast(self, a):
        fut = self.client.scatter(a, broadcast=True, hash=False)
        self.held = fut
        return self.client.gather([self.client.submit(last_of, fut, workers=[w], pure=False)
                                   for w in self.workers])

    def release(self):
        self.held = None

    def scatter_gather(self, a):
        futs = self.client.scatter(np.array_split(a, len(self.workers)), hash=False)
        return np.concatenate(self.client.gather(futs))

    def uneven(self, durations):
        return self.client.gather(self.client.map(nap, durations, pure=False))

    def reduce(self, a):
        futs = self.client.scatter(np.array_split(a, len(self.workers)), hash=False)
        return sum(self.client.gather(self.client.map(part_sum, futs, pure=False)))


class Joblib:
    name = "joblib"
    copies = False  # arrays over 1 MB go to the workers as memmaps of one file in /dev/shm
    # That file, and what pickling it holds meanwhile: a 4 GiB reduce was killed for
    # want of memory twice here (23.5 GiB), so it counts as four.
    shared_copies = 4

    def start(self, n):
        from joblib import Parallel, delayed
        self.delayed, self.n = delayed, n
        self.p = Parallel(n_jobs=n, backend="loky")
        self.p.__enter__()  # one pool of workers for every call
        self.p(delayed(noop)() for _ in range(4 * n))

    def stop(self):
        self.p.__exit__(None, None, None)

    def rtt(self):
        self.p([self.delayed(noop)()])

    def tiny_map(self, n):
        return self.p(self.delayed(tiny)(i) for i in range(n))

    tiny_async = None  # joblib has no one-by-one submission

    def broadcast(self, a):
        # joblib has no "every worker": one task per worker, each given the array.
        return self.p(self.delayed(last_of)(a) for _ in range(self.n))

    def release(self):
        pass

    def scatter_gather(self, a):
        return np.concatenate(self.p(self.delayed(identity)(p) for p in np.array_split(a, self.n)))

    def uneven(self, durations):
        return self.p(self.delayed(nap)(d) for d in durations)

    def reduce(self, a):
        return sum(self.p(self.delayed(part_sum)(p) for p in np.array_split(a, self.n)))


class Multiprocessing:
    name = "multiprocessing"
    copies = True  # arguments are pickled to each worker

    def start(self, n):
        import multiprocessing
        self.n = n
        self.pool = multiprocessing.get_context("fork").Pool(n)
        self.pool.map(noop_x, range(4 * n))

    def stop(self):
        self.pool.terminate()
        self.pool.join()

    def rtt(self):
        self.pool.apply(noop)

    def tiny_map(self, n):
        return self.pool.map(tiny, range(n))

    def tiny_async(self, n):
        rs = [self.pool.apply_async(tiny, (i,)) for i in range(n)]
        return [r.get() for r in rs]

    def broadcast(self, a):
        return self.pool.map(last_of, [a] * self.n, chunksize=1)

    def release(self):
        pass

    def scatter_gather(self, a):
        return np.concatenate(self.pool.map(identity, np.array_split(a, self.n), chunksize=1))

    def uneven(self, durations):
        return self.pool.map(nap, durations, chunksize=1)

    def reduce(self, a):
        return sum(self.pool.map(part_sum, np.array_split(a, self.n), chunksize=1))


def noop_x(_):
    return None


SYSTEMS = {s.name: s for s in (Shoal, Ipyparallel, Ray, Dask, Joblib, Multiprocessing)}


# ---- the workloads ------------------------------------------------------------------

def timed(fn, reps, check=None, before=None):
    took = []
    for _ in range(reps):
        if before:
            before()
        t = time.perf_counter()
        got = fn()
        took.append(time.perf_counter() - t)
        if check:
            check(got)
        del got  # the next run starts without this one's result held (a 1 GiB array, say)
    return took


RTT_CALLS = 1000


def w_rtt(sys_, args, out, workers):
    # Warmed up for a second first: right after a start, processes are
    # still settling (shoal's agent prefaults its arena in the background).
    t = time.perf_counter()
    while time.perf_counter() - t < 1.0:
        sys_.rtt()
    lat = sorted(timed(sys_.rtt, RTT_CALLS))
    out(workload="rtt", p50_us=statistics.median(lat) * 1e6, p99_us=lat[int(len(lat) * 0.99)] * 1e6,
        calls=RTT_CALLS)


FIRST_CALLS = 5000


def w_first(sys_, args, out, workers):
    # Right after start: a notebook's user makes few calls, and lives in these.
    lat = timed(sys_.rtt, FIRST_CALLS)
    out(workload="first", first200_p50_us=statistics.median(lat[:200]) * 1e6,
        later_p50_us=statistics.median(lat[1000:]) * 1e6, calls=FIRST_CALLS)


def w_tiny(sys_, args, out, workers):
    for mode, fn in (("tiny-map", sys_.tiny_map), ("tiny-async", sys_.tiny_async)):
        if fn is None:
            out(workload=mode, skipped="no such API")
            continue
        t = time.perf_counter()
        got = fn(500)
        probe = time.perf_counter() - t
        assert list(got) == [i + 1 for i in range(500)]
        n = args.tiny_tasks
        if probe / 500 * n > args.tiny_budget:
            n = max(500, int(500 * args.tiny_budget / probe))
        # A fast system's run of 100,000 lasts ~20 ms here, where one hiccup of
        # the machine halves it: as many runs as fill ~3 s (at least --reps, at
        # most 51) for the median.
        t = time.perf_counter()
        fn(n)
        reps = max(args.reps, min(51, int(3.0 / max(time.perf_counter() - t, 1e-3))))
        took = timed(lambda: fn(n), reps, check=lambda got: len(got) == n or sys.exit("lost results"))
        s = summary([n / x for x in took])
        out(workload=mode, tasks=n, tasks_per_s=s["median"], min=s["min"], max=s["max"], reps=s["reps"])


def w_broadcast(sys_, args, out, workers):
    for mib in args.sizes_mib:
        size = mib * MiB
        need = size * (1 + (workers + 1 if sys_.copies else sys_.shared_copies))
        avail = meminfo()["MemAvailable"]
        if need > 0.8 * avail:
            out(workload="broadcast", bytes=size, skipped=f"needs ~{need / GiB:.0f} GiB of {avail / GiB:.0f} "
                                                           f"available (a copy per worker)")
            continue
        a = np.ones(size // 8)
        took, grew = [], []
        reps = args.reps if size <= GiB or not sys_.copies else max(1, args.reps // 5)
        for _ in range(reps):
            sys_.release()
            time.sleep(0.5)
            used = node_used()
            with PeakUse() as peak:
                t = time.perf_counter()
                got = sys_.broadcast(a)
                took.append(time.perf_counter() - t)
            grew.append(peak.peak - used)
            assert list(got) == [1.0 + len(a)] * workers, got
        sys_.release()
        s = summary(took)
        out(workload="broadcast", bytes=size, seconds=s["median"], min=s["min"], max=s["max"], reps=s["reps"],
            mem_growth_mib=max(grew) / MiB)
        del a


def w_resident(sys_, args, out, workers):
    make = getattr(sys_, "resident", None)
    if make is None or sys_.name == "ipyparallel":
        out(workload="resident", skipped="no shared store")
        return
    for mib in args.sizes_mib:
        size = mib * MiB
        if 3 * size > 0.8 * meminfo()["MemAvailable"]:
            out(workload="resident", bytes=size, skipped="not enough memory")
            continue
        a = make(size)
        took = timed(lambda: sys_.broadcast(a), args.reps, before=sys_.release)
        sys_.release()
        s = summary(took)
        out(workload="resident", bytes=size, seconds=s["median"], min=s["min"], max=s["max"], reps=s["reps"])
        del a


def w_scatter_gather(sys_, args, out, workers):
    size = args.scatter_mib * MiB
    if size * (1 + (3 if sys_.copies else 1 + sys_.shared_copies)) > 0.8 * meminfo()["MemAvailable"]:
        out(workload="scatter-gather", bytes=size, skipped="not enough memory")
        return
    a = np.arange(size // 8, dtype=np.float64)

    def check(got):
        assert got.shape == a.shape and got[-1] == a[-1] and got[len(a) // 3] == a[len(a) // 3]
    took = timed(lambda: sys_.scatter_gather(a), args.reps, check=check, before=sys_.release)
    sys_.release()
    s = summary(took)
    out(workload="scatter-gather", bytes=size, seconds=s["median"], min=s["min"], max=s["max"], reps=s["reps"])


def w_uneven(sys_, args, out, workers):
    rnd = random.Random(2026)
    durations = [rnd.random() * args.uneven_scale for _ in range(100)]
    ideal = max(sum(durations) / workers, max(durations))
    free = [0.0] * workers
    for d in durations:
        free.sort()
        free[0] += d
    took = timed(lambda: sys_.uneven(durations), args.reps,
                 check=lambda got: list(got) == durations or sys.exit("uneven: wrong results"))
    s = summary(took)
    out(workload="uneven", tasks=100, seconds=s["median"], min=s["min"], max=s["max"], reps=s["reps"],
        ideal=ideal, greedy=max(free), over_ideal_pct=(s["median"] / ideal - 1) * 100)


def w_reduce(sys_, args, out, workers):
    size = args.reduce_mib * MiB
    if size * (1 + (2 if sys_.copies else sys_.shared_copies)) > 0.8 * meminfo()["MemAvailable"]:
        out(workload="reduce", bytes=size, skipped="not enough memory")
        return
    a = np.ones(size // 8)
    want = float(len(a))
    took = timed(lambda: sys_.reduce(a), args.reps, before=sys_.release,
                 check=lambda got: math.isclose(got, want) or sys.exit(f"reduce: {got} != {want}"))
    sys_.release()
    s = summary(took)
    out(workload="reduce", bytes=size, seconds=s["median"], min=s["min"], max=s["max"], reps=s["reps"])


# Which workloads run with how many workers (a cluster start each).
PHASES = [("workers", [w_first, w_rtt, w_tiny, w_scatter_gather, w_uneven, w_reduce]),
          ("broadcast_workers", [w_broadcast, w_resident])]
NAMES = {"first": w_first, "rtt": w_rtt, "tiny": w_tiny, "broadcast": w_broadcast, "resident": w_resident,
         "scatter-gather": w_scatter_gather,
         "uneven": w_uneven, "reduce": w_reduce}


def run_system(name, args, results):
    for attr, workloads in PHASES:
        workloads = [w for w in workloads if w in args.workloads]
        if not workloads:
            continue
        workers = getattr(args, attr)
        sys_ = SYSTEMS[name]()

        def out(**r):
            r = dict(system=name, workers=workers, **r)
            results.append(r)
            show(r)
        try:
            sys_.start(workers)
        except Exception as e:  # a peer that cannot start here: say so, go on with the others
            out(workload="start", skipped=f"{type(e).__name__}: {e}")
            continue
        try:
            for w in workloads:
                try:
                    w(sys_, args, out, workers)
                except Exception as e:
                    out(workload=w.__name__[2:].replace("_", "-"), failed=f"{type(e).__name__}: {e}")
        finally:
            sys_.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default=",".join(NAMES))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--broadcast-workers", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sizes-mib", default="1,64,1024,4096")
    p.add_argument("--scatter-mib", type=int, default=1024)
    p.add_argument("--reduce-mib", type=int, default=4096)
    p.add_argument("--tiny-tasks", type=int, default=100_000)
    p.add_argument("--tiny-budget", type=float, default=20.0, help="seconds one tiny-task run may take")
    p.add_argument("--uneven-scale", type=float, default=1.0, help="longest sleep of the uneven example")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.sizes_mib = [int(s) for s in args.sizes_mib.split(",")]
    args.workloads = [NAMES[w] for w in args.workloads.split(",")]
    os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="shoal-suite-ipython-"))
    results = []
    print(f"# {os.uname().release}, {os.cpu_count()} cores, {meminfo()['MemTotal'] / GiB:.1f} GiB; "
          f"workers={args.workers} broadcast_workers={args.broadcast_workers} reps={args.reps}", flush=True)
    # SIGTERM ends the run as Ctrl-C does: through each system's stop().
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for name in args.systems.split(","):
        run_system(name, args, results)
        if args.json:  # after each system: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
