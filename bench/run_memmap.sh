#!/usr/bin/env bash
# Memmaps and .npy loads into 8 engines (bench/memmap_bench.py): shoal beside
# joblib, Ray and ipyparallel for memmaps, and beside np.load + push,
# np.fromfile, fio and a memcpy for loads, in one run, in the benchmark's own
# virtual environment (.venv-bench). Writes bench/results/memmap-STAMP.{txt,json}.
# The cold loads drop the page cache, which needs root; fio comes from apt.
# Arguments go to bench/memmap_bench.py (--help lists them).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. bench/venv.sh
if ! command -v fio >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fio >/dev/null
fi
.venv-bench/bin/python bench/memmap_bench.py --json "bench/results/memmap-$stamp.json" "$@" \
  | tee "bench/results/memmap-$stamp.txt"
