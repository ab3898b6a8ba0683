"""Memmaps and .npy files into 8 engines: shoal beside its peers, in one run.

Part 1, a memmap of each size to every worker (each keeps it, as the
suite's broadcast): shoal (by reference: each engine maps the file), joblib
(its memmap path: workers reopen the file), Ray (ray.put of the memmap: one
copy into its object store) and ipyparallel (a push of the memmap: pickled
whole, a copy per engine). Time of the round, median of --reps, and the
node's peak memory above what it used before (page cache excluded: it is
memory the kernel gives back).

Part 2, a .npy file of --load-mib into every engine, cold (the page cache
dropped first; needs root) and warm: shoal's DirectView.load (io_uring into
the node's arena, then views), np.load + push (into the arena by shoal's
push), np.fromfile (one private read, no engines), fio's sequential read of
the same file (the device's limit, cold) and a memcpy of the same size (the
limit, warm).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import GiB, MiB, SYSTEMS, PeakUse, meminfo, node_used, show, summary  # noqa: E402


def make_file(path, nbytes):
    """A file of nbytes of float64 0, 1, 2, ... written in 256 MiB pieces."""
    n = nbytes // 8
    m = np.memmap(path, dtype="f8", mode="w+", shape=(n,))
    step = 32 * MiB
    for i in range(0, n, step):
        m[i:i + step] = np.arange(i, min(n, i + step), dtype="f8")
    m.flush()
    del m


def make_npy(path, nbytes):
    n = nbytes // 8
    m = np.lib.format.open_memmap(path, mode="w+", dtype="f8", shape=(n,))
    step = 32 * MiB
    for i in range(0, n, step):
        m[i:i + step] = np.arange(i, min(n, i + step), dtype="f8")
    m.flush()
    del m


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung("no answer in time (a process of the system's was likely OOM-killed)")


def warm(path):
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def part_memmaps(args, results, root):
    def out(**r):
        results.append(r)
        show(r)
    files = {}
    for size in args.sizes_mib:
        files[size] = os.path.join(root, f"mm-{size}.f8")
        make_file(files[size], size * MiB)
    for name in args.systems.split(","):
        sys_ = SYSTEMS[name]()
        try:
            sys_.start(args.workers)
        except Exception as e:
            out(part="memmap", system=name, skipped=f"{type(e).__name__}: {e}")
            continue
        try:
            for size in args.sizes_mib:
                # A copy per engine: past this machine's memory for the large ones.
                if getattr(sys_, "copies", False) and size * MiB * (args.workers + 1) > meminfo()["MemTotal"] * 0.8:
                    out(part="memmap", system=name, mib=size, skipped=f"a copy per engine: {args.workers} x {size} MiB "
                        f"is past this machine's {meminfo()['MemTotal'] / GiB:.0f} GiB")
                    continue
                warm(files[size])
                mm = np.memmap(files[size], dtype="f8", mode="r")
                want = float(mm[-1]) + len(mm)
                took, peaks = [], []
                copies = getattr(sys_, "copies", False)
                signal.signal(signal.SIGALRM, _alarm)
                try:
                    # A first round, not counted: what a system does once
                    # (imports, opening its store, finding the file). Not for
                    # a system that copies to each engine: its rounds take
                    # their memory already (ipyparallel's were OOM-killed
                    # with the extra round and 5 more).
                    if not copies:
                        signal.alarm(args.timeout)
                        sys_.broadcast(mm)
                        sys_.release()
                    for _ in range(min(args.reps, 3) if copies else args.reps):
                        before = node_used()
                        signal.alarm(args.timeout)
                        with PeakUse() as pu:
                            t = time.perf_counter()
                            got = sys_.broadcast(mm)
                            took.append(time.perf_counter() - t)
                        signal.alarm(0)
                        peaks.append((pu.peak - before) / MiB)
                        assert list(got) == [want] * args.workers, got
                        del got
                        sys_.release()
                except Exception as e:
                    signal.alarm(0)
                    out(part="memmap", system=name, mib=size, failed=f"{type(e).__name__}: {e}")
                    if isinstance(e, Hung):
                        break  # it cannot be stopped cleanly either: stop() below does what it can
                    continue
                s = summary(took)
                out(part="memmap", system=name, mib=size, workers=args.workers, seconds=s["median"],
                    seconds_min=s["min"], seconds_max=s["max"], reps=s["reps"],
                    node_peak_mib=sorted(peaks)[len(peaks) // 2])
                del mm
        finally:
            sys_.stop()
    for f in files.values():
        os.unlink(f)


def fio_read(path, nbytes):
    """fio's sequential read of path (O_DIRECT, io_uring, 4 MiB blocks, 8 in
    flight): GiB/s, or None without fio."""
    if shutil.which("fio") is None:
        return None
    r = subprocess.run(["fio", "--name=seq", f"--filename={path}", "--rw=read", "--bs=4M", "--iodepth=8",
                        "--ioengine=io_uring", "--direct=1", f"--size={nbytes}", "--readonly",
                        "--output-format=json"], capture_output=True, text=True, check=True)
    job = json.loads(r.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / GiB


def part_load(args, results, root):
    import shoal
    from shoal import _core

    def out(**r):
        results.append(r)
        show(r)
    nbytes = args.load_mib * MiB
    path = os.path.join(root, f"load-{args.load_mib}.npy")
    make_npy(path, nbytes)
    sys_ = SYSTEMS["shoal"]()
    sys_.start(args.workers)
    rc = sys_.rc
    dv = rc[:]
    last = float(nbytes // 8 - 1)
    check = "float(bench_x[-1])"

    def shoal_load():
        dv.load("bench_x", path, block=True)

    def np_load_push():
        a = np.load(path)
        dv.push({"bench_x": a}, block=True)

    def np_fromfile():
        return np.fromfile(path, dtype="f8", offset=128)

    def release():
        dv.execute("bench_x = None", block=True)

    cold = os.geteuid() == 0
    try:
        for state in ("cold", "warm") if cold else ("warm",):
            if state == "cold":
                drop_caches()
                bw = fio_read(path, nbytes)
                out(part="load", state=state, how="fio", mib=args.load_mib,
                    **({"gib_s": bw} if bw is not None else {"skipped": "fio is not installed (apt install fio)"}))
            else:
                # The limit: a copy of the same size between two arrays of the
                # node's arena that are already in memory.
                src = rc.arena.empty((nbytes,), dtype=np.uint8)
                dst = rc.arena.empty((nbytes,), dtype=np.uint8)
                src[:] = 1
                dst[:] = 0
                took = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    np.copyto(dst, src)
                    took.append(time.perf_counter() - t)
                del src, dst
                s = summary(took)
                out(part="load", state=state, how="memcpy", mib=args.load_mib, seconds=s["median"],
                    gib_s=nbytes / s["median"] / GiB)
            for how, fn, engines in (("shoal_load", shoal_load, True), ("np_load_push", np_load_push, True),
                                     ("np_fromfile", np_fromfile, False)):
                took = []
                # A first round: the arena has its memory, as after any earlier
                # use (fresh memory costs what the host takes to back it, not
                # what reading costs); cold then means the file's pages.
                warm(path)
                got = fn()
                del got
                if engines:
                    release()
                for _ in range(args.reps):
                    if state == "cold":
                        drop_caches()
                    else:
                        warm(path)
                    t = time.perf_counter()
                    got = fn()
                    took.append(time.perf_counter() - t)
                    if engines:
                        vals = [r for r in dv.apply_sync(lambda: float(bench_x[-1]))]  # noqa: F821
                        assert vals == [last] * args.workers, vals
                        release()
                    else:
                        assert float(got[-1]) == last
                    del got
                s = summary(took)
                out(part="load", state=state, how=how, mib=args.load_mib, workers=args.workers if engines else 0,
                    seconds=s["median"], gib_s=nbytes / s["median"] / GiB, reps=s["reps"])
    finally:
        sys_.stop()
        os.unlink(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="shoal,joblib,ray,ipyparallel")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes-mib", default="1024,4096")
    p.add_argument("--load-mib", type=int, default=4096)
    p.add_argument("--parts", default="memmap,load")
    p.add_argument("--dir", default="/var/tmp", help="where the files go (on the disk, not a tmpfs)")
    p.add_argument("--timeout", type=int, default=180, help="seconds one round may take")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.sizes_mib = [int(s) for s in args.sizes_mib.split(",")]
    os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="shoal-memmap-ipython-"))
    print(f"# {os.uname().release}, {os.cpu_count()} cores, {meminfo()['MemTotal'] / GiB:.1f} GiB; "
          f"workers={args.workers} reps={args.reps}", flush=True)
    root = tempfile.mkdtemp(prefix="shoal-memmap-bench-", dir=args.dir)
    results = []
    try:
        if "memmap" in args.parts:
            part_memmaps(args, results, root)
        if "load" in args.parts:
            part_load(args, results, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
