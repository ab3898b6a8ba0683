#!/usr/bin/env bash
# The side-by-side suite (bench/suite.py): shoal, ipyparallel, Ray, Dask
# distributed, joblib and multiprocessing.Pool on the same work, in one run,
# in the benchmark's own virtual environment (.venv-bench: the project's
# pinned packages, the peers of bench/requirements-peers.txt, and shoal).
# Prints one key=value line per (system, workload, size), then writes
# bench/results/suite-STAMP.{txt,json} and the plots suite-STAMP-*.png.
# Arguments go to bench/suite.py (--help lists them; --systems, --workloads
# and the sizes pick a part of it). A full run takes about half an hour here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. bench/venv.sh
# Ray's own start-up chatter goes to stderr; the results to stdout.
.venv-bench/bin/python bench/suite.py --json "bench/results/suite-$stamp.json" "$@" \
  | tee "bench/results/suite-$stamp.txt"
.venv-bench/bin/python bench/plots.py "bench/results/suite-$stamp.json" | tee -a "bench/results/suite-$stamp.txt"
