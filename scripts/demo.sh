#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs shoal's main job: the
# user's ipyparallel walk-through (examples/walkthrough.py), cell by cell,
# on a fresh 4-engine cluster that the walk-through starts itself, then
# stops it. The cluster lives in a profile directory of its own, so that a
# cluster you already run is left alone. `python -m shoal.demo` is a shorter
# session that prints what it measured.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
home=$(mktemp -d -t shoal-demo.XXXXXX)
export SHOAL_DIR="$home"
export PATH="$root/.venv/bin:$PATH"
cleanup() {
  shoal stop >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT
python "$root/examples/walkthrough.py"
