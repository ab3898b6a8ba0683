#!/usr/bin/env bash
# Runs the arena and ring benchmarks (not part of the tests: timings belong here, side by
# side with what they are compared against in the same run). One key=value line
# per case on stdout; also saved under bench/results/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
[ -f build/bench/build.ninja ] || meson setup build/bench -Dbuildtype=release -Dtests=disabled >/dev/null
ninja -C build/bench >/dev/null
mkdir -p bench/results
out=bench/results/arena-$(date -u +%Y%m%dT%H%M%SZ).txt
{
  echo "# $(uname -r), $(nproc) cores, $(grep MemTotal /proc/meminfo | tr -s ' ')"
  ./build/bench/bench/arena_bench "$@"
  ./build/bench/bench/ring_bench
  python bench/attach_view.py
} | tee "$out"
