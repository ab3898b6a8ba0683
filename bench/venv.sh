# Sourced by bench/run_cluster.sh and bench/run_suite.sh, from the project's
# root: sets the machine up (scripts/setup.sh), then the benchmark's own
# virtual environment, .venv-bench (the project's pinned packages, the peers
# of bench/requirements-peers.txt, and shoal), and puts it first on PATH.
# Leaves `stamp` (UTC, for result file names) and bench/results/ ready.
./scripts/setup.sh
py=${SHOAL_PYTHON:-python3}
if [ ! -x .venv-bench/bin/python ]; then
  "$py" -m venv .venv-bench
fi
export PATH="$PWD/.venv-bench/bin:$PATH"
.venv-bench/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r bench/requirements-peers.txt
.venv-bench/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir=build/bench-pip . >/dev/null
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
