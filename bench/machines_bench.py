"""shoal against ipyparallel and Ray on many machines: hosts made on this machine
(tests/python/hosts.py: each a network, mount, UTS and IPC namespace of its
own, joined by a bridge), the controller and the client on host 0, engines
on every host; a plain TCP stream over one link as the limit.

Cases (bench/machines_driver.py runs them in host 0's client):
  push            an array to every engine (bytes: --push-bytes)
  pull            an array from one engine of another host (--pull-bytes)
  scatter_gather  an array scattered over every engine, then gathered (--sg-bytes)
  rtt             a no-op to one engine of another host, p50 of 300
  lbmap           a load-balanced map of 2000 tiny tasks over every engine
  tcp             one plain TCP send of --push-bytes from host 0 to host 1

Each host's link is counted (bytes in and out of its eth0) around each
case. With --shape RATE (e.g. 2gbit), each host's link is a token bucket of
that rate both ways (tc tbf), so that the links, not the 2 shared cores,
bound what crosses, as between real machines; "none" leaves them as they
are (veth: the CPU's copies are the bound). One key=value line per case,
and with --json, all of them.

    python bench/machines_bench.py [--hosts 4] [--engines 2] [--shape none,2gbit]
                                   [--systems shoal,shoal-plain,ipyparallel,ray] [--json PATH]
Run it with bench/run_machines.sh (the benchmark's venv; as root).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import hosts  # noqa: E402

DRIVER = os.path.join(ROOT, "bench", "machines_driver.py")
MiB, GiB = 1 << 20, 1 << 30
PY = sys.executable


def parse_bytes(text):
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def env():
    e = dict(os.environ, SHOAL_DIR="/tmp/shoal", HOME="/tmp", IPYTHONDIR="/tmp/ipython")
    e.pop("XDG_RUNTIME_DIR", None)
    return e


def counters(topo):
    return [h.link_bytes() for h in topo]


def show(r):
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                   if not isinstance(v, (dict, list))), flush=True)


def put_file(host, path, data):
    dest = host.path(path)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def wait_file(host, path, timeout=60):
    deadline = time.monotonic() + timeout
    while not host.path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear on {host.name}")
        time.sleep(0.1)
    time.sleep(0.2)  # written whole (ipyparallel writes in place)
    return host.path(path).read_bytes()


# ---- the systems ------------------------------------------------------------------

class Shoal:
    name = "shoal"
    conn = "/tmp/shoal/profile_default/connection.json"
    start_args = ()  # Curve: on, the default beyond loopback

    def __init__(self, topo, engines):
        self.topo, self.engines = topo, engines

    def shoal(self, host, *args):
        p = host.run([PY, "-m", "shoal", *args], env=env(), capture_output=True, text=True, timeout=180)
        if p.returncode:
            raise RuntimeError(f"shoal {' '.join(args)} on {host.name}: {p.stderr.strip()}")

    def start(self):
        h0 = self.topo[0]
        self.shoal(h0, "start", "-n", str(self.engines), "--ip", h0.addr, "--daemonize", *self.start_args)
        text = wait_file(h0, self.conn)
        for h in list(self.topo)[1:]:
            put_file(h, "/tmp/cluster.json", text)
            put_file(h, self.conn, text)
            self.shoal(h, "agent", "--join", "/tmp/cluster.json", "-n", str(self.engines), "--daemonize")

    def stop(self):
        self.topo[0].run([PY, "-m", "shoal", "stop"], env=env(), capture_output=True, timeout=180)


class ShoalPlain(Shoal):
    """shoal without encryption (--no-curve): what Curve and the bulk
    channel's AES-256-GCM cost, beside the default."""
    name = "shoal-plain"
    start_args = ("--no-curve",)


class IPyParallel:
    name = "ipyparallel"
    conn = "/tmp/ipp/security/ipcontroller-client.json"

    def __init__(self, topo, engines):
        self.topo, self.engines, self.procs = topo, engines, []

    def start(self):
        h0 = self.topo[0]
        log = subprocess.DEVNULL
        self.procs.append(h0.popen([PY, "-m", "ipyparallel.controller", f"--ip={h0.addr}", "--profile-dir=/tmp/ipp",
                                    "--log-level=40"], env=env(), stdout=log, stderr=log))
        text = wait_file(h0, "/tmp/ipp/security/ipcontroller-engine.json")
        wait_file(h0, self.conn)  # written after the engines' file
        for h in self.topo:
            if h.index:
                put_file(h, "/tmp/ipp-engine.json", text)
            f = "/tmp/ipp/security/ipcontroller-engine.json" if h.index == 0 else "/tmp/ipp-engine.json"
            for _ in range(self.engines):
                self.procs.append(h.popen([PY, "-m", "ipyparallel.engine", f"--file={f}", "--log-level=40"],
                                          env=env(), stdout=log, stderr=log))

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        shutil.rmtree(self.topo[0].path("/tmp/ipp"), ignore_errors=True)


class Ray:
    """Ray multi-node: `ray start --head` on host 0, `ray start --address`
    on the others, each host's node with as many CPUs as engines and an
    object store of its own (in its own /dev/shm); the driver's actors,
    one per engine, are pinned to the nodes (machines_driver.py)."""
    name = "ray"
    conn = "auto"
    store = 3 * GiB  # a 1 GiB push, and a scatter's parts, fit on each node

    def __init__(self, topo, engines):
        self.topo, self.engines = topo, engines

    def ray(self, host, *args):
        exe = os.path.join(os.path.dirname(PY), "ray")
        p = host.run([exe, *args], env=env(), capture_output=True, text=True, timeout=300)
        if p.returncode:
            raise RuntimeError(f"ray {' '.join(args)} on {host.name}: {(p.stderr or p.stdout).strip()[-800:]}")

    def start(self):
        h0 = self.topo[0]
        common = [f"--num-cpus={self.engines}", f"--object-store-memory={self.store}", "--disable-usage-stats"]
        self.ray(h0, "start", "--head", f"--node-ip-address={h0.addr}", "--port=6379", "--include-dashboard=false",
                 *common)
        for h in list(self.topo)[1:]:
            self.ray(h, "start", f"--address={h0.addr}:6379", f"--node-ip-address={h.addr}", *common)

    def stop(self):
        for h in self.topo:
            try:
                self.ray(h, "stop", "--force")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"# {e}", file=sys.stderr)


SYSTEMS = {"shoal": Shoal, "shoal-plain": ShoalPlain, "ipyparallel": IPyParallel, "ray": Ray}


# ---- the cases --------------------------------------------------------------------

def reply(drv):
    """The driver's next JSON line (a peer's library may print other lines first)."""
    while True:
        line = drv.stdout.readline()
        if not line:
            raise RuntimeError("the driver ended")
        if line.startswith("{"):
            return json.loads(line)
        print(f"# driver: {line.rstrip()}", file=sys.stderr)


def run_system(topo, cls, engines, cases, shape, out):
    system = cls(topo, engines)
    total = engines * len(topo)
    try:
        system.start()
        drv = topo[0].popen([PY, DRIVER, cls.name.split("-")[0], cls.conn, str(total)], env=env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        hello = reply(drv)
        if not hello.get("ready"):
            raise RuntimeError(f"{cls.name}: the driver did not connect")
        for req in cases:
            time.sleep(0.5)
            before = counters(topo)
            drv.stdin.write(json.dumps(req) + "\n")
            drv.stdin.flush()
            r = reply(drv)
            after = counters(topo)
            r = {"system": cls.name, "shape": shape, "hosts": len(topo), "engines": total, **r}
            r["link_rx"] = [a[0] - b[0] for a, b in zip(after, before)]
            r["link_tx"] = [a[1] - b[1] for a, b in zip(after, before)]
            if req.get("bytes"):
                r["rx_per_host_x"] = max(r["link_rx"][1:]) / req["bytes"]
            out.append(r)
            show(r)
        drv.stdin.write("\n")
        drv.stdin.flush()
        drv.wait(timeout=60)
    finally:
        system.stop()


TCP_RECV = r"""
import socket, sys, time
n = int(sys.argv[2]); buf = bytearray(min(n, 64 << 20)); got = 0
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5599)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
while got < n:
    k = c.recv_into(memoryview(buf)[:min(len(buf), n - got)])
    if not k: break
    got += k
c.sendall(b"k"); c.close()
"""
TCP_SEND = r"""
import socket, sys, time
n = int(sys.argv[2]); chunk = memoryview(bytearray(b"\1" * (64 << 20)))
c = socket.create_connection((sys.argv[1], 5599)); t = time.perf_counter(); sent = 0
while sent < n:
    k = min(len(chunk), n - sent); c.sendall(chunk[:k]); sent += k
c.recv(1); print(time.perf_counter() - t)
"""


def run_tcp(topo, size, shape, out):
    h0, h1 = topo[0], topo[1]
    rx = h1.popen([PY, "-c", TCP_RECV, h1.addr, str(size)], stdout=subprocess.PIPE, text=True, env=env())
    rx.stdout.readline()
    before = counters(topo)
    p = h0.run([PY, "-c", TCP_SEND, h1.addr, str(size)], capture_output=True, text=True, timeout=600, env=env())
    after = counters(topo)
    rx.wait(timeout=30)
    took = float(p.stdout.strip())
    r = {"system": "tcp", "shape": shape, "hosts": 2, "case": "tcp", "bytes": size, "seconds": took,
         "gib_s": size / took / GiB, "ok": p.returncode == 0,
         "link_rx": [a[0] - b[0] for a, b in zip(after, before)], "link_tx": [a[1] - b[1] for a, b in zip(after, before)]}
    out.append(r)
    show(r)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--engines", type=int, default=2, help="engines per host")
    p.add_argument("--push-bytes", type=parse_bytes, default=GiB)
    p.add_argument("--pull-bytes", type=parse_bytes, default=256 * MiB)
    p.add_argument("--sg-bytes", type=parse_bytes, default=GiB)
    p.add_argument("--shape", default="none,2gbit", help="link rates to run at, comma-separated; none: unshaped")
    p.add_argument("--systems", default="shoal,ipyparallel")
    p.add_argument("--cases", default="rtt,lbmap,pull,push,scatter_gather")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None, help="draw the push, pull and scatter+gather times here (matplotlib)")
    args = p.parse_args()
    ok, why = hosts.available()
    if not ok:
        sys.exit(f"machines_bench: cannot make hosts here: {why}")
    sizes = {"push": args.push_bytes, "pull": args.pull_bytes, "scatter_gather": args.sg_bytes}
    cases = [{"case": c, **({"bytes": sizes[c]} if c in sizes else {})} for c in args.cases.split(",")]
    out = []
    with hosts.Topology(args.hosts) as topo:
        for shape in args.shape.split(","):
            for h in topo:
                h.unshape()
                if shape != "none":
                    h.shape(shape)
            run_tcp(topo, args.push_bytes, shape, out)
            for name in args.systems.split(","):
                run_system(topo, SYSTEMS[name], args.engines, cases, shape, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    ratios(out)
    if args.png:
        plot(out, args.png)


def ratios(out):
    """One line per case and link: each system's time over shoal's (and, for
    the bulk cases, shoal's over one plain TCP send of the same link)."""
    for shape in dict.fromkeys(r["shape"] for r in out):
        rows = [r for r in out if r["shape"] == shape and "error" not in r]
        tcp = next((r for r in rows if r["system"] == "tcp"), None)
        for case in dict.fromkeys(r["case"] for r in rows if r["system"] != "tcp"):
            by = {r["system"]: r for r in rows if r["case"] == case}
            key = "p50_us" if case == "rtt" else "seconds"
            if "shoal" not in by:
                continue
            line = {"ratio": case, "shape": shape}
            for name, r in by.items():
                if name != "shoal":
                    line[f"{name}_over_shoal"] = r[key] / by["shoal"][key]
            if tcp and case in ("push", "pull") and by["shoal"].get("bytes"):
                one_link = tcp["seconds"] * by["shoal"]["bytes"] / tcp["bytes"]
                line["shoal_over_one_tcp_send"] = by["shoal"][key] / one_link
            show(line)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = ["push", "pull", "scatter_gather"]
    shapes = list(dict.fromkeys(r["shape"] for r in out))
    names = list(dict.fromkeys(r["system"] for r in out if r["system"] != "tcp"))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        width = 0.8 / (len(names) + 1)
        for k, name in enumerate(names + ["tcp"]):
            ys = []
            for case in cases:
                r = next((r for r in out if r["shape"] == shape and r["system"] == name
                          and r["case"] == (case if name != "tcp" else "tcp") and "error" not in r), None)
                if r is not None and name == "tcp":  # one TCP send of the case's bytes over one link
                    size = next((x["bytes"] for x in out if x["case"] == case and x.get("bytes")), r["bytes"])
                    ys.append(r["seconds"] * size / r["bytes"])
                else:
                    ys.append(r["seconds"] if r else 0)
            ax.bar([i + k * width for i in range(len(cases))], ys, width,
                   label="one TCP send (the link)" if name == "tcp" else name)
        ax.set_xticks([i + width * len(names) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases)
        ax.set_ylabel("seconds")
        ax.set_title(f"4 hosts x 2 engines, links {'unshaped' if shape == 'none' else shape}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
