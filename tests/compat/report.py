"""The compat run's report: reads the results that compat_plugin wrote (one
JSON line per test) and tests/compat/known.txt, prints a table of counts per
module, the failures that known.txt does not explain, a line with the
explained ones, and a closing line `compat: N passed, N failed, N skipped`
(failed: the failures and errors known.txt does not explain, so that a
green run reads 0 failed).
Exits 1 if a failure is unexplained.

    python report.py RESULTS.jsonl KNOWN.txt test_a.py test_b.py ...

known.txt: one line per node id, then its category and reason:
    ipyparallel/tests/test_x.py::TestX::test_y  internals: <reason>
    ipyparallel/tests/test_x.py::TestX::test_y  difference: <reason>
    ipyparallel/tests/test_z.py                 excluded: <reason>
`difference` is a deliberate difference of shoal, documented in
docs/ipyparallel.md; `internals` a test of ipyparallel's internals that a
reimplementation need not provide; `excluded` a module that is not run.
"""

import collections
import json
import os
import re
import sys

LINE = re.compile(r"^(\S+)\s+(difference|internals|excluded):\s*(.+)$")


def read_known(path):
    known = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = LINE.match(line)
            if not m:
                sys.exit(f"{path}:{n}: not `<node id>  <difference|internals|excluded>: <reason>`: {line}")
            known[m.group(1)] = (m.group(2), m.group(3))
    return known


def main(results_path, known_path, modules):
    known = read_known(known_path)
    results = {}
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            results[r["nodeid"]] = r
    cols = ("passed", "failed", "errors", "skipped", "explained", "unexplained")
    table = collections.OrderedDict((m, dict.fromkeys(cols, 0)) for m in modules)
    unexplained, stale = [], []
    for nodeid, r in results.items():
        module = nodeid.split("::")[0].rsplit("/", 1)[-1]
        row = table.setdefault(module, dict.fromkeys(cols, 0))
        outcome = r["outcome"]
        row[{"error": "errors"}.get(outcome, outcome)] += 1
        if outcome in ("failed", "error"):
            if nodeid in known and known[nodeid][0] != "excluded":
                row["explained"] += 1
            else:
                row["unexplained"] += 1
                unexplained.append(r)
        elif outcome == "passed" and nodeid in known:
            stale.append(nodeid)
    # A module that reported nothing did not run at all (an import error
    # that pytest could not collect as a test, a crash before the first
    # test): a failure, unless a -k filter (COMPAT_K) deselected its tests.
    if not os.environ.get("COMPAT_K"):
        for m, row in table.items():
            if not any(row.values()):
                row["errors"] += 1
                row["unexplained"] += 1
                unexplained.append({"outcome": "error", "nodeid": f"ipyparallel/tests/{m}",
                                    "message": "[module] nothing of it ran or was reported (see its log)"})
    total = {c: sum(row[c] for row in table.values()) for c in cols}
    width = max([len(m) for m in table] + [len("total")])
    head = f"{'module':<{width}} " + " ".join(f"{c:>11}" for c in cols)
    print(head)
    print("-" * len(head))
    for m, row in table.items():
        print(f"{m:<{width}} " + " ".join(f"{row[c]:>11}" for c in cols))
    print("-" * len(head))
    print(f"{'total':<{width}} " + " ".join(f"{total[c]:>11}" for c in cols))
    excluded = [(k, v[1]) for k, v in known.items() if v[0] == "excluded"]
    if excluded:
        print(f"\nnot run ({len(excluded)} modules, tests/compat/known.txt says why):")
        for k, why in excluded:
            print(f"  {k.rsplit('/', 1)[-1]}: {why}")
    if stale:
        print(f"\npassing now, though known.txt explains them as failures ({len(stale)}): remove their lines")
        for nodeid in stale:
            print(f"  {nodeid}")
    if unexplained:
        print(f"\nunexplained failures ({len(unexplained)}):")
        for r in unexplained:
            print(f"  {r['outcome'].upper():5} {r['nodeid']}\n        {r['message']}")
    print(f"\ncompat: {total['explained']} failures explained by known.txt "
          f"({total['failed'] + total['errors']} failed or errored in all)")
    print(f"compat: {total['passed']} passed, {total['unexplained']} failed, {total['skipped']} skipped")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
