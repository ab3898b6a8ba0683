"""shoal's main job, as a demo: a cluster session on this machine.

    python -m shoal.demo [-n 2] [--size-mib 1024]      # the cluster session
    python -m shoal.demo --arena-only [--no-compare]   # just the shared-memory arena

The session starts a cluster (`shoal start -n N --daemonize`), drives it
from a client as an ipyparallel user would (apply, execute, push, pull),
pushes a large array to every engine through the node's arena, reports
what it measured, and stops the cluster. --arena-only shares one array with
a second process through an arena, with no cluster, against a copy through
a pipe.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np

from . import Arena

# Both children report their resident memory by kind (RssAnon, RssShmem).
RSS = r"""
def rss(kind):
    for line in open('/proc/self/status'):
        if line.startswith(kind + ':'):
            return int(line.split()[1]) * 1024
"""

CHILD = RSS + r"""
import json, sys, time
import numpy as np, shoal
anon0 = rss('RssAnon')
t = time.perf_counter()
a = shoal.Arena.attach(int(sys.argv[1]))
t_attach = time.perf_counter() - t
h = tuple(int(v) for v in sys.argv[2].split(','))
t = time.perf_counter()
x = a.view(h, bytes.fromhex(sys.argv[3]))
t_view = time.perf_counter() - t
t = time.perf_counter()
s = float(x.sum())
t_sum = time.perf_counter() - t
print(json.dumps(dict(attach=t_attach, view=t_view, sum=s, t_sum=t_sum, writeable=bool(x.flags.writeable),
                      anon_growth=rss('RssAnon') - anon0, shmem=rss('RssShmem'))))
"""

PIPE_CHILD = RSS + r"""
import json, pickle, sys, time
import numpy as np
anon0 = rss('RssAnon')
t = time.perf_counter()
meta = pickle.load(sys.stdin.buffer)
n = meta['nbytes']
buf = bytearray(n)
view = memoryview(buf)
got = 0
while got < n:
    k = sys.stdin.buffer.readinto(view[got:])
    if not k:
        raise EOFError(f'the parent sent {got} of {n} bytes')
    got += k
x = np.frombuffer(buf, dtype=meta['dtype']).reshape(meta['shape'])
t_recv = time.perf_counter() - t
s = float(x.sum())
print(json.dumps(dict(recv=t_recv, sum=s, anon_growth=rss('RssAnon') - anon0)))
"""


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n):
    return f"{n / (1 << 20):.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def shmem_hugepages():
    """The kernel's setting for huge pages in shared memory ('never', 'advise', ...), or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m shoal.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2, help="engines (default 2)")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the shared array (default 1024)")
    p.add_argument("--arena-only", action="store_true", help="the arena alone, no cluster")
    p.add_argument("--no-compare", action="store_true", help="(--arena-only) skip the copy through a pipe")
    args = p.parse_args(argv)
    return arena_demo(args) if args.arena_only else cluster_demo(args)


def _rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024


def cluster_demo(args):
    import statistics

    from . import Client
    from .cli import main as shoal_cli

    profile = f"demo{os.getpid()}"
    print(f"shoal demo: a {args.n}-engine cluster on this machine (profile '{profile}')")
    t = time.perf_counter()
    if shoal_cli(["start", "-n", str(args.n), "--daemonize", "--profile", profile]) != 0:
        return 1
    print(f"  started controller, node agent and {args.n} engines in {fmt_time(time.perf_counter() - t)}")
    try:
        with Client(profile=profile) as rc:
            dv = rc[:]
            print(f"  engines {rc.ids}, pids {dv.apply_sync(os.getpid)}")
            rc[0].apply_sync(lambda: None)
            lat = []
            for _ in range(200):
                t = time.perf_counter()
                rc[0].apply_sync(lambda: None)
                lat.append(time.perf_counter() - t)
            print(f"  apply_sync of a no-op, one engine: p50 {fmt_time(statistics.median(lat))} over 200 calls")
            dv.execute("x = 6 * 7", block=True)
            print(f"  execute('x = 6 * 7'), then pull('x'): {dv.pull('x', block=True)}")
            dv.push({"greeting": "hello"}, block=True)
            print(f"  push({{'greeting': 'hello'}}), pull('greeting'): {dv.pull('greeting', block=True)}")
            dv.execute(_RSS_FN + "before = rss_anon()", block=True)
            a = np.ones((args.size_mib << 20) // 8)
            t = time.perf_counter()
            dv.push({"a": a}, block=True)
            took = time.perf_counter() - t
            dv.execute("grew = rss_anon() - before\nsummed = float(a.sum())", block=True)
            grew, sums = dv.pull("grew", block=True), dv.pull("summed", block=True)
            ok = "identical" if all(x == float(a.sum()) for x in sums) else "DIFFERENT"
            print(f"  pushed a {fmt_bytes(a.nbytes)} array to {args.n} engines in {fmt_time(took)}; "
                  f"each engine's private memory grew by {', '.join(fmt_bytes(max(g, 0)) for g in grew)}; "
                  f"sums {ok}")
            if rc.arena is not None:
                st = rc.arena.stats()
                print(f"  the node's arena holds {fmt_bytes(st['used_bytes'])}: one copy, shared by every engine")
    finally:
        t = time.perf_counter()
        shoal_cli(["stop", "--profile", profile])
        print(f"  stopped in {fmt_time(time.perf_counter() - t)}")
        # The demo's profile directory holds only its log by now: leave nothing behind.
        import shutil

        from .client import _profile_dir
        shutil.rmtree(_profile_dir(profile), ignore_errors=True)
    return 0


_RSS_FN = """
def rss_anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
"""


def arena_demo(args):
    nbytes = args.size_mib << 20
    n = nbytes // 8

    print(f"shoal arena demo: sharing a {fmt_bytes(nbytes)} float64 array with a second process")
    t = time.perf_counter()
    arena = Arena()
    t_create = time.perf_counter() - t
    st = arena.stats()
    print(f"  arena created in {fmt_time(t_create)}: a memfd with room for {fmt_bytes(st['heap_size'])}, "
          f"{fmt_bytes(st['committed_bytes'])} committed")

    t = time.perf_counter()
    x = arena.empty(n, dtype="f8")
    t_alloc = time.perf_counter() - t
    t = time.perf_counter()
    x[:] = 1.0
    x[::4096] = np.arange(len(x[::4096]), dtype="f8")
    t_fill = time.perf_counter() - t
    expected = float(x.sum())
    print(f"  allocated in {fmt_time(t_alloc)} (faulting in fresh memory), filled in {fmt_time(t_fill)}")

    handle, desc = arena.describe(x)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(arena.fd), ",".join(map(str, handle)), desc.hex()],
                         pass_fds=(arena.fd,), capture_output=True, text=True, check=True)
    t_child = time.perf_counter() - t
    r = json.loads(out.stdout)
    ok = "matches" if r["sum"] == expected else f"DIFFERS from {expected!r}"
    print(f"  child attached in {fmt_time(r['attach'])} and viewed the array in {fmt_time(r['view'])} "
          f"({'writable' if r['writeable'] else 'read-only'}, no copy)")
    print(f"  child summed it in {fmt_time(r['t_sum'])}: {r['sum']:.6g} ({ok}); "
          f"its private memory grew by {fmt_bytes(max(r['anon_growth'], 0))}, "
          f"shared pages mapped {fmt_bytes(r['shmem'])}")
    print(f"  whole child process, interpreter start included: {fmt_time(t_child)}")

    if not args.no_compare:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", PIPE_CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=False)
        pickle.dump(dict(nbytes=x.nbytes, dtype=x.dtype.str, shape=x.shape), proc.stdin)
        proc.stdin.write(memoryview(x).cast("B"))
        proc.stdin.close()
        r2 = json.loads(proc.stdout.read())
        proc.wait()
        t_pipe = time.perf_counter() - t
        print(f"  for comparison, a copy through a pipe: received in {fmt_time(r2['recv'])}, "
              f"child's private memory grew by {fmt_bytes(r2['anon_growth'])}; whole child {fmt_time(t_pipe)}")
        print(f"  => viewing through the arena was {r2['recv'] / (r['attach'] + r['view']):,.0f}x faster "
              f"than receiving a copy")

    st = arena.stats()
    print(f"  after the child exited: {st['used_blocks']} block in use (ours), {st['holders']} holder attached")
    del x
    st = arena.stats()
    print(f"  after dropping the array: {st['used_blocks']} blocks in use, {fmt_bytes(st['used_bytes'])} used, "
          f"{fmt_bytes(st['committed_bytes'])} kept committed for reuse")
    arena.check()
    arena.close()
    if shmem_hugepages() == "never":
        print("  note: huge pages for shared memory are off on this machine (shmem_enabled=never); with\n"
              "  `echo advise | sudo tee /sys/kernel/mm/transparent_hugepage/shmem_enabled` first touches\n"
              "  cost about 13x less here (docs/arena.md)")
    return 0 if ok == "matches" else 1


if __name__ == "__main__":
    sys.exit(main())
