#!/usr/bin/env bash
# Bytes and time of a full and an incremental basebackup (basebackup_mode "incremental") on
# PostgreSQL 17: pgbench -i at WALHOARD_BENCH_SCALE (default 10), VACUUM FREEZE, a full backup,
# WALHOARD_BENCH_TX pgbench simple-update transactions (default 160: about 1 % of
# pgbench_accounts' blocks at scale 10), an incremental backup; prints both listings.
# Needs root (PostgreSQL runs as 'postgres'), tools/install-pg.sh 17, Debian's pgbench and psql,
# and a walhoard binary (WALHOARD_BENCH_BIN, default target/debug/walhoard). Not part of CI.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
B=${WALHOARD_CACHE:-/var/cache/walhoard}/pg/17/bin
W=${WALHOARD_BENCH_BIN:-$repo/target/debug/walhoard}
PG15=/usr/lib/postgresql/15/bin
SCALE=${WALHOARD_BENCH_SCALE:-10}
TX=${WALHOARD_BENCH_TX:-160}
PORT=${WALHOARD_BENCH_PORT:-55417}
D=$(mktemp -d)
chown postgres "$D"
trap 'runuser -u postgres -- "$B/pg_ctl" -D "$D/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$D"' EXIT
runuser -u postgres -- "$B/initdb" -D "$D/data" --locale=C -A trust -U postgres >/dev/null
cat >> "$D/data/postgresql.conf" <<C
port = $PORT
unix_socket_directories = '$D'
summarize_wal = on
listen_addresses = ''
C
runuser -u postgres -- "$B/pg_ctl" -D "$D/data" -l "$D/log" -w start >/dev/null
"$PG15/pgbench" -h "$D" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres
"$PG15/psql" -X -h "$D" -p "$PORT" -U postgres -Atc "vacuum freeze" -c "checkpoint" postgres
cat > "$D/w.json" <<J
{"backup_location": "$D/state", "http_port": $((PORT + 1)), "compression": {"algorithm": "zstd"},
 "backup_sites": {"main": {"basebackup_mode": "incremental", "active_backup_mode": "archive_command",
  "nodes": [{"host": "$D", "port": $PORT, "user": "postgres", "dbname": "postgres"}],
  "object_storage": {"storage_type": "local", "directory": "$D/archive"}}}}
J
t0=$EPOCHREALTIME; "$W" basebackup --config "$D/w.json" --site main; t1=$EPOCHREALTIME
echo "full: $(echo "$t1 - $t0" | bc) s"
"$PG15/pgbench" -h "$D" -p "$PORT" -U postgres -n -t "$TX" -c 1 -b simple-update postgres | grep "actually processed"
t0=$EPOCHREALTIME; "$W" basebackup --config "$D/w.json" --site main; t1=$EPOCHREALTIME
echo "incremental: $(echo "$t1 - $t0" | bc) s"
"$W" restore list-basebackups --config "$D/w.json" --site main
