# Sourced by tools/test.sh, tools/try.sh and the venv install scripts: need_pkg <command-or-path> <debian package>
# installs the package (apt-get, as root) when the command or path is missing.
apt_updated=
need_pkg() {
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing $1: install Debian package $2 (needs root)" >&2; exit 1
    fi
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    echo "== installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}

# fresh_venv <dir>: an empty venv on Debian's python3 at <dir> (whatever was there removed),
# installing python3-venv first when missing (as root). All output on stderr: the install
# scripts that use it print only the venv's directory on stdout.
fresh_venv() {
  if ! /usr/bin/python3 -c "import venv, ensurepip" 2>/dev/null; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing python3-venv: install the Debian package (needs root)" >&2; exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
  fi
  rm -rf "$1"
  mkdir -p "$(dirname "$1")"
  /usr/bin/python3 -m venv "$1" >&2
}
