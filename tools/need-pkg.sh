# Sourced by tools/test.sh and tools/try.sh: need_pkg <command-or-path> <debian package>
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
