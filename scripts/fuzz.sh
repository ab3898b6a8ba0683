#!/usr/bin/env bash
# Runs every libFuzzer target (tests/fuzz, docs/fuzzing.md) for SECONDS each:
#   scripts/fuzz.sh            30 s a target, as CI runs it (scripts/test.sh)
#   scripts/fuzz.sh 3600       an hour a target
#   scripts/fuzz.sh 600 wire   one target
# Builds build/fuzz first if needed (clang, -Dfuzz=true). Each target starts
# from its seed corpus, tests/fuzz/corpus/<target>, which it only reads: what
# it finds goes into a scratch directory (FUZZ_WORKDIR, else a new one under
# /tmp), kept when something failed or when FUZZ_WORKDIR was given, so that a
# long run can go on from where the last one stopped. Exits non-zero if any
# target crashed, leaked, timed out or made a sanitizer report, and says
# where the input that did it was saved.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# meson finds numpy (the package's build needs it) in the project's .venv.
[ ! -d .venv/bin ] || export PATH="$root/.venv/bin:$PATH"

secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire slot array request xfer)
case $secs in '' | *[!0-9]*) echo "fuzz: SECONDS must be a number, not '$secs'" >&2; exit 2 ;; esac

build=build/fuzz
if [ ! -f "$build/build.ninja" ]; then
  command -v clang >/dev/null || { echo "fuzz: clang is missing (scripts/setup.sh installs it)" >&2; exit 2; }
  CC=clang meson setup "$build" -Dfuzz=true -Dtests=disabled -Dbench=false >/dev/null
fi
ninja -C "$build" $(printf 'tests/fuzz/fuzz_%s ' "${targets[@]}") >/dev/null

if [ -n "${FUZZ_WORKDIR:-}" ]; then
  work=$FUZZ_WORKDIR
  keep=1
  mkdir -p "$work"
else
  work=$(mktemp -d /tmp/shoal-fuzz.XXXXXX)
  keep=0
fi

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t/corpus" "$work/$t/found"
  log=$work/$t.log
  # Every sanitizer report is fatal (the targets are built with
  # -fno-sanitize-recover=all); leaks are checked after every input that
  # mallocs more than it frees, and at exit.
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    "$build/tests/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 \
    -dict="tests/fuzz/$t.dict" -artifact_prefix="$work/$t/found/" -print_final_stats=1 \
    "$work/$t/corpus" "tests/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  found=$(ls "$work/$t/found" 2>/dev/null || true)
  if [ $rc -ne 0 ] || [ -n "$found" ]; then
    failed+=("$t")
    printf 'fuzz %-8s FAILED (exit %d) after %s runs; the end of its log (%s):\n' "$t" "$rc" "${runs:-?}" "$log"
    grep -E 'ERROR|SUMMARY|runtime error|fuzz_[a-z]+: |^    #[0-9]+ ' "$log" | head -40 | sed 's/^/  /' || true
    for f in $found; do
      printf '  input saved as %s\n  reproduce: %s/tests/fuzz/fuzz_%s %s\n' "$work/$t/found/$f" "$build" "$t" \
        "$work/$t/found/$f"
    done
  else
    printf 'fuzz %-8s ok: %s runs in %s s, %s, corpus %s inputs\n' "$t" "${runs:-?}" "$secs" "${cov:-cov: ?}" \
      "$(ls "$work/$t/corpus" | wc -l)"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} failed (${failed[*]}); everything is kept in $work"
  exit 1
fi
[ $keep -eq 1 ] || rm -rf "$work"
echo "fuzz: ${#targets[@]} passed, 0 failed"
