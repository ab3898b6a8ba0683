"""What a shoal client keeps per finished task: bytes per task, by case.

Cases, each by lanes (Client()) and through the controller (Client(lanes=False)):
  lb-drop     a load-balanced apply_async loop whose AsyncResults the user drops
  lb-keep     the same loop, keeping every AsyncResult (then getting each)
  dv-drop     a DirectView apply_async loop (engines in turn), results dropped
  dv-keep     the same, keeping every AsyncResult
  map1        LoadBalancedView.map(f, range(N), chunksize=1), the result held
  map1-after  the same map once its result is let go
  dvmap       DirectView.map(f, range(N)) (one task per engine), the result held

Each case runs in a fresh interpreter (python bench/client_memory.py --case
...), twice: once under tracemalloc (the Python heap: what the client's
records hold, deterministic), once without (the process's RSS, which also
counts the C extension and what the allocator keeps). A warm-up of the same
case first, so that one-off costs (imports, pools, caches) are not counted;
then N tasks; then the bytes that stayed, ÷ N. Prints one key=value line per
case; --json appends them to a file.

    python bench/client_memory.py [-n 100000] [--engines 2] [--cases lb-drop,map1]

The cluster is started for the run (shoal.Cluster) in a SHOAL_DIR of its
own, unless --url-file names a running one.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = ("lb-drop", "lb-keep", "dv-drop", "dv-keep", "map1", "map1-after", "dvmap")
WARMUP = 2000


def inc(x):
    return x + 1


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case, n, url_file, lanes, trace):
    """Runs one case in this process; returns its key=value record."""
    import shoal
    if trace:
        import tracemalloc
        tracemalloc.start()
    rc = shoal.Client(url_file=url_file, lanes=lanes)
    ids = rc.ids
    lv = rc.load_balanced_view()
    dvs = [rc[e] for e in ids]

    def one_round(count):
        held = None
        if case in ("lb-drop", "lb-keep", "dv-drop", "dv-keep"):
            keep = case.endswith("keep")
            ars = [] if keep else None
            for i in range(count):
                ar = lv.apply_async(inc, i) if case.startswith("lb") else dvs[i % len(dvs)].apply_async(inc, i)
                if keep:
                    ars.append(ar)
            rc.wait()
            if keep:
                assert sum(ar.get() for ar in ars) == sum(range(1, count + 1))
            held = ars
        elif case in ("map1", "map1-after"):
            ar = lv.map(inc, range(count), chunksize=1, block=False)
            assert sum(ar.get()) == sum(range(1, count + 1))
            held = ar if case == "map1" else None
            del ar
        elif case == "dvmap":
            ar = rc[:].map(inc, range(count), block=False)
            assert sum(ar.get()) == sum(range(1, count + 1))
            held = ar
        return held

    def now():
        gc.collect()
        if trace:
            import tracemalloc
            return tracemalloc.get_traced_memory()[0]
        return rss()

    warm = one_round(WARMUP)
    del warm
    before = now()
    t0 = time.perf_counter()
    held = one_round(n)
    took = time.perf_counter() - t0
    after = now()
    rec = dict(case=case, path="lanes" if lanes else "controller", measure="tracemalloc" if trace else "rss",
               tasks=n, bytes_per_task=round((after - before) / n, 1), seconds=round(took, 2),
               tasks_per_s=round(n / took), history=len(rc.history))
    del held
    rc.close()
    return rec


def show(rec):
    print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100_000, help="tasks per case (default 100000)")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--paths", default="lanes,controller")
    ap.add_argument("--measures", default="tracemalloc,rss")
    ap.add_argument("--url-file", help="a running cluster's connection file (default: start one)")
    ap.add_argument("--json", help="append each record to this file, one JSON object a line")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child: run this one case
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        rec = run_case(a.case, a.n, a.url_file, a.path == "lanes", a.measure == "tracemalloc")
        print(json.dumps(rec), flush=True)
        return
    cluster = None
    url_file = a.url_file
    if url_file is None:
        os.environ["SHOAL_DIR"] = tempfile.mkdtemp(prefix="shoal-bench-mem-")
        import shoal
        cluster = shoal.Cluster(n=a.engines)
        cluster.start_cluster_sync()
        url_file = os.path.join(os.environ["SHOAL_DIR"], f"profile_{cluster.profile}", "connection.json")
    print(f"# {os.uname().release}, {os.cpu_count()} cores, {a.engines} engines, {a.n} tasks per case, "
          f"python {sys.version.split()[0]}", flush=True)
    try:
        for case in a.cases.split(","):
            for path in a.paths.split(","):
                for measure in a.measures.split(","):
                    out = subprocess.run([sys.executable, __file__, "--case", case, "--path", path, "--measure",
                                          measure, "-n", str(a.n), "--url-file", url_file],
                                         capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"case={case} path={path} measure={measure} failed: {out.stderr.strip()[-2000:]}",
                              flush=True)
                        continue
                    rec = json.loads(out.stdout.strip().splitlines()[-1])
                    show(rec)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(rec) + "\n")
    finally:
        if cluster is not None:
            cluster.stop_cluster_sync()


if __name__ == "__main__":
    main()
