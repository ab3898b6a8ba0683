#!/usr/bin/env bash
# shoal against ipyparallel and Ray on many machines (bench/machines_bench.py): hosts
# made as namespaces on this machine (as root), in the benchmark's own
# virtual environment (.venv-bench). One key=value line per case; saved
# under bench/results/machines-STAMP.{txt,json}.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. bench/venv.sh
{
  echo "# $(uname -r), $(nproc) cores, $(grep MemTotal /proc/meminfo | tr -s ' ')"
  .venv-bench/bin/python bench/machines_bench.py --json "bench/results/machines-$stamp.json" --png "bench/results/machines-$stamp.png" "$@"
} | tee "bench/results/machines-$stamp.txt"
