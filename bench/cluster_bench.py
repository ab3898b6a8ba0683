"""shoal against ipyparallel, same machine, same engine count, one run.

Cases, for each system and engine count (2 and 8 by default):
  rtt    apply_sync round trip of a no-op on one engine: p50 and p99 over 300 calls
         (shoal: through its lane; "shoal-controller": a client with
         lanes=False, every task through the controller, for comparison)
  push   push of an 8 MiB, 256 MiB and 1 GiB float64 array to every engine
         (block=True): seconds (the median of 9, 3 and 1 pushes), and how much
         the node's memory grew while the engines held it (MemTotal -
         MemAvailable, before and after; the largest of the pushes)
  pull   pull of a 256 MiB float64 array from one engine: seconds, and how
         much the node's memory grew while the client held it
  uneven the seed's uneven-duration example through a load-balanced map: 100
         tasks sleeping random times (the same for every system, 0-0.5 s),
         one per task: the makespan against the ideal, max(sum / engines,
         longest task), and against "greedy", what a scheduler that hands
         each task in turn to the first idle engine would take at no cost
Prints one key=value line per case, then the ratios (ipyparallel / shoal).
Run through bench/run_cluster.sh, which makes the benchmark's own venv.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

MiB = 1 << 20
PULL = 256 * MiB
REPS = {8 * MiB: 9, 256 * MiB: 3}  # pushes per size (median); others once


def node_used():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def noop():
    return None


def nap(d):
    import time
    time.sleep(d)
    return d


UNEVEN = [__import__("random").Random(2026).random() * 0.5 for _ in range(100)]


def measure_uneven(name, lview, engines, out):
    lview.map_sync(nap, [0.0] * engines)
    t = time.perf_counter()
    got = lview.map_sync(nap, UNEVEN)
    took = time.perf_counter() - t
    assert list(got) == UNEVEN
    ideal = max(sum(UNEVEN) / engines, max(UNEVEN))
    free = [0.0] * engines  # when each engine is next idle, for the greedy schedule
    for d in UNEVEN:
        free.sort()
        free[0] += d
    r = dict(system=name, engines=engines, case="uneven", tasks=len(UNEVEN), seconds=took, ideal=ideal,
             greedy=max(free), over_ideal_pct=(took / ideal - 1) * 100)
    out.append(r)
    show(r)


def show(r):
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


def measure_rtt(name, dv0, engines, out):
    dv0.apply_sync(noop)
    lat = []
    for _ in range(300):
        t = time.perf_counter()
        dv0.apply_sync(noop)
        lat.append(time.perf_counter() - t)
    lat.sort()
    r = dict(system=name, engines=engines, case="rtt", p50_us=statistics.median(lat) * 1e6,
             p99_us=lat[int(len(lat) * 0.99)] * 1e6)
    out.append(r)
    show(r)


def measure(name, dv0, dv, lview, engines, sizes, out):
    measure_rtt(name, dv0, engines, out)
    dv.apply_sync(noop)  # every engine has answered once (shoal: every lane is open)
    for size in sizes:
        a = np.ones(size // 8)
        took, grew = [], []
        # The median of several pushes where that is cheap (one 1 GiB push
        # to 8 ipyparallel engines takes half a minute).
        for _ in range(REPS.get(size, 1)):
            time.sleep(0.5)
            before = node_used()
            t = time.perf_counter()
            dv.push({"bench_a": a}, block=True)
            took.append(time.perf_counter() - t)
            grew.append(node_used() - before)
            dv.execute("bench_check = float(bench_a[-1]) + len(bench_a)", block=True)
            check = dv.pull("bench_check", block=True)
            assert all(c == 1.0 + len(a) for c in check), check
            dv.execute("del bench_a", block=True)
        r = dict(system=name, engines=engines, case="push", bytes=size, reps=len(took),
                 seconds=statistics.median(took), mem_growth_mib=max(grew) / MiB)
        out.append(r)
        show(r)
        del a
    dv0.execute(f"import numpy\nbench_r = numpy.ones({PULL // 8})", block=True)
    time.sleep(0.5)
    before = node_used()
    t = time.perf_counter()
    got = dv0.pull("bench_r", block=True)
    took = time.perf_counter() - t
    grew = node_used() - before
    assert got.shape == (PULL // 8,) and float(got[-1]) == 1.0
    r = dict(system=name, engines=engines, case="pull", bytes=PULL, seconds=took, mem_growth_mib=grew / MiB)
    out.append(r)
    show(r)
    del got
    dv0.execute("del bench_r", block=True)
    measure_uneven(name, lview, engines, out)


def run_shoal(engines, sizes, out):
    import shoal
    from shoal.cli import main as shoal_cli
    profile = f"bench{os.getpid()}"
    assert shoal_cli(["start", "-n", str(engines), "--daemonize", "--profile", profile]) == 0
    try:
        with shoal.Client(profile=profile) as rc:
            measure("shoal", rc[rc.ids[0]], rc[:], rc.load_balanced_view(), engines, sizes, out)
        with shoal.Client(profile=profile, lanes=False) as rc:
            measure_rtt("shoal-controller", rc[rc.ids[0]], engines, out)
    finally:
        shoal_cli(["stop", "--profile", profile])
        import shutil
        from shoal.client import _profile_dir
        shutil.rmtree(_profile_dir(profile), ignore_errors=True)


def run_ipyparallel(engines, sizes, out):
    import ipyparallel as ipp
    cluster = ipp.Cluster(n=engines, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(engines, timeout=120)
        measure("ipyparallel", rc[rc.ids[0]], rc[:], rc.load_balanced_view(), engines, sizes, out)
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="2,8")
    p.add_argument("--sizes-mib", default="8,256,1024")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="shoal-bench-ipython-"))
    out = []
    for n in (int(x) for x in args.engines.split(",")):
        run_shoal(n, sizes, out)
        run_ipyparallel(n, sizes, out)
    print("# ratios (ipyparallel / shoal; higher is better for shoal)")
    for n in (int(x) for x in args.engines.split(",")):
        get = lambda sysname, case, **kw: [r for r in out if r["system"] == sysname and r["engines"] == n and  # noqa
                                           r["case"] == case and all(r.get(k) == v for k, v in kw.items())][0]
        s, i = get("shoal", "rtt"), get("ipyparallel", "rtt")
        c = get("shoal-controller", "rtt")
        print(f"ratio engines={n} case=rtt_p50 value={i['p50_us'] / s['p50_us']:.1f} "
              f"through_controller={i['p50_us'] / c['p50_us']:.1f}")
        s, i = get("shoal", "pull"), get("ipyparallel", "pull")
        print(f"ratio engines={n} case=pull bytes={PULL} time={i['seconds'] / s['seconds']:.1f} "
              f"mem_growth_mib shoal={s['mem_growth_mib']:.0f} ipyparallel={i['mem_growth_mib']:.0f}")
        s, i = get("shoal", "uneven"), get("ipyparallel", "uneven")
        print(f"uneven engines={n} ideal={s['ideal']:.3f} greedy={s['greedy']:.3f} shoal={s['seconds']:.3f} "
              f"(+{s['over_ideal_pct']:.1f}%) ipyparallel={i['seconds']:.3f} (+{i['over_ideal_pct']:.1f}%)")
        for size in sizes:
            s, i = get("shoal", "push", bytes=size), get("ipyparallel", "push", bytes=size)
            print(f"ratio engines={n} case=push bytes={size} time={i['seconds'] / s['seconds']:.1f} "
                  f"mem_growth_mib shoal={s['mem_growth_mib']:.0f} ipyparallel={i['mem_growth_mib']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
