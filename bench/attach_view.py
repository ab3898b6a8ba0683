"""Attaching to the arena and viewing an array from another process.

For each size, the parent fills an array in the arena; fresh child processes
then attach to the arena from the inherited fd and build a numpy view of the
array, timing each step. The claim under test: the cost does not depend on
the array's size (no copy, no per-page work). Prints one line per size:

    bench=arena case=attach_view size_bytes=... attach_us=... view_us=... total_us=...
"""

import argparse
import json
import statistics
import subprocess
import sys

import shoal

CHILD = r"""
import json, sys, time
import numpy as np, shoal
t0 = time.perf_counter()
a = shoal.Arena.attach(int(sys.argv[1]))
t1 = time.perf_counter()
x = a.view(tuple(int(v) for v in sys.argv[2].split(',')), bytes.fromhex(sys.argv[3]))
t2 = time.perf_counter()
assert x[-1] == 7.0
print(json.dumps(dict(attach=t1 - t0, view=t2 - t1)))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sizes-mib", default="1,1024")
    args = p.parse_args()
    arena = shoal.Arena()
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        x = arena.empty((mib << 20) // 8)
        x[:] = 7.0
        h, d = arena.describe(x)
        runs = []
        for _ in range(args.reps):
            out = subprocess.run([sys.executable, "-c", CHILD, str(arena.fd), ",".join(map(str, h)), d.hex()],
                                 pass_fds=(arena.fd,), capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
        att = statistics.median(r["attach"] for r in runs) * 1e6
        view = statistics.median(r["view"] for r in runs) * 1e6
        tot = statistics.median(r["attach"] + r["view"] for r in runs) * 1e6
        worst = max(r["attach"] + r["view"] for r in runs) * 1e6
        print(f"bench=arena case=attach_view size_bytes={x.nbytes} reps={args.reps} attach_us={att:.1f} "
              f"view_us={view:.1f} total_us={tot:.1f} max_total_us={worst:.1f}", flush=True)
        del x
    arena.close()


if __name__ == "__main__":
    main()
