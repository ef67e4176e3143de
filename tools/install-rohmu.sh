#!/usr/bin/env bash
# A Python venv holding rohmu (pghoard's storage and encryption library) and cryptography, on
# Debian's python3. The pghoa1 tests (tests/pghoa1.rs) encrypt with rohmu's own Encryptor, so
# that walhoard's reader is checked against the real writer, not against our reading of it.
# Usage: tools/install-rohmu.sh [VENV_DIR]; the default is rohmu-venv in the test cache
# (WALHOARD_ROHMU_VENV overrides it). Prints the venv's directory, the only thing on stdout:
# the tests run this script (once per test process) and use the python it names.
set -euo pipefail
. "$(dirname "$0")/need-pkg.sh"

rohmu_version=2.8.2
if [ "$(id -u)" = 0 ]; then cache=${WALHOARD_CACHE:-/var/cache/walhoard}; else cache=${WALHOARD_CACHE:-$HOME/.cache/walhoard}; fi
venv=${1:-${WALHOARD_ROHMU_VENV:-$cache/rohmu-venv}}

if [ -x "$venv/bin/python" ] &&
   "$venv/bin/python" -c "import rohmu.encryptor, rohmu.rohmufile, cryptography, sys; from importlib.metadata import version; sys.exit(version('rohmu') != '$rohmu_version')" 2>/dev/null; then
  echo "$venv"
  exit 0
fi
echo "== installing rohmu==$rohmu_version into $venv" >&2
fresh_venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "rohmu==$rohmu_version" cryptography >&2
"$venv/bin/python" -c "import rohmu.encryptor, rohmu.rohmufile"
echo "$venv"
