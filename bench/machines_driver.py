"""The client's side of bench/machines_bench.py: runs inside host 0 of the
namespaced topology, connects to the cluster (shoal or ipyparallel), and
runs the cases the orchestrator asks for, one at a time, so that it can
read each host's link counters between them.

Protocol on stdin/stdout, one JSON object per line: the driver says
{"ready": ...} once connected; then for each line {"case": name, ...} it
runs the case and answers {"case": name, "seconds": s, ...} (or
{"error": text}); an empty line ends it.

    python machines_driver.py shoal|ipyparallel|ray CONNECTION_FILE ENGINES

(ray: CONNECTION_FILE is "auto", the cluster that `ray start` made on
this host.)
"""

import json
import statistics
import sys
import time

import numpy as np

MiB = 1 << 20


def noop():
    return None


def answer(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def hostname():
    import socket
    return socket.gethostname()


def main():
    system, conn, engines = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if system == "ray":
        return ray_main(engines)
    if system == "shoal":
        import shoal as ipp
        rc = ipp.Client(url_file=conn, timeout=60)
    else:
        import ipyparallel as ipp
        rc = ipp.Client(conn, timeout=60)  # its url_file= is ignored (9.2: positional only)
    rc.wait_for_engines(engines, timeout=120)
    ids = sorted(rc.ids)[:engines]
    dv = rc[ids]
    where = dict(zip(ids, dv.apply_sync(hostname)))
    here = hostname()
    remote = [e for e in ids if where[e] != here]
    dv.apply_sync(noop)
    answer({"ready": True, "where": {str(k): v for k, v in where.items()}, "remote": remote})
    serve(lambda req: run(req, rc, dv, ids, remote))
    rc.close()


def round_trips(call, n, engine):
    """The rtt case's answer: call() once to warm up, then n times, timed."""
    call()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return {"case": "rtt", "p50_us": statistics.median(lat) * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
            "engine": engine, "ok": True}


def map_result(got, n, took):
    """The lbmap case's answer: got is [(item, hostname)] for range(n)."""
    per_host = {}
    for _, h in got:
        per_host[h] = per_host.get(h, 0) + 1
    return {"case": "lbmap", "n": n, "seconds": took, "per_s": n / took, "per_host": per_host,
            "ok": [x for x, _ in got] == list(range(n))}


def serve(run_one):
    """Answers the orchestrator's cases, a line each, until an empty line."""
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        try:
            answer(run_one(req))
        except Exception as e:  # the orchestrator records it and goes on
            answer({"case": req["case"], "error": f"{type(e).__name__}: {e}"})


def run(req, rc, dv, ids, remote):
    case, size = req["case"], req.get("bytes", 0)
    if case == "push":
        a = np.ones(size // 8)
        t = time.perf_counter()
        dv.push({"bench_a": a}, block=True)
        took = time.perf_counter() - t
        ok = dv.apply_sync(lambda n: float(bench_a[-1]) + len(bench_a) == 1.0 + n, len(a))  # noqa: F821
        dv.execute("del bench_a", block=True)
        return {"case": case, "bytes": size, "seconds": took, "ok": all(ok)}
    if case == "pull":
        e = rc[remote[-1]]
        e.execute(f"import numpy\nbench_r = numpy.ones({size // 8})", block=True)
        t = time.perf_counter()
        got = e.pull("bench_r", block=True)
        took = time.perf_counter() - t
        ok = got.shape == (size // 8,) and float(got[-1]) == 1.0
        e.execute("del bench_r", block=True)
        return {"case": case, "bytes": size, "seconds": took, "ok": ok, "engine": remote[-1]}
    if case == "scatter_gather":
        a = np.arange(size // 8, dtype=np.float64)
        t = time.perf_counter()
        dv.scatter("bench_s", a, block=True)
        mid = time.perf_counter()
        back = dv.gather("bench_s", block=True)
        took = time.perf_counter() - t
        ok = bool(np.array_equal(back, a))
        dv.execute("del bench_s", block=True)
        return {"case": case, "bytes": size, "seconds": took, "scatter_s": mid - t, "gather_s": took - (mid - t),
                "ok": ok}
    if case == "rtt":
        e = rc[remote[0]]
        return round_trips(lambda: e.apply_sync(noop), req.get("n", 300), remote[0])
    if case == "lbmap":
        n = req.get("n", 2000)
        lv = rc.load_balanced_view(ids)
        t = time.perf_counter()
        got = lv.map_sync(lambda x: (x, __import__("socket").gethostname()), range(n))
        return map_result(got, n, time.perf_counter() - t)
    raise ValueError(f"unknown case {case}")



# ---- Ray: actors in place of engines ------------------------------------------------


def ray_main(engines):
    """The same cases with Ray: one actor per engine, spread over the nodes
    (engines // nodes on each, pinned by node affinity); a push is a
    ray.put and a call of every actor with its ref (each node fetches the
    object once into its store, and the actors read it there); a pull, a
    call whose value is the array."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    nodes = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeManagerAddress"])
    per = max(1, engines // len(nodes))

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self):
            self.ns = {}

        def hostname(self):
            return hostname()

        def noop(self):
            return None

        def store(self, name, value):
            self.ns[name] = value
            return True

        def make(self, name, n):
            self.ns[name] = np.ones(n)
            return True

        def get(self, name):
            return self.ns[name]

        def check(self, name, n):
            a = self.ns[name]
            return float(a[-1]) + len(a) == 1.0 + n

        def drop(self, name):
            self.ns.pop(name, None)

    actors = [Engine.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
              for n in nodes for _ in range(per)]
    where = ray.get([a.hostname.remote() for a in actors])
    here = hostname()
    remote = [i for i, h in enumerate(where) if h != here]
    answer({"ready": True, "where": {str(i): h for i, h in enumerate(where)}, "remote": remote})

    @ray.remote
    def tiny(x):
        return x, hostname()

    serve(lambda req: ray_run(ray, req, actors, remote, tiny))
    ray.shutdown()


def ray_run(ray, req, actors, remote, tiny):
    case, size = req["case"], req.get("bytes", 0)
    if case == "push":
        a = np.ones(size // 8)
        t = time.perf_counter()
        ref = ray.put(a)
        ray.get([x.store.remote("bench_a", ref) for x in actors])
        took = time.perf_counter() - t
        ok = ray.get([x.check.remote("bench_a", len(a)) for x in actors])
        ray.get([x.drop.remote("bench_a") for x in actors])
        del ref
        return {"case": case, "bytes": size, "seconds": took, "ok": all(ok)}
    if case == "pull":
        e = actors[remote[-1]]
        ray.get(e.make.remote("bench_r", size // 8))
        t = time.perf_counter()
        got = ray.get(e.get.remote("bench_r"))
        took = time.perf_counter() - t
        ok = got.shape == (size // 8,) and float(got[-1]) == 1.0
        ray.get(e.drop.remote("bench_r"))
        return {"case": case, "bytes": size, "seconds": took, "ok": ok, "engine": remote[-1]}
    if case == "scatter_gather":
        a = np.arange(size // 8, dtype=np.float64)
        parts = np.array_split(a, len(actors))
        t = time.perf_counter()
        ray.get([x.store.remote("bench_s", ray.put(p)) for x, p in zip(actors, parts)])
        mid = time.perf_counter()
        back = np.concatenate(ray.get([x.get.remote("bench_s") for x in actors]))
        took = time.perf_counter() - t
        ok = bool(np.array_equal(back, a))
        ray.get([x.drop.remote("bench_s") for x in actors])
        return {"case": case, "bytes": size, "seconds": took, "scatter_s": mid - t, "gather_s": took - (mid - t),
                "ok": ok}
    if case == "rtt":
        e = actors[remote[0]]
        return round_trips(lambda: ray.get(e.noop.remote()), req.get("n", 300), remote[0])
    if case == "lbmap":
        n = req.get("n", 2000)
        t = time.perf_counter()
        got = ray.get([tiny.remote(x) for x in range(n)])
        return map_result(got, n, time.perf_counter() - t)
    raise ValueError(f"unknown case {case}")


if __name__ == "__main__":
    main()
