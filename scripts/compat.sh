#!/usr/bin/env bash
# Runs ipyparallel 9.2.0's own tests (the ipyparallel/tests/ of its wheel,
# unmodified) against shoal, through the adapter package of tests/compat:
#   1. tests/compat/setup.sh: .venv-compat, shoal installed into it, the
#      wheel's tests, the run tree build/compat/run;
#   2. each test module in a pytest of its own (a module that hangs or
#      crashes loses only itself), against a shoal cluster that its fixture
#      starts and stops, in a $SHOAL_DIR of this run's own;
#   3. a check that no process of those clusters is left;
#   4. tests/compat/report.py: the table per module, the failures that
#      tests/compat/known.txt does not explain, and the closing
#      "N passed, N failed" line.
# Exits 0 only if every failure is explained and nothing was left running.
# Modules that known.txt marks `excluded:` are not run (the reason is there).
#
# COMPAT_VENV and COMPAT_SHOAL_SRC (see tests/compat/setup.sh) run another
# shoal tree (a baseline) in another venv; COMPAT_K passes -k to pytest.
# Time: a test is bounded by pytest-timeout (60 s; ClusterTestCase's own
# alarm, 30 s, takes its timer over) and by the plugin's watchdog (45 s, then
# again every 2 s: an alarm raised inside a weakref callback is dropped), a
# module by COMPAT_MODULE_TIMEOUT (default 300 s; a whole run
# takes about 90 s), the whole run by COMPAT_BUDGET (default 900 s): a module
# that would start after the budget is spent is not run, and counts as an
# error.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./tests/compat/setup.sh
venv=${COMPAT_VENV:-$root/.venv-compat}
run=$root/build/compat/run
res=${COMPAT_RESULTS_DIR:-$root/build/compat/results}
known=$root/tests/compat/known.txt
rm -rf "$res"
mkdir -p "$res"

# This run's own: the clusters' profiles live in SHOAL_DIR, removed at the end.
SHOAL_DIR=$(mktemp -d "/tmp/shoal-compat-$$.XXXXXX")
export SHOAL_DIR
export COMPAT_PIDS=$res/pids COMPAT_RESULTS=$res/results.jsonl
# The adapter (and through it the wheel's tests) first on sys.path, for this
# run only: engines inherit it, as they would find an installed ipyparallel.
export PYTHONPATH=$run
cleanup() { rm -rf "$SHOAL_DIR"; }
trap cleanup EXIT
touch "$COMPAT_PIDS" "$COMPAT_RESULTS"

mapfile -t excluded < <(sed -n 's#^ipyparallel/tests/\(test_[A-Za-z0-9_]*\.py\)[[:space:]]\{1,\}excluded:.*#\1#p' "$known")
is_excluded() { local e; for e in "${excluded[@]}"; do [ "$e" = "$1" ] && return 0; done; return 1; }

started=$(date +%s)
budget=${COMPAT_BUDGET:-900}
modules=()
for path in "$run"/ipyparallel/tests/test_*.py; do
  m=$(basename "$path")
  is_excluded "$m" && continue
  modules+=("$m")
  t0=$(date +%s)
  left=$(( budget - (t0 - started) ))
  if [ "$left" -le 0 ]; then
    printf '{"nodeid": "ipyparallel/tests/%s", "outcome": "error", "message": "[module] not run: the run'"'"'s budget of %s s (COMPAT_BUDGET) was spent"}\n' \
      "$m" "$budget" >> "$COMPAT_RESULTS"
    printf 'compat: %-28s not run (budget spent)\n' "$m"
    continue
  fi
  limit=${COMPAT_MODULE_TIMEOUT:-300}
  [ "$left" -lt "$limit" ] && limit=$left
  status=0
  (cd "$run" && timeout -k 30 "$limit" "$venv/bin/python" -m pytest \
     ${COMPAT_K:+-k "$COMPAT_K"} "ipyparallel/tests/$m") > "$res/${m%.py}.log" 2>&1 || status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    printf '{"nodeid": "ipyparallel/tests/%s", "outcome": "error", "message": "[module] stopped after %s s: its pytest did not finish (tests not run are not counted)"}\n' \
      "$m" "$limit" >> "$COMPAT_RESULTS"
  elif [ "$status" -gt 5 ]; then  # pytest's own codes are 0-5; anything else is a crash
    printf '{"nodeid": "ipyparallel/tests/%s", "outcome": "error", "message": "[module] pytest exited with status %s (see %s)"}\n' \
      "$m" "$status" "$res/${m%.py}.log" >> "$COMPAT_RESULTS"
  fi
  printf 'compat: %-28s %4ss\n' "$m" "$(( $(date +%s) - t0 ))"
done
printf 'compat: all modules in %ss\n' "$(( $(date +%s) - started ))"

# Nothing of the clusters may be left: every pid the fixtures started.
leaks=0
while read -r pid profile; do
  [ -r "/proc/$pid/cmdline" ] || continue
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
  [ "$state" = Z ] || [ "$state" = X ] && continue
  if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qE -- "--profile $profile( |$)" || grep -qz "^SHOAL_DIR=$SHOAL_DIR$" "/proc/$pid/environ" 2>/dev/null; then
    echo "compat: LEAK: pid $pid of profile $profile still runs: $(tr '\0' ' ' < "/proc/$pid/cmdline")"
    kill -9 "$pid" 2>/dev/null || true
    # A killed agent leaves its socket behind (docs/agent.md: its runtime directory).
    rm -f "${XDG_RUNTIME_DIR:-/nonexistent}"/shoal/agent-*-"$pid".sock /tmp/shoal-"$(id -u)"/agent-*-"$pid".sock
    leaks=1
  fi
done < <(sort -u "$COMPAT_PIDS")

status=0
"$venv/bin/python" tests/compat/report.py "$COMPAT_RESULTS" "$known" "${modules[@]}" || status=$?
[ "$leaks" -eq 0 ] || status=1
exit "$status"
