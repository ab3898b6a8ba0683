#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs shoal's main job. Until the
# cluster exists, that is the arena demo: share a large array with a second
# process through the arena and print what was measured. Arguments go to the
# demo (try --help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m shoal.demo "$@"
