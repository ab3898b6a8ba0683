"""The arena demo: share one large numpy array with a second process.

    python -m shoal.demo [--size-mib 1024] [--no-compare]

The parent creates an arena, fills an array in it and hands a second Python
process the arena's fd plus the array's handle and descriptor. The child
attaches, views the array without copying it and sums it; both report what
they measured. For comparison the same array then goes to a child the usual
way (pickle protocol 5 through a pipe), which copies it.
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
    p.add_argument("--size-mib", type=int, default=1024, help="size of the shared array (default 1024)")
    p.add_argument("--no-compare", action="store_true", help="skip the pickle-through-a-pipe comparison")
    args = p.parse_args(argv)
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
