#!/usr/bin/env bash
# Writes a small archive with the real pghoard, for tests that must see pghoard's own objects
# (tests/data/pghoard-pg15/README.md says how the committed one was made).
#
#   tools/pghoard-fixture.sh <pghoard checkout> [output dir, default tests/data/pghoard-pg15]
#
# <pghoard checkout> is a git checkout of pghoard (Aiven-Open/pghoard; the committed archive
# used tag 2.7.0). Nothing of it is copied into this repository: the script installs it into a
# throwaway venv built on Debian's python3 with its PyPI dependencies, runs it against a
# throwaway PostgreSQL 15 cluster (as the `postgres` user, local storage, zstd, unencrypted)
# and packs what it stored:
#   - one local-tar basebackup (control object basebackup/<name>.00000000.pghoard, chunks
#     under basebackup_chunk/<name>/),
#   - one basic basebackup (basebackup/<name>, one compressed tar),
#   - the WAL segments pghoard archived between and after them (xlog/),
# every object with its `.metadata` sidecar, as `archive.tar.zst` holding `<site>/...` for
# site `pgsite`. Needs root (to run things as `postgres`), postgresql-15, python3-venv, zstd.
#
# Options (environment):
#   FIXTURE_MODES="local-tar basic"  the basebackups to take, in order (each then 2 segments):
#                                    basic, local-tar, delta (pghoard-delta-v2; files of at
#                                    least FIXTURE_DELTA_MIN bytes, default 64 KiB, become
#                                    basebackup_delta/<hash> objects, smaller ones go into
#                                    bundle chunks or are embedded in the manifest);
#   PG_BIN=<dir>                     the server's initdb/pg_ctl/postgres (default Debian's 15;
#                                    other majors from tools/install-pg.sh). psql, pg_basebackup
#                                    and pg_receivewal come from CLIENT_BIN (default Debian's
#                                    15), which must be at least the server's major;
#   FIXTURE_WAL=archive_command      WAL through PostgreSQL's archive_command and
#                                    pghoard_postgres_command instead of pg_receivewal.
#
# pghoard refuses to start pg_receivewal or any basebackup unless its configured
# pg_receivewal/pg_basebackup have the server's major (PGHoard.check_pg_versions_ok). For a
# server of another major than CLIENT_BIN (tools/install-pg.sh ships no client programs):
# FIXTURE_WAL=archive_command, and only local-tar or delta backups, which never run
# pg_basebackup: pghoard is then given a stand-in `pg_basebackup` that only answers
# `--version` with the server's version (and fails if ever run otherwise), e.g.
#
#   PG_BIN=/var/cache/walhoard/pg/13/bin FIXTURE_MODES=local-tar FIXTURE_WAL=archive_command \
#     tools/pghoard-fixture.sh <checkout> tests/data/pghoard-pg13
#   FIXTURE_ENCRYPT=1                pghoard's own encryption (`pghoa1`) with a fresh RSA key
#                                    pair, written as key.json (encryption_keys.k1) beside
#                                    the archive: a test key, for the tests only;
#   FIXTURE_TABLESPACE=1             the fixture table in a user tablespace `fixture_ts`.
set -euo pipefail
modes=${FIXTURE_MODES:-local-tar basic}

checkout=$(realpath "${1:?usage: $0 <pghoard checkout> [output dir]}")
out=$(realpath -m "${2:-$(dirname "$0")/../tests/data/pghoard-pg15}")
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
client=${CLIENT_BIN:-/usr/lib/postgresql/15/bin}
wal_mode=pg_receivexlog
[ "${FIXTURE_WAL:-}" = archive_command ] && wal_mode=archive_command
site=pgsite
[ -f "$checkout/pghoard/pghoard.py" ] || { echo "$checkout is not a pghoard checkout" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (pghoard and PostgreSQL run as postgres)" >&2; exit 1; }

work=$(mktemp -d /tmp/pghoard-fixture.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -f "$work/pghoard.log" ]; then
    echo "failed; pghoard's log ends:" >&2; tail -40 "$work/pghoard.log" >&2
  fi
  for p in "${pids[@]}"; do kill -9 -- "-$p" 2>/dev/null || true; done
  runuser -u postgres -- "$bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== venv for pghoard ($(git -C "$checkout" describe --tags --always 2>/dev/null || echo unknown))"
/usr/bin/python3 -m venv "$work/venv"
# pydantic 2 makes every pghoard upload fail; python-systemd is optional and not on PyPI wheels.
"$work/venv/bin/pip" install -q rohmu zstandard python-snappy cryptography psycopg2-binary \
  python-dateutil requests packaging "pydantic<2"
"$work/venv/bin/pip" install -q --no-deps "$checkout"
chmod -R a+rX "$work/venv"

port=$((20000 + RANDOM % 10000))
http_port=$((port + 1))
server_version=$("$bin/postgres" --version | awk '{print $3}')
basebackup_path=$client/pg_basebackup
if [ "${server_version%%.*}" != "$("$client/psql" --version | awk '{print $3}' | cut -d. -f1)" ]; then
  case " $modes " in *" basic "*|*" pipe "*)
    echo "basic/pipe need pg_basebackup of PostgreSQL ${server_version%%.*}; CLIENT_BIN has another major" >&2; exit 1;;
  esac
  [ "$wal_mode" = archive_command ] || { echo "set FIXTURE_WAL=archive_command for a server of another major than CLIENT_BIN" >&2; exit 1; }
  mkdir -p "$work/shim"
  basebackup_path=$work/shim/pg_basebackup
  printf '#!/bin/sh\n# version check only (local-tar/delta never run it)\n[ "$1" = --version ] && echo "pg_basebackup (PostgreSQL) %s" && exit 0\necho "stand-in pg_basebackup run: $*" >&2; exit 1\n' \
    "$server_version" >"$basebackup_path"
  chmod 755 "$work/shim" "$basebackup_path"
fi
echo "== PostgreSQL $server_version on port $port"
mkdir -p "$work/pg" "$work/sock" "$work/backup" "$work/storage" "$work/log"
# pghoard's delta mode creates and removes basebackup_delta/ beside the data directory.
chown postgres: "$work" "$work/pg" "$work/sock" "$work/backup" "$work/storage" "$work/log"
runuser -u postgres -- "$bin/initdb" --locale=C -A trust -U postgres -D "$work/pg" >/dev/null
cat >>"$work/pg/postgresql.conf" <<EOF
port = $port
listen_addresses = ''
unix_socket_directories = '$work/sock'
wal_level = replica
max_wal_senders = 4
max_replication_slots = 4
EOF
if [ "$wal_mode" = archive_command ]; then
  cat >>"$work/pg/postgresql.conf" <<EOF
archive_mode = on
archive_command = '$work/venv/bin/pghoard_postgres_command --mode archive --port $http_port --site $site --xlog %f'
EOF
fi
runuser -u postgres -- "$bin/pg_ctl" -D "$work/pg" -l "$work/log/pg.log" -w start >/dev/null
psql() { runuser -u postgres -- "$client/psql" -X -q -h "$work/sock" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
ts_clause=
if [ "${FIXTURE_TABLESPACE:-}" = 1 ]; then
  mkdir -p "$work/ts" && chown postgres: "$work/ts"
  psql -c "create tablespace fixture_ts location '$work/ts'"
  ts_clause="tablespace fixture_ts"
fi
psql -c "create table fixture $ts_clause as select g, md5(g::text) from generate_series(1, 1000) g"
# Past initdb's segment (1 MB of zstd): pghoard's streaming and its first backup then start in
# the same segment, so every archived segment is one a kept backup needs.
psql -c "select pg_switch_wal()" >/dev/null

encryption='"encryption_key_id": null,'
if [ "${FIXTURE_ENCRYPT:-}" = 1 ]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$work/private.pem" 2>/dev/null
  openssl pkey -in "$work/private.pem" -pubout -out "$work/public.pem"
  keys=$(/usr/bin/python3 -c 'import json, sys
print(json.dumps({"k1": {"public": open(sys.argv[1]).read(), "private": open(sys.argv[2]).read()}}))' \
    "$work/public.pem" "$work/private.pem")
  encryption="\"encryption_key_id\": \"k1\", \"encryption_keys\": $keys,"
fi

write_config() { # write_config <basebackup_mode>
  cat >"$work/pghoard.json" <<EOF
{
  "backup_location": "$work/backup",
  "json_state_file_path": "$work/backup/state.json",
  "maintenance_mode_file": "$work/backup/maintenance",
  "alert_file_dir": "$work/backup",
  "http_address": "127.0.0.1",
  "http_port": $http_port,
  "log_level": "INFO",
  "compression": {"algorithm": "zstd", "level": 19},
  "backup_sites": {
    "$site": {
      "nodes": [{"host": "$work/sock", "port": $port, "user": "postgres"}],
      "pg_bin_directory": "$bin",
      "pg_data_directory": "$work/pg",
      "pg_basebackup_path": "$basebackup_path",
      "pg_receivexlog_path": "$client/pg_receivewal",
      "active_backup_mode": "$wal_mode",
      "basebackup_mode": "$1",
      "basebackup_delta_mode_min_delta_file_size": ${FIXTURE_DELTA_MIN:-65536},
      "basebackup_interval_hours": null,
      "basebackup_chunk_size": 1048576,
      $encryption
      "object_storage": {"storage_type": "local", "directory": "$work/storage"}
    }
  }
}
EOF
  chown postgres: "$work/pghoard.json"
}

start_pghoard() {
  # Its own process group: pghoard's multiprocessing helpers outlive it otherwise. Started in
  # a directory postgres may write: pghoard's atomic_write puts temporary files in the cwd.
  cd "$work/backup"
  setsid runuser -u postgres -- env PATH="$work/venv/bin:$PATH" "$work/venv/bin/pghoard" \
    "$work/pghoard.json" >>"$work/pghoard.log" 2>&1 &
  pids+=($!)
  cd - >/dev/null
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$http_port/status" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "pghoard did not start:" >&2; tail -50 "$work/pghoard.log" >&2; exit 1
}

stop_pghoard() {
  kill -- "-${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  sleep 1; kill -9 -- "-${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
}

count() { # count <dir>: objects (not sidecars) stored under <dir>
  [ -d "$1" ] || { echo 0; return; }
  find "$1" -type f ! -name '*.metadata' | wc -l
}
controls() { count "$work/storage/$site/basebackup"; }
segments() { count "$work/storage/$site/xlog"; }

backup_now() { # backup_now <mode>: asks the running pghoard for a backup, waits until stored
  local before
  before=$(controls)
  curl -sS -f -X PUT "http://127.0.0.1:$http_port/$site/basebackup" >/dev/null
  for _ in $(seq 1 240); do
    [ "$(controls)" -gt "$before" ] && return 0
    sleep 0.5
  done
  echo "pghoard stored no $1 basebackup:" >&2; tail -50 "$work/pghoard.log" >&2; exit 1
}

switch_wal() { # switch_wal <n>: n more full segments; the last one's name in $last_segment
  for _ in $(seq 1 "$1"); do
    psql -c "insert into fixture select g, md5(g::text) from generate_series(1, 100) g"
    last_segment=$(psql -At -c "select pg_walfile_name(pg_switch_wal())")
  done
}

wait_archived() { # wait_archived <segment>
  for _ in $(seq 1 240); do
    [ -f "$work/storage/$site/xlog/$1" ] && return 0
    sleep 0.5
  done
  echo "pghoard did not archive $1 (it has $(segments) segments):" >&2; tail -50 "$work/pghoard.log" >&2; exit 1
}

taken=0
for mode in $modes; do
  echo "== pghoard: $mode basebackup"
  write_config "$mode"
  start_pghoard
  backup_now "$mode"
  switch_wal 2
  taken=$((taken + 1))
  # Every segment up to the last one switched, so that all rows are in the archive.
  [ "$taken" = "$(wc -w <<<"$modes")" ] && wait_archived "$last_segment"
  stop_pghoard
done

runuser -u postgres -- "$bin/pg_ctl" -D "$work/pg" -m fast stop >/dev/null
mkdir -p "$out"
if [ "${FIXTURE_ENCRYPT:-}" = 1 ]; then
  /usr/bin/python3 -c 'import json, sys; print(json.dumps({"k1": json.loads(sys.argv[1])["k1"]}, indent=1))' \
    "$keys" >"$out/key.json"
fi
tar -C "$work/storage" --sort=name --owner=0 --group=0 --numeric-owner -cf - "$site" \
  | zstd -q -19 -o "$out/archive.tar.zst" -f
echo "== $(du -h "$out/archive.tar.zst" | cut -f1) in $out/archive.tar.zst:"
tar -C "$work/storage" -tvf <(tar -C "$work/storage" -cf - "$site") | awk '{print $3, $6}'
