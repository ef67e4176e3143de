#!/usr/bin/env bash
# Try walhoard end to end on this machine (README: "Try it"):
#   installs what is missing (Debian postgresql-15), builds walhoard (release), starts a
#   throw-away PostgreSQL 15 in a temp directory, streams its WAL with `walhoard daemon` into
#   local storage (zstd + encryption, keys from `walhoard create-keys`), takes a basebackup,
#   makes changes, creates a restore point, makes more changes, restores to the restore point
#   and to the latest state into two new directories, starts PostgreSQL on each and checks
#   that the data is what it was at each point. Exits non-zero on any mismatch; removes
#   everything it made (set WALHOARD_TRY_KEEP=1 to keep the temp directory; WALHOARD_BIN=path
#   uses an already built binary instead of building; WALHOARD_TRY_PACKAGE=1 also builds the
#   Debian package and installs it on this machine with tools/package.sh, as a last step).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

. tools/need-pkg.sh

step "1. prerequisites: PostgreSQL 15 (Debian package), cargo"
need_pkg /usr/lib/postgresql/15/bin/postgres postgresql-15
command -v cargo >/dev/null || fail "cargo is needed (https://rustup.rs)"
pgbin=/usr/lib/postgresql/15/bin
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

if [ -n "${WALHOARD_BIN:-}" ]; then
  # Development: an already built binary (e.g. target/debug/walhoard).
  step "2. using $WALHOARD_BIN"
  wh=$(realpath "$WALHOARD_BIN")
else
  step "2. building walhoard (release)"
  cargo build --release --locked --quiet
  wh=$repo/target/release/walhoard
fi
[ -x "$wh" ] || fail "no $wh"

tmp=$(mktemp -d /tmp/walhoard-try.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$tmp"/pg-*/data; do
    [ -f "$d/postmaster.pid" ] && as_pg "$pgbin/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1
  done
  if [ -n "${WALHOARD_TRY_KEEP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
# PostgreSQL refuses to run as root: as the postgres user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
give() { if [ "$(id -u)" = 0 ]; then chown -R postgres: "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sock=$tmp/sock; mkdir -p "$sock"; give "$sock"
psql_at() { # psql_at <port> <sql>
  as_pg "$pgbin/psql" -X -q -A -t -h "$sock" -p "$1" -U postgres -d postgres -c "$2"
}
start_pg() { # start_pg <data dir> <port>
  as_pg "$pgbin/pg_ctl" -D "$1" -l "$1/../postgres.log" -o "-p $2 -k $sock -c listen_addresses=''" -w -t 120 start >/dev/null
}

step "3. a throw-away PostgreSQL 15 in $tmp/pg-primary"
mkdir -p "$tmp/pg-primary"; give "$tmp/pg-primary"
as_pg "$pgbin/initdb" -D "$tmp/pg-primary/data" -U postgres -A trust --no-sync --locale=C >/dev/null
cat >> "$tmp/pg-primary/data/postgresql.conf" <<EOF
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
EOF
port=$(free_port)
start_pg "$tmp/pg-primary/data" "$port"
echo "primary on port $port"

step "4. configuration: local storage, zstd, encryption (walhoard create-keys)"
keys=$("$wh" create-keys --key-id try --bits 2048)
http_port=$(free_port)
python3 - "$tmp" "$sock" "$port" "$http_port" "$keys" > "$tmp/walhoard.json" <<'EOF'
import json, sys
tmp, sock, port, http_port, keys = sys.argv[1:]
print(json.dumps({
    "backup_location": f"{tmp}/state",
    "json_state_file_path": f"{tmp}/state/state.json",
    "http_port": int(http_port),
    "compression": {"algorithm": "zstd", "level": 3},
    "backup_sites": {"demo": {
        "nodes": [{"host": sock, "port": int(port), "user": "postgres", "slot": "walhoard"}],
        "object_storage": {"storage_type": "local", "directory": f"{tmp}/archive"},
        "encryption_key_id": "try",
        "encryption_keys": json.loads(keys)["encryption_keys"],
    }},
}, indent=2))
EOF
chmod 644 "$tmp/walhoard.json"
echo "$tmp/walhoard.json"

step "5. walhoard daemon (streaming WAL into $tmp/archive)"
"$wh" daemon --config "$tmp/walhoard.json" > "$tmp/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  [ "$(psql_at "$port" "select count(*) from pg_replication_slots where active")" = 1 ] && break
  sleep 0.2
done
[ "$(psql_at "$port" "select count(*) from pg_replication_slots where active")" = 1 ] ||
  { cat "$tmp/daemon.log"; fail "the daemon is not streaming"; }
echo "streaming through slot walhoard"

step "6. data, then a basebackup (walhoard basebackup)"
as_pg "$pgbin/pgbench" -i -q -s 2 -h "$sock" -p "$port" -U postgres postgres 2>&1 | tail -1
backup=$("$wh" basebackup --config "$tmp/walhoard.json" --site demo)
echo "basebackup $backup"
"$wh" restore list-basebackups --config "$tmp/walhoard.json"

checksum="select count(*) || ' ' || md5(string_agg(aid::text || ':' || abalance, ',' order by aid)) from pgbench_accounts"
step "7. changes, a restore point 'before_more', more changes"
as_pg "$pgbin/pgbench" -n -t 300 -h "$sock" -p "$port" -U postgres postgres | grep -E "^number of transactions actually processed"
psql_at "$port" "select pg_create_restore_point('before_more')" >/dev/null
at_point=$(psql_at "$port" "$checksum")
echo "at the restore point: $at_point"
as_pg "$pgbin/pgbench" -n -t 300 -h "$sock" -p "$port" -U postgres postgres | grep -E "^number of transactions actually processed"
psql_at "$port" "update pgbench_accounts set abalance = abalance + 1 where aid <= 1000" >/dev/null
latest=$(psql_at "$port" "$checksum")
echo "latest:               $latest"
[ "$at_point" != "$latest" ] || fail "the changes changed nothing"
segment=$(psql_at "$port" "select pg_walfile_name(pg_switch_wal())")
echo "waiting for $segment to be archived"
for _ in $(seq 1 300); do
  [ -e "$tmp/archive/demo/xlog/$segment" ] && break
  sleep 0.2
done
[ -e "$tmp/archive/demo/xlog/$segment" ] || { cat "$tmp/daemon.log"; fail "$segment not archived"; }

restore_and_check() { # restore_and_check <name> <expected checksum> <get-basebackup args...>
  local name=$1 want=$2; shift 2
  local dir=$tmp/pg-$name
  mkdir -p "$dir"
  step "restore '$name': walhoard restore get-basebackup $*"
  "$wh" restore get-basebackup --config "$tmp/walhoard.json" --site demo \
    --target-dir "$dir/data" --restore-to-primary "$@"
  give "$dir"
  local p; p=$(free_port)
  start_pg "$dir/data" "$p"
  for _ in $(seq 1 300); do
    [ "$(psql_at "$p" "select pg_is_in_recovery()" 2>/dev/null)" = f ] && break
    sleep 0.2
  done
  local got; got=$(psql_at "$p" "$checksum")
  echo "restored copy on port $p: $got"
  echo "expected:              $want"
  [ "$got" = "$want" ] || fail "restore '$name' does not match"
  echo "OK: '$name' matches"
}

restore_and_check point "$at_point" --recovery-target-name before_more --recovery-target-action promote
restore_and_check latest "$latest"

step "done: both restored copies hold exactly the data of their point in time"

# Optional: the Debian package (tools/package.sh: cargo deb, dpkg -i on this machine, the
# installed binary and sample configuration checked). Off by default: it installs a package.
if [ -n "${WALHOARD_TRY_PACKAGE:-}" ]; then
  step "8. Debian package (WALHOARD_TRY_PACKAGE): tools/package.sh"
  "$repo/tools/package.sh" || fail "tools/package.sh"
fi
