#!/usr/bin/env bash
# Set up a fresh machine for shoal, idempotently and quietly:
#   1. Debian packages for the C core (apt; `apt-get update` first if one is missing),
#   2. the project's virtual environment .venv with the pinned Python packages,
#   3. a build of the C core and the `shoal` package installed into .venv.
# Nothing goes into the system interpreter. Safe to run again: steps that are
# already done are skipped.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
cd "$root"

log() { printf 'setup: %s\n' "$*" >&2; }

# 1. Debian packages.
# clang and libclang-rt-14-dev (libFuzzer, the sanitizers' runtimes) build the fuzz targets (scripts/fuzz.sh).
# iproute2 (ip, tc) makes the test hosts and tcpdump records their traffic (tests/python/hosts.py).
apt_pkgs=(build-essential pkg-config libzmq3-dev liburing-dev libsodium-dev libcriterion-dev libcjson-dev
          clang libclang-rt-14-dev iproute2 tcpdump)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. The virtual environment, from the CPython 3.11 on PATH (not Debian's
#    /usr/bin/python3). Its libpython is shared, which engines embed later.
py=${SHOAL_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv from $(command -v "$py")"
  "$py" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned Python packages"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# 3. Build and install shoal into .venv with meson-python (the C extension and
#    the package). The build directory is kept so that rebuilds are incremental.
log "building and installing shoal into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir=build/pip . >/dev/null
