"""Draws the suite's figures from its JSON (bench/suite.py), beside it.
Given several result files (JSON, or the key=value text of a run cut short),
it merges them first, a later file's line replacing an earlier one for the
same system, workload and size, and writes FIRST-merged.json:
  X-broadcast.png  time and node memory growth against the array's size,
                   one line per system (sending one array to every worker)
  X-tasks.png      the no-op round trip, tiny-task throughput, and the
                   seconds of scatter+gather, uneven and reduce, per system
and prints the table of ratios (each peer against shoal) the README shows.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["shoal", "ipyparallel", "ray", "dask", "joblib", "multiprocessing"]
MiB = 1 << 20


def parse_line(line):
    r, last = {}, None
    for field in line.split():
        if "=" not in field and last is not None:  # a value with spaces: "skipped=no such API"
            r[last] = f"{r[last]} {field}"
            continue
        k, _, v = field.partition("=")
        last = k
        try:
            r[k] = int(v)
        except ValueError:
            try:
                r[k] = float(v)
            except ValueError:
                r[k] = v
    return r


def read(path):
    text = Path(path).read_text()
    if path.endswith(".json"):
        return json.loads(text)
    return [parse_line(line) for line in text.splitlines() if line.startswith("system=")]


def merge(paths):
    rows = {}
    for path in paths:
        for r in read(path):
            rows[(r["system"], r["workload"], r.get("bytes"))] = r
    return list(rows.values())


def usable(rows):
    return [r for r in rows if "skipped" not in r and "failed" not in r]


def systems(rows):
    seen = {r["system"] for r in rows}
    return [s for s in ORDER if s in seen]


def one(rows, system, workload, **kw):
    got = [r for r in rows if r["system"] == system and r["workload"] == workload
           and all(r.get(k) == v for k, v in kw.items())]
    return got[0] if got else None


def broadcast_plot(rows, out):
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in systems(rows):
        pts = sorted((r["bytes"], r["seconds"], r["mem_growth_mib"]) for r in rows
                     if r["system"] == s and r["workload"] == "broadcast")
        if not pts:
            continue
        x = [b / MiB for b, _, _ in pts]
        ax_t.plot(x, [t for _, t, _ in pts], marker="o", label=s)
        ax_m.plot(x, [max(m, 0.1) for _, _, m in pts], marker="o", label=s)
    workers = next((r["workers"] for r in rows if r["workload"] == "broadcast"), "?")
    for ax, what in ((ax_t, "seconds until every worker holds it"), (ax_m, "node memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("array size (MiB)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.plot([1, 4096], [1, 4096], color="grey", linestyle=":", label="1× the array")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"One array to each of {workers} workers (median of the runs; lower is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def tasks_plot(rows, out):
    panels = [("rtt", "p50_us", "no-op round trip, p50 (µs)", True),
              ("tiny-map", "tasks_per_s", "tiny tasks/s, load-balanced map", True),
              ("tiny-async", "tasks_per_s", "tiny tasks/s, one by one", True),
              ("scatter-gather", "seconds", "scatter + gather (s)", True),
              ("uneven", "seconds", "uneven example, makespan (s)", False),
              ("reduce", "seconds", "sum of a split array (s)", True)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    names = systems(rows)
    for ax, (workload, key, title, log) in zip(axes.flat, panels):
        vals = [(s, one(rows, s, workload)) for s in names]
        vals = [(s, r[key]) for s, r in vals if r is not None]
        ax.bar([s for s, _ in vals], [v for _, v in vals],
               color=["tab:blue" if s == "shoal" else "tab:grey" for s, _ in vals])
        if workload == "uneven":
            r = next((one(rows, s, "uneven") for s in names if one(rows, s, "uneven")), None)
            if r:
                ax.axhline(r["ideal"], color="black", linestyle=":", label="ideal")
                ax.axhline(r["greedy"], color="tab:green", linestyle="--", label="first idle engine, no cost")
                ax.legend(fontsize=7)
                ax.set_ylim(r["ideal"] * 0.9, max(v for _, v in vals) * 1.05)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    workers = next((r["workers"] for r in rows if r["workload"] == "rtt"), "?")
    fig.suptitle(f"{workers} workers each; throughput higher is better, times lower")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def ratios(rows):
    """Lines 'ratio system=X workload=W [bytes=B] value=R': how many times
    better shoal is (a peer's time over shoal's, or shoal's rate over the peer's)."""
    lines = []
    for r in rows:
        if r["system"] == "shoal":
            continue
        kw = {"bytes": r["bytes"]} if "bytes" in r else {}
        s = one(rows, "shoal", r["workload"], **kw)
        if s is None:
            continue
        if "tasks_per_s" in r:
            v = s["tasks_per_s"] / r["tasks_per_s"]
        elif "p50_us" in r:
            v = r["p50_us"] / s["p50_us"]
        elif "seconds" in r:
            v = r["seconds"] / s["seconds"]
        else:
            continue
        size = f" bytes={r['bytes']}" if "bytes" in r else ""
        lines.append(f"ratio system={r['system']} workload={r['workload']}{size} value={v:.3g}")
    return lines


def main(paths):
    rows = merge(paths)
    stem = str(Path(paths[0]).with_suffix(""))
    if len(paths) > 1:
        stem += "-merged"
        Path(stem + ".json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        if "skipped" in r or "failed" in r:
            print(f"# {r['system']} {r['workload']} {r.get('bytes', '')}: {r.get('skipped') or r.get('failed')}")
    rows = usable(rows)
    broadcast_plot(rows, stem + "-broadcast.png")
    tasks_plot(rows, stem + "-tasks.png")
    print("# shoal against each peer (higher is better for shoal)")
    for line in ratios(rows):
        print(line)
    print(f"# plots: {stem}-broadcast.png {stem}-tasks.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
