#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs every test:
#   1. the C tests (Criterion, through meson test) in a build with warnings as errors,
#   2. the same C tests in an address+undefined sanitizer build,
#   3. every libFuzzer target for 30 s (scripts/fuzz.sh, clang; about two and
#      a half minutes),
#   4. the Python tests (pytest) against the package installed in .venv,
#   5. ipyparallel 9.2.0's own tests against shoal (scripts/compat.sh, about
#      two minutes; once, in the plain build),
#   6. the Python tests again with the extension and the programs from the
#      sanitizer build, but for the many-host ones (test_machines.py,
#      test_bulk_machines.py, test_hosts.py: namespaced hosts, about four
#      minutes), which run once, in the plain build; the C of the bulk path
#      and of direct tasks runs in both through test_direct.py and
#      test_bulk.py (several agents on this machine, on loopback).
# The slowest tests of each pytest run are listed at its end (--durations).
# Exits non-zero if anything fails.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }

step "C tests, warnings as errors (build/ci)"
[ -f build/ci/build.ninja ] || meson setup build/ci -Dwerror=true >/dev/null
ninja -C build/ci >/dev/null
meson test -C build/ci --print-errorlogs

step "C tests, address+undefined sanitizers (build/asan)"
[ -f build/asan/build.ninja ] || meson setup build/asan -Dwerror=true -Dbuildtype=debug \
  -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
ninja -C build/asan >/dev/null
meson test -C build/asan --print-errorlogs

step "fuzz targets, 30 s each (scripts/fuzz.sh)"
./scripts/fuzz.sh 30

step "Python tests against the installed package"
python -m pytest -q -p no:cacheprovider --durations=15 tests/python

step "ipyparallel's own tests against shoal (scripts/compat.sh)"
./scripts/compat.sh

step "Python tests with the sanitizer build of shoal._core"
pkg=build/asan/pkg/shoal
mkdir -p "$pkg"
for f in python/shoal/*.py; do ln -sf "$root/$f" "$pkg/"; done
ln -sf "$root"/build/asan/python/shoal/_core*.so "$pkg/"
# libstdc++ preloaded too: ASan looks up the real __cxa_throw when it starts,
# and a C++ extension loaded later (matplotlib's, for shoal bench tradeoff)
# would otherwise abort it ("real___cxa_throw != 0" CHECK failed).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH="$root/build/asan/pkg" \
  SHOAL_BIN_DIR="$root/build/asan/controller:$root/build/asan/node_agent:$root/build/asan/engine" \
  python -m pytest -q -p no:cacheprovider --durations=15 tests/python \
  --ignore=tests/python/test_machines.py --ignore=tests/python/test_bulk_machines.py \
  --ignore=tests/python/test_hosts.py
