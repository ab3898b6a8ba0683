"""What Curve costs on the controller's path: plaintext against CurveZMQ, same run.

Cases, for each of plain and curve (alternating, --rounds clusters of each):
  ctl_rtt   a HEARTBEAT -> HEARTBEAT_ACK round trip through the controller from a
            raw socket: median of 3000, microseconds
  apply     apply_sync of a no-op on one engine by a client with lanes=False:
            median of 1500, microseconds
  push256   push of a 256 MiB array to one engine (block=True): median of 5, seconds
The agent runs in a mount namespace of its own (its Unix socket hidden: needs
root), so the client goes without the node's arena, as one on another machine
does, and the array travels as frames: client -> controller -> agent.
Prints one key=value line per cluster, then the medians and the ratios
(curve / plain). Run from the source tree with the build's programs:
  SHOAL_BIN_DIR=build/ci/controller:build/ci/node_agent:build/ci/engine \\
  PYTHONPATH=build/ci/devpkg python bench/curve_ab.py
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import shoal  # noqa: E402
from shoal import _core  # noqa: E402

from procs import Agent, Controller, private_mount  # noqa: E402


def noop():
    return None


def one(curve, pushes):
    root = pathlib.Path(tempfile.mkdtemp(prefix="shoal-curve-ab-"))
    ctl = Controller(root / "home", heartbeat_ms=1000, extra=("--curve",) if curve else ())
    run = root / "run"
    run.mkdir(mode=0o700)
    try:
        agent = Agent(ctl, run, engines=1, arena_size=2 << 30, preexec_fn=private_mount(run, b"mode=0700"))
    except BaseException:
        ctl.stop()
        raise
    out = {}
    try:
        s = ctl.socket()
        t = []
        for i in range(3200):
            t0 = time.perf_counter()
            s.send(_core.MSG_HEARTBEAT)
            s.recv(timeout=5)
            t.append(time.perf_counter() - t0)
        out["ctl_rtt_us"] = statistics.median(t[200:]) * 1e6
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            assert rc.arena is None, "the agent's socket should be out of sight"
            v = rc[0]
            t = []
            for i in range(1600):
                t0 = time.perf_counter()
                v.apply_sync(noop)
                t.append(time.perf_counter() - t0)
            out["apply_us"] = statistics.median(t[100:]) * 1e6
            a = np.ones(256 << 20, dtype=np.uint8)
            v.push({"a": a}, block=True)
            t = []
            for _ in range(pushes):
                t0 = time.perf_counter()
                v.push({"a": a}, block=True)
                t.append(time.perf_counter() - t0)
            out["push256_s"] = statistics.median(t)
    finally:
        agent.stop()
        ctl.stop()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pushes", type=int, default=5)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("curve_ab: hiding the agent's socket (a mount namespace) needs root")
    res = {"plain": [], "curve": []}
    for _ in range(args.rounds):
        for name in ("plain", "curve"):
            o = one(name == "curve", args.pushes)
            res[name].append(o)
            print(f"case={name} " + " ".join(f"{k}={v:.3f}" for k, v in o.items()), flush=True)
    for k in res["plain"][0]:
        plain = statistics.median(x[k] for x in res["plain"])
        curve = statistics.median(x[k] for x in res["curve"])
        print(f"median {k} plain={plain:.3f} curve={curve:.3f} ratio={curve / plain:.2f}")


if __name__ == "__main__":
    main()
