#!/usr/bin/env bash
# Installs pghoard from a checkout into a virtualenv, for the opt-in test that has the real
# pghoard restore walhoard's backups (tests/pghoard_rollback.rs):
#
#   tools/pghoard-venv.sh <pghoard checkout> <venv dir>
#   WALHOARD_PGHOARD_VENV=<venv dir> cargo test --locked --test tests -- rollback_
#
# <pghoard checkout> is a git checkout of pghoard (Aiven-Open/pghoard, e.g. tag 2.7.0; pghoard
# on PyPI is years older). Nothing of it is copied into this repository. The venv is built on
# Debian's python3 with pghoard's PyPI dependencies (pydantic below 2: with 2 every pghoard
# upload fails) and made readable by everyone, so the `postgres` user can run it too.
# Needs python3-venv and network access to PyPI.
set -euo pipefail

checkout=$(realpath "${1:?usage: $0 <pghoard checkout> <venv dir>}")
venv=$(realpath -m "${2:?usage: $0 <pghoard checkout> <venv dir>}")
[ -f "$checkout/pghoard/pghoard.py" ] || { echo "$checkout is not a pghoard checkout" >&2; exit 1; }

/usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q rohmu zstandard python-snappy cryptography psycopg2-binary \
  python-dateutil requests packaging "pydantic<2"
"$venv/bin/pip" install -q --no-deps "$checkout"
chmod -R a+rX "$venv"
"$venv/bin/pghoard_restore" --version
