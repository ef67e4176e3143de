#!/usr/bin/env bash
# A Python venv holding the real pghoard from PyPI, for the test in which pghoard restores a
# backup walhoard wrote (tests/pghoard_rollback.rs). PyPI's newest pghoard is 2.1.0 (2019): it
# restores the local-tar format (pghoard-bb-v2) exactly as later releases do, keyed on the same
# per-chunk `format` metadata, and predates PostgreSQL 12's recovery settings (the test copes).
# A newer pghoard from a source checkout can be used instead: tools/pghoard-venv.sh.
# Usage: tools/install-pghoard.sh [VENV_DIR]; the default is pghoard-venv in the test cache.
# Prints the venv's directory, the only thing on stdout.
set -euo pipefail
. "$(dirname "$0")/need-pkg.sh"

pghoard_version=2.1.0
if [ "$(id -u)" = 0 ]; then cache=${WALHOARD_CACHE:-/var/cache/walhoard}; else cache=${WALHOARD_CACHE:-$HOME/.cache/walhoard}; fi
venv=${1:-$cache/pghoard-venv}

if [ -x "$venv/bin/pghoard_restore" ] && [ "$("$venv/bin/pghoard_restore" --version 2>/dev/null)" = "$pghoard_version" ]; then
  echo "$venv"
  exit 0
fi
echo "== installing pghoard==$pghoard_version into $venv" >&2
fresh_venv "$venv"
# psycopg2-binary instead of psycopg2 (which would need libpq's headers to build); pghoard
# itself without its dependency list for that reason.
"$venv/bin/python" -m pip install -q --disable-pip-version-check cryptography psycopg2-binary \
  python-dateutil python-snappy requests zstandard >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "pghoard==$pghoard_version" >&2
chmod -R a+rX "$venv"
"$venv/bin/pghoard_restore" --version >&2
echo "$venv"
