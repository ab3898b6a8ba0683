"""`shoal bench tradeoff`: where does going parallel start to pay?

For a range of array sizes and per-element compute costs, this measures the
cost of moving an array to the engines and its result back against the cost
of computing on it, and finds, for each cost, the size from which the
parallel version beats computing in the client process. Three ways of
running the same work are timed, side by side in one run:

- serial: the kernel over the whole array, in this process;
- arena: shoal's path. ``DirectView.scatter`` writes the array into the
  node's arena once and each engine views its part without a copy; the
  kernel runs on each part (``apply`` on a ``Reference`` to it); each
  engine's result comes back through the arena and the parts are joined into
  one array, as ``gather`` joins them;
- socket: the same two steps through plain loopback TCP sockets to worker
  processes of our own, one per engine: pickle protocol 5 with the array
  buffers sent out of band (no copy into the pickle), received into fresh
  buffers. This is what a system without shared memory pays at best.

The kernel makes a fresh result array and runs ``passes`` rounds of
``np.sin`` over it (passes=0: a copy, so that there is still a result to
move back). Its cost in ns per element is measured serially, not assumed.
Each figure is the median of ``reps`` runs; the three ways alternate within
a run, so that the machine's noise falls on all of them.

docs/tradeoff.md says how to read the table and the plot.
"""

import hmac
import json
import os
import pickle
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
import uuid

import numpy as np
# Imported now, not on first use: numpy imports numpy.random lazily, and a
# Ctrl-C (or SIGTERM) that lands inside that import can be lost in its
# extension modules' initialisation, so that the run went on measuring.
import numpy.random  # noqa: F401

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Chosen to finish in about a minute with 4 engines on a 2-core machine.
DEFAULT_SIZES = (KiB, 16 * KiB, 256 * KiB, 4 * MiB, 64 * MiB, 256 * MiB)
DEFAULT_PASSES = (0, 1, 4, 16)
PATHS = ("arena", "socket")
# A case runs at least --reps times, and goes on while it has taken less
# than CASE_SECONDS, up to MAX_REPS runs.
CASE_SECONDS = 0.25
MAX_REPS = 50
_KEY = "_shoal_tradeoff_x"  # the scattered part's name on the engines
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB}


# ---- what runs, here and on the engines ------------------------------------------------

def kernel(x, passes):
    """The compute: a fresh array of np.sin(x), then passes - 1 more rounds
    of np.sin over it in place; passes=0 is a plain copy."""
    if passes == 0:
        return np.array(x, copy=True)
    y = np.sin(x)
    for _ in range(passes - 1):
        np.sin(y, out=y)
    return y


# ---- arguments -------------------------------------------------------------------------

def parse_size(text):
    """Bytes from "64K", "1M", "1.5MiB", "4096" (K, M, G: powers of 1024),
    rounded down to whole float64s. Raises ValueError for anything else or
    for less than one float64."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size: use a number of bytes with an optional unit, "
                         f"K, M or G (powers of 1024), e.g. 64K or 16M")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 8:
        raise ValueError(f"{text!r} is less than one float64 (8 bytes)")
    return size - size % 8  # whole float64s


def parse_sizes(text):
    """A sorted list of distinct sizes from a comma-separated list."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no sizes given")
    return sorted({parse_size(p) for p in parts})


def parse_passes(text):
    """A sorted list of distinct pass counts (non-negative ints) from a
    comma-separated list. 0 (moving the data only) is always measured."""
    out = {0}
    for p in text.split(","):
        if not p.strip():
            continue
        if not p.strip().isdigit():
            raise ValueError(f"{p.strip()!r} is not a cost: a cost is a number of passes of the kernel "
                             f"(an integer from 0), e.g. 0,1,4,16")
        out.add(int(p))
    return sorted(out)


def size_label(nbytes):
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    if nbytes >= KiB:
        return f"{nbytes / KiB:.1f} KiB"
    return f"{nbytes} B"


# ---- the plain socket path -------------------------------------------------------------

def _recv_exactly(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the other side closed the connection")
        got += k
    return buf


def _send_obj(sock, obj):
    """obj pickled at protocol 5, its buffers sent as they are after it."""
    buffers = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sock.sendall(struct.pack(f"<QI{len(raws)}Q", len(payload), len(raws), *(r.nbytes for r in raws)) + payload)
    for r in raws:
        sock.sendall(r)


def _recv_obj(sock):
    n, k = struct.unpack("<QI", _recv_exactly(sock, 12))
    lengths = struct.unpack(f"<{k}Q", _recv_exactly(sock, 8 * k)) if k else ()
    payload = _recv_exactly(sock, n)
    return pickle.loads(payload, buffers=[_recv_exactly(sock, length) for length in lengths])


TOKEN_BYTES = 32


def _worker_main(port):
    """A socket worker: keeps what it is sent by name, calls what it is asked
    to on it, until the connection closes. It first reads the parent's token
    from stdin and sends it: see SocketWorkers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, on Ctrl-C too
    token = sys.stdin.buffer.read(TOKEN_BYTES)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(token)
    ns = {}
    while True:
        try:
            msg = _recv_obj(sock)
        except ConnectionError:
            return 0
        try:
            if msg[0] == "put":
                ns[msg[1]] = msg[2]
                reply = ("ok", None)
            else:  # ("call", f, name, args)
                reply = ("ok", msg[1](ns[msg[2]], *msg[3]))
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            _send_obj(sock, reply)
        except ConnectionError:  # the parent went (a run cut short): quietly, as on its close
            return 0


class SocketWorkers:
    """n worker processes, each behind a loopback TCP connection.

    Both sides unpickle what they receive, and any user of this machine may
    connect to a loopback port: so a connection counts as a worker only if
    it first sends a random token, which each worker reads from its stdin
    (a pipe; not its command line, which every user can read). Other
    connections are closed unread."""

    def __init__(self, n, timeout=30):
        self.procs, self.socks = [], []
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            listener.settimeout(timeout)
            port = listener.getsockname()[1]
            token = os.urandom(TOKEN_BYTES)
            code = f"import sys; from shoal.tradeoff import _worker_main; sys.exit(_worker_main({port}))"
            for _ in range(n):
                p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
                self.procs.append(p)
                p.stdin.write(token)
                p.stdin.close()
            deadline = time.monotonic() + timeout
            while len(self.socks) < n:
                listener.settimeout(max(deadline - time.monotonic(), 0.001))
                conn, _ = listener.accept()
                try:
                    conn.settimeout(max(deadline - time.monotonic(), 0.001))
                    ok = hmac.compare_digest(bytes(_recv_exactly(conn, TOKEN_BYTES)), token)
                except (OSError, ConnectionError):
                    ok = False
                if not ok:
                    conn.close()
                    continue
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.socks.append(conn)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _round(self, messages):
        for sock, msg in zip(self.socks, messages):
            _send_obj(sock, msg)
        out = []
        for i, sock in enumerate(self.socks):
            status, value = _recv_obj(sock)
            if status != "ok":
                raise RuntimeError(f"socket worker {i} failed:\n{value}")
            out.append(value)
        return out

    def scatter(self, name, a):
        self._round([("put", name, part) for part in np.array_split(a, len(self.socks))])

    def call(self, f, name, *args):
        return self._round([("call", f, name, args)] * len(self.socks))

    def close(self):
        for sock in self.socks:
            sock.close()  # a worker ends when its connection does
        self.socks = []
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


# ---- one case ---------------------------------------------------------------------------

def _serial(a, passes):
    return kernel(a, passes)


def _arena(dv, a, passes):
    from .view import Reference
    dv.scatter(_KEY, a, block=True)
    return np.concatenate(dv.apply_sync(kernel, Reference(_KEY), passes))


def _socket(workers, a, passes):
    workers.scatter(_KEY, a)
    return np.concatenate(workers.call(kernel, _KEY, passes))


def _measure(ways, a, passes, reps):
    """(median, min, max) seconds of each way, and the number of runs: at least reps,
    more (up to MAX_REPS) while the case has taken under CASE_SECONDS, since
    the shortest cases are the noisiest. The ways alternate within a run."""
    names = list(ways)
    times = {name: [] for name in names}
    start = time.perf_counter()
    rep = 0
    while rep < reps or (rep < MAX_REPS and time.perf_counter() - start < CASE_SECONDS):
        order = names[rep % len(names):] + names[:rep % len(names)]
        results = {}
        for name in order:
            t0 = time.perf_counter()
            y = ways[name](a, passes)
            times[name].append(time.perf_counter() - t0)
            if rep == 0:
                results[name] = y
            del y
        if rep == 0:
            for name in names[1:]:
                if not np.array_equal(results[name], results[names[0]]):
                    raise RuntimeError(f"the {name} path computed a different result than the serial one "
                                       f"({a.nbytes} bytes, {passes} passes)")
        del results
        rep += 1
    return {name: (statistics.median(ts), min(ts), max(ts)) for name, ts in times.items()}, rep


def pays_from(rows, passes, path):
    """The smallest measured size from which, up to the largest measured,
    the path beats serial at that cost (speedup > 1); None if it does not
    at the largest."""
    mine = sorted((r for r in rows if r["passes"] == passes), key=lambda r: r["size"])
    start = None
    for r in reversed(mine):
        if r[f"{path}_speedup"] <= 1:
            break
        start = r["size"]
    return start


def kv_line(row):
    return "tradeoff " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ---- the cluster ---------------------------------------------------------------------------

class ClusterError(RuntimeError):
    """The cluster to measure on could not be started or reached."""


def _cluster_pids(rc, profile):
    from .client import _connection_file
    with open(_connection_file(profile, None)) as f:
        ctl = json.load(f)["pid"]
    st = rc.cluster_status()
    return ctl, [n["pid"] for n in st["nodes"] if n["alive"]], [e["pid"] for e in st["engines"] if e["alive"]]


# ---- the plot ----------------------------------------------------------------------------

def _pyplot():
    """matplotlib's pyplot on the (non-interactive) Agg backend; raises
    RuntimeError saying how to get matplotlib if it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("writing the PNG needs matplotlib, which is not installed: "
                           "`python -m pip install matplotlib==3.11.2` (pinned in requirements.txt), "
                           "or run with --no-png") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows, png, title):
    """Time against size, log-log, one panel per cost: serial, arena and
    socket, with the move-only times (passes=0) faint behind, and a line
    where each path starts to pay."""
    plt = _pyplot()
    costs = sorted({r["passes"] for r in rows})
    cols = min(len(costs), 2)
    nrows = (len(costs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.6 * nrows), squeeze=False)
    styles = {"serial": ("black", "o"), "arena": ("tab:blue", "s"), "socket": ("tab:orange", "^")}
    moves = sorted((r for r in rows if r["passes"] == 0), key=lambda r: r["size"])
    for ax, passes in zip(axes.flat, costs):
        mine = sorted((r for r in rows if r["passes"] == passes), key=lambda r: r["size"])
        sizes = [r["size"] for r in mine]
        if passes:
            for path in PATHS:
                ax.plot([r["size"] for r in moves], [r[f"{path}_s"] for r in moves], color=styles[path][0],
                        alpha=0.3, linestyle="--", label=f"{path}, moving only (passes=0)")
        for way in ("serial",) + PATHS:
            color, marker = styles[way]
            ax.plot(sizes, [r[f"{way}_s"] for r in mine], color=color, marker=marker, label=way)
        for path, dash in zip(PATHS, (":", "-.")):
            start = pays_from(rows, passes, path)
            if start is not None:  # a line at the size, and a star on the path's curve there
                ax.axvline(start, color=styles[path][0], linestyle=dash, linewidth=1.5,
                           label=f"{path} pays from {size_label(start)}")
                at = next(r for r in mine if r["size"] == start)
                ax.plot([start], [at[f"{path}_s"]], marker="*", markersize=16, color=styles[path][0],
                        markeredgecolor="black", linestyle="none")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(s) for s in sizes], rotation=30, fontsize=8)
        ax.minorticks_off()
        ns = mine[-1]["ns_per_element"]
        ax.set_title(f"passes={passes} ({ns:.1f} ns/element)" + (": moving the data" if passes == 0 else ""))
        ax.set_xlabel("array size (float64)")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(costs):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---- the whole run -----------------------------------------------------------------------

def _table(rows, n_engines, out):
    head = (f"{'size':>9} {'passes':>6} {'ns/elt':>7} {'serial s':>10} {'arena s':>10} {'socket s':>10} "
            f"{'arena x':>8} {'socket x':>8}  pays")
    print(f"# Times: medians. Parallel = scatter to {n_engines} engines, the kernel on each part, the whole "
          f"result array back (joined as gather joins it).", file=out)
    print("# x = serial time / parallel time; pays: which parallel paths beat serial at that size.", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for passes in sorted({r["passes"] for r in rows}):
        starts = {path: pays_from(rows, passes, path) for path in PATHS}
        for r in sorted((r for r in rows if r["passes"] == passes), key=lambda r: r["size"]):
            pays = [p for p in PATHS if r[f"{p}_speedup"] > 1]
            mark = [f"<- {p} pays from here on" for p in PATHS if starts[p] == r["size"]]
            print(f"{size_label(r['size']):>9} {passes:>6} {r['ns_per_element']:>7.2f} {r['serial_s']:>10.6f} "
                  f"{r['arena_s']:>10.6f} {r['socket_s']:>10.6f} {r['arena_speedup']:>8.2f} "
                  f"{r['socket_speedup']:>8.2f}  {' '.join(pays) or '-'}"
                  f"{'   ' + '; '.join(mark) if mark else ''}", file=out)
        print(file=out)


def summary_lines(rows):
    """One line per cost level: from which size each path pays."""
    lines = []
    for passes in sorted({r["passes"] for r in rows}):
        largest = max((r for r in rows if r["passes"] == passes), key=lambda r: r["size"])
        said = []
        for path in PATHS:
            start = pays_from(rows, passes, path)
            some = sorted(r["size"] for r in rows if r["passes"] == passes and r[f"{path}_speedup"] > 1)
            if start is not None:
                said.append(f"from {size_label(start)} on ({path})")
            elif some:  # faster somewhere, but not at the largest size: noise, or a real dip
                said.append(f"not from any size on ({path}; faster at {', '.join(map(size_label, some))} only)")
            else:
                said.append(f"never in the measured range ({path})")
        lines.append(f"passes={passes} ({largest['ns_per_element']:.2f} ns/element): parallel pays "
                     f"{', '.join(said)}")
    return lines


def run(sizes=DEFAULT_SIZES, costs=DEFAULT_PASSES, n_engines=None, profile=None, reps=3, png="tradeoff.png",
        out=sys.stdout, json_path=None):
    """Measures every (size, cost) and returns one dict per case (see
    docs/tradeoff.md for the keys). Prints one key=value line per case as it
    goes, then the table and a summary per cost, to out; draws the plot
    into png (None: no plot) and writes the rows as JSON into json_path.

    sizes: bytes of float64 array; costs: passes of the kernel (0 is always
    measured). profile=None starts a cluster of n_engines engines (default:
    one per core) for the run and stops it at the end, whatever happens;
    a profile uses that running cluster's engines (the first n_engines, or
    all) and leaves it running. Raises ClusterError if the cluster does not
    start or cannot be reached, ValueError for bad arguments, RuntimeError
    if matplotlib is missing (checked before measuring).
    """
    from .client import Client
    from .cluster import Cluster, _stop_profile
    sizes, costs = sorted({s - s % 8 for s in sizes}), sorted(set(costs) | {0})
    if reps < 3:
        raise ValueError(f"reps must be at least 3 (medians), not {reps}")
    if not sizes or min(sizes) < 8:
        raise ValueError("sizes must be at least 8 bytes (one float64)")
    if n_engines is not None and n_engines < 1:
        raise ValueError(f"n_engines must be at least 1, not {n_engines}")
    if png:
        _pyplot()
    cluster = rc = workers = None
    own = profile is None
    if own:
        n_engines = n_engines or os.cpu_count() or 1
        profile = f"tradeoff-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        if own:
            print(f"# starting a cluster of {n_engines} engine{'s' if n_engines > 1 else ''} (profile {profile})",
                  file=out, flush=True)
            cluster = Cluster(n=n_engines, profile=profile)
            try:
                cluster.start_cluster_sync()
            except RuntimeError as e:
                raise ClusterError(str(e)) from None
        try:
            rc = Client(profile=profile, timeout=10)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the cluster of profile '{profile}': {e}") from None
        ids = rc.ids
        if n_engines is None:
            n_engines = len(ids)
        if len(ids) < n_engines or not ids:
            raise ClusterError(f"the cluster of profile '{profile}' has {len(ids)} engine(s), "
                               f"{n_engines} were asked for")
        ctl, agents, engines = _cluster_pids(rc, profile)
        print(f"# cluster '{profile}' ({'started for this run' if own else 'already running'}): "
              f"controller pid {ctl}, agent pids {agents}, engine pids {engines}", file=out, flush=True)
        dv = rc[ids[:n_engines]]
        if rc.arena is None:
            print("# warning: this client has no arena (no agent on this node): the 'arena' path "
                  "sends its data through the controller", file=out)
        workers = SocketWorkers(n_engines)
        print(f"# socket workers: pids {[p.pid for p in workers.procs]}", file=out, flush=True)
        ways = {"serial": _serial,
                "arena": lambda a, passes: _arena(dv, a, passes),
                "socket": lambda a, passes: _socket(workers, a, passes)}
        warm = np.ones(max(n_engines, 1024))
        _measure(ways, warm, 1, 1)  # imports on the engines, lanes and connections set up: not timed
        print(f"# shoal bench tradeoff: {n_engines} engines and {n_engines} socket workers on "
              f"{os.cpu_count()} cores ({platform.machine()}, Linux {platform.release()}), numpy {np.__version__}, "
              f"at least {reps} runs per case (short cases: up to {MAX_REPS} runs or {CASE_SECONDS} s), "
              f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", file=out, flush=True)
        rows = []
        rng = np.random.default_rng(0)
        for size in sizes:
            a = rng.random(size // 8)
            for passes in costs:
                t, runs = _measure(ways, a, passes, reps)
                med = {way: t[way][0] for way in t}
                row = dict(size=size, passes=passes, ns_per_element=med["serial"] / a.size * 1e9,
                           serial_s=med["serial"], arena_s=med["arena"], socket_s=med["socket"],
                           arena_speedup=med["serial"] / med["arena"], socket_speedup=med["serial"] / med["socket"],
                           engines=n_engines, reps=runs)
                for way in t:  # the spread, for judging the noise
                    row[f"{way}_min_s"], row[f"{way}_max_s"] = t[way][1], t[way][2]
                rows.append(row)
                print(kv_line(row), file=out, flush=True)
            del a
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            if workers is not None:
                workers.close()
            if rc is not None:
                if not own and rc.ids:  # leave the user's engines as we found them (best effort)
                    try:
                        rc[rc.ids].execute(f"globals().pop({_KEY!r}, None)", block=True)
                    except Exception:
                        pass
                rc.close()
            if own:
                try:
                    if cluster is not None:
                        cluster.stop_cluster_sync()  # nothing to do if it never started
                finally:
                    left = _stop_profile(profile)  # a stop that failed (Cluster stops a start cut short)
                    print(f"# cluster '{profile}' stopped" if not left else
                          f"# warning: processes {left} of cluster '{profile}' could not be stopped",
                          file=out, flush=True)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
    print(file=out)
    _table(rows, n_engines, out)
    for line in summary_lines(rows):
        print(line, file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"# rows written to {json_path}", file=out)
    if png:
        plot(rows, png, f"serial against scatter + compute + gather on {n_engines} engines "
                        f"({os.cpu_count()} cores); medians of at least {reps} runs")
        print(f"# plot written to {png}", file=out)
    out.flush()
    return rows


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()
