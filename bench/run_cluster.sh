#!/usr/bin/env bash
# shoal against ipyparallel on this machine (bench/cluster_bench.py), in a
# virtual environment of the benchmark's own (.venv-bench): the project's
# pinned packages, the peers of bench/requirements-peers.txt, and shoal.
# One key=value line per case, then the ratios; saved under bench/results/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. bench/venv.sh
{
  echo "# $(uname -r), $(nproc) cores, $(grep MemTotal /proc/meminfo | tr -s ' ')"
  .venv-bench/bin/python bench/cluster_bench.py --json "bench/results/cluster-$stamp.json" "$@"
} | tee "bench/results/cluster-$stamp.txt"
