# shellcheck shell=bash
# Helpers for tools/bench/run.sh: the throw-away primary, LSN arithmetic, timing, results.
# Sourced, not run. Everything lives under $ROOT (a mktemp directory); every process started
# here is recorded in $PIDS and stopped by cleanup.

PGBIN=/usr/lib/postgresql/15/bin
SEG=16777216
PIDS=()

log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "$(load1)" "$*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
loads() { cut -d' ' -f1-3 /proc/loadavg; }
now() { echo "$EPOCHREALTIME"; }

# Waiting loops in timed phases fork nothing: a curl | jq poll costs ~25 ms of CPU, and ten
# a second took half a second of wall time from a 4 s drain on two cores (docs/benchmarks.md).
# nap <seconds>: sleep without a process (a read that times out on a FIFO nobody writes).
NAP_FD=
nap() {
  if [ -z "$NAP_FD" ]; then
    local f
    f=$(mktemp -u "${TMPDIR:-/tmp}/walhoard-nap.XXXXXX")
    mkfifo "$f"
    exec {NAP_FD}<>"$f"
    rm -f "$f"
  fi
  read -r -t "$1" -u "$NAP_FD" _ || true
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# LSN "X/Y" <-> byte position.
lsn2n() { local hi=${1%/*} lo=${1#*/}; echo $(((16#$hi << 32) + 16#$lo)); }
n2lsn() { printf '%X/%X\n' $(($1 >> 32)) $(($1 & 0xffffffff)); }

as_pg() { runuser -u postgres -- "$@"; }
psql_() { "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PGPORT" -U postgres -d postgres -c "$1"; }

# pg_up <scale> <wal MiB>: a fresh primary whose WAL since the slot position is >= <wal MiB>.
# Sets PGDATA SOCK PGPORT START_N (first byte of the backlog, a segment start), TARGET_N (its
# end, a segment boundary), FIRST_SEG and LAST_SEG (its first and last segments), and SLOTS_MADE.
pg_up() {
  local scale=$1 wal_mib=$2 slots=$3
  PGDATA=$ROOT/pg/data SOCK=$ROOT/pg/sock PGPORT=$(free_port)
  mkdir -p "$PGDATA" "$SOCK"
  chown -R postgres: "$ROOT/pg"
  chmod 700 "$PGDATA"
  as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -N >"$ROOT/pg/initdb.log"
  cat >>"$PGDATA/postgresql.conf" <<EOF
# tools/bench
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PGPORT
wal_level = replica
max_wal_senders = ${PG_MAX_WAL_SENDERS:-20}
max_replication_slots = ${PG_MAX_SLOTS:-40}
max_wal_size = 64GB
checkpoint_timeout = 1h
shared_buffers = 512MB
archive_mode = on
archive_command = ''
log_min_messages = warning
EOF
  printf 'local all all trust\nlocal replication all trust\n' >"$PGDATA/pg_hba.conf"
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$ROOT/pg/server.log" -w -s start
  log "primary up: PostgreSQL $(psql_ 'show server_version'), socket $SOCK port $PGPORT"

  # The slots are created back to back before the load, so they all hold the same backlog.
  psql_ "select pg_switch_wal()" >/dev/null
  local s
  for s in $slots; do psql_ "select pg_create_physical_replication_slot('$s', true)" >/dev/null; done
  local start
  start=$(psql_ "select restart_lsn from pg_replication_slots where slot_name = '${slots%% *}'")
  START_N=$(($(lsn2n "$start") / SEG * SEG))
  # Segments before the backlog are not part of what pgBackRest is timed on.
  local f
  FIRST_SEG=$(psql_ "select pg_walfile_name('$(n2lsn $((START_N + 1)))')")
  for f in "$PGDATA"/pg_wal/archive_status/*.ready; do
    [ -e "$f" ] || continue
    local b=${f##*/}; b=${b%.ready}
    [[ "$b" < "$FIRST_SEG" ]] && mv "$f" "${f%.ready}.done"
  done

  log "load: pgbench -i -s $scale"
  "$PGBIN/pgbench" -i -q -s "$scale" -h "$SOCK" -p "$PGPORT" -U postgres postgres 2>"$ROOT/pg/pgbench-init.log"
  # Then a bulk load (md5 text compresses far less than pgbench's blank filler) until the
  # backlog reaches the size asked for.
  psql_ "create table bulk (id bigint, payload text)"
  local n=0 cur
  while :; do
    cur=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
    [ $((cur - START_N)) -ge $((wal_mib * 1048576)) ] && break
    psql_ "insert into bulk select g, md5(g::text) || md5((g + 1)::text) from generate_series($n + 1, $n + 1000000) g"
    n=$((n + 1000000))
  done
  psql_ "checkpoint" >/dev/null
  local sw
  sw=$(psql_ "select pg_switch_wal()")
  TARGET_N=$((($(lsn2n "$sw") + SEG - 1) / SEG * SEG))
  LAST_SEG=$(psql_ "select pg_walfile_name('$sw')")
  # WAL past the boundary, so that pg_receivewal --endpos (which stops once it has received
  # beyond endpos) sees some.
  psql_ "checkpoint" >/dev/null
  DB_BYTES=$(psql_ "select pg_database_size('postgres')")
  BACKLOG=$((TARGET_N - START_N))
  log "backlog $(n2lsn $START_N) .. $(n2lsn $TARGET_N) = $((BACKLOG / 1048576)) MiB (last segment $LAST_SEG); database $((DB_BYTES / 1048576)) MiB; bulk rows $n"
}

# pg_plain_up: a fresh primary for pgbench (tools/bench/sync.sh, partial.sh), fsync and
# synchronous_commit at their defaults (on), no backlog. Sets PGDATA SOCK PGPORT.
pg_plain_up() {
  PGDATA=$ROOT/pg/data SOCK=$ROOT/pg/sock PGPORT=$(free_port)
  mkdir -p "$PGDATA" "$SOCK"
  chown -R postgres: "$ROOT/pg"
  chmod 700 "$PGDATA"
  as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -N >"$ROOT/pg/initdb.log"
  cat >>"$PGDATA/postgresql.conf" <<EOF
# tools/bench
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PGPORT
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_wal_size = 4GB
shared_buffers = 256MB
log_min_messages = warning
EOF
  printf 'local all all trust\nlocal replication all trust\n' >"$PGDATA/pg_hba.conf"
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$ROOT/pg/server.log" -w -s start
  log "primary up: PostgreSQL $(psql_ 'show server_version'), socket $SOCK port $PGPORT"
}

# warm_backlog: reads the backlog's segments from pg_wal, so that every drain run starts with
# them in the page cache. This VM runs DAMON page-out (kdamond: regions with at most one access
# per 5 s for 60 s are reclaimed), and WAL read once per round of runs looks cold to it: without
# this, whichever tool ran first in a round read part of the backlog from disk, which made
# pg_receivewal 2-3x slower (docs/benchmarks.md).
warm_backlog() {
  local f b
  for f in "$PGDATA"/pg_wal/*; do
    b=${f##*/}
    [ ${#b} = 24 ] || continue
    if [[ ! "$b" < "$FIRST_SEG" ]] && [[ ! "$b" > "$LAST_SEG" ]]; then cat "$f"; fi
  done >/dev/null
}

# prefault_memory <bytes>: writes and deletes a file of that size, then syncs, so that a timed
# run starts with no dirty pages and with that much free memory the VM already has backing
# for. This VM reports freed memory to its host (virtio-balloon free page reporting), which
# makes the first touch of a reported page expensive: pg_receivewal, which writes the whole
# backlog into the page cache, took 3.4-4.6 s of system time on such memory instead of 1.9 s,
# and 2-3x as long (docs/benchmarks.md). Every drain run gets the same.
prefault_memory() {
  head -c "$1" /dev/zero >"$ROOT/prefault"
  rm -f "$ROOT/prefault"
  sync
}

pg_down() {
  [ -n "${PGDATA:-}" ] && [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -s stop || true
}

# Kills a process we started, by its pid, and waits for it.
stop_pid() {
  local pid=$1 sig=${2:-TERM}
  kill -"$sig" "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  pg_down
  if [ -n "${ROOT:-}" ] && [ -z "${WALHOARD_BENCH_KEEP:-}" ]; then rm -rf "$ROOT"; fi
}

# result <phase> <tool> <rep> <seconds> <bytes processed> <stored bytes> <max RSS KiB>
result() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SCALE_LABEL" "$@" "$(loads | tr ' ' ,)" >>"$OUT/results.tsv"
  log "result: $*"
}

# CPU seconds (user + system) a running process has used, from /proc/<pid>/stat.
proc_cpu() { awk '{ c = $0; sub(/^.*\) /, "", c); split(c, f, " "); printf "%.2f", (f[12] + f[13]) / 100 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU seconds of the postmaster's exited children (walsenders once they are gone).
reaped_cpu() { awk '{ c = $0; sub(/^.*\) /, "", c); split(c, f, " "); printf "%.2f", (f[14] + f[15]) / 100 }' "/proc/$(head -1 "$PGDATA/postmaster.pid")/stat"; }
# cpu_result <tool> <rep> <the tool's CPU s> <walsender CPU s> <other helper's CPU s, or ->
cpu_result() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$SCALE_LABEL" "$@" >>"$OUT/cpu.tsv"
  log "cpu: $*"
}

# VmHWM (peak RSS) of a running process, in KiB.
vmhwm() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# "Maximum resident set size" from a /usr/bin/time -v output file, in KiB.
time_rss() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1"; }

# wh_site <slot> <object_storage JSON>: one site streaming from the primary through <slot>,
# encrypted with $PUBLIC, no scheduled basebackups.
wh_site() {
  jq -n --arg sock "$SOCK" --argjson port "$PGPORT" --arg slot "$1" --argjson storage "$2" \
    --arg pub "$PUBLIC" '{
      nodes: [{host: $sock, port: $port, user: "postgres", slot: $slot}],
      object_storage: $storage,
      encryption_key_id: "k1",
      encryption_keys: {k1: {public: $pub}},
      basebackup_interval_hours: null
    }'
}

# wh_config_sites <dir> <backup_sites JSON> [top-level JSON merged in]: <dir>/walhoard.json
# with its spool, state, alerts and a free HTTP port in <dir>, zstd level 1.
wh_config_sites() {
  local d=$1 sites=$2 extra=${3:-'{}'}
  mkdir -p "$d"
  jq -n --arg d "$d" --argjson sites "$sites" --argjson extra "$extra" \
    --argjson http "$(free_port)" '{
      backup_location: ($d + "/spool"),
      json_state_file_path: ($d + "/state.json"),
      alert_file_dir: $d,
      maintenance_mode_file: ($d + "/maintenance_mode_file"),
      http_port: $http,
      compression: {algorithm: "zstd", level: 1},
      backup_sites: $sites
    } + $extra' >"$d/walhoard.json"
}

# machine_info: the lines every results directory's machine.txt starts with.
# pick_walhoard: sets WALHOARD to WALHOARD_BENCH_BIN as is, else to a release build in
# CARGO_TARGET_DIR (default target/; a separate one avoids waiting on another build's lock).
# Needs $repo.
pick_walhoard() {
  if [ -n "${WALHOARD_BENCH_BIN:-}" ]; then
    WALHOARD=$(cd "$(dirname "$WALHOARD_BENCH_BIN")" && pwd)/$(basename "$WALHOARD_BENCH_BIN")
  else
    (cd "$repo" && cargo build --release --locked --bin walhoard)
    local target_dir=${CARGO_TARGET_DIR:-target}
    case $target_dir in /*) ;; *) target_dir=$repo/$target_dir ;; esac
    WALHOARD=$target_dir/release/walhoard
  fi
  [ -x "$WALHOARD" ] || { echo "no walhoard binary at $WALHOARD" >&2; exit 1; }
}

machine_info() {
  echo "nproc: $(nproc)"
  echo "cpu: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
  echo "memory: $(free -g | awk '/^Mem:/ { print $2 " GiB total, " $7 " GiB available" }')"
}

# --- pgBackRest (tools/bench/run.sh, tools/bench/incremental.sh) ---------------------------------------------------------------------------
PGBR=
pgbr() { as_pg pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench "$@"; }
# pgbr_setup [s3]: a repository in $ROOT/pgbr (or, with s3, in s3s-fs behind the TLS proxy,
# which must be running: s3_start <dir> tls), and the stanza (again, on an emptied repository)
pgbr_setup() {
  PGBR=$ROOT/pgbr
  rm -rf "$PGBR"
  mkdir -p "$PGBR"/{repo,spool,lock,log}
  local repo="repo1-path=$PGBR/repo"
  if [ "${1:-}" = s3 ]; then
    repo="repo1-type=s3
repo1-path=/pgbr
repo1-s3-bucket=archive
repo1-s3-endpoint=localhost
repo1-storage-port=$TLS_PORT
repo1-s3-region=us-east-1
repo1-s3-key=bench-ak
repo1-s3-key-secret=bench-secret-key
repo1-s3-uri-style=path
repo1-storage-ca-file=$ROOT/tls/ca.pem"
  fi
  cat >"$PGBR/pgbackrest.conf" <<EOF
[global]
$repo
repo1-retention-full=1
spool-path=$PGBR/spool
lock-path=$PGBR/lock
log-path=$PGBR/log
log-level-console=warn
log-level-file=info
archive-async=y
process-max=2
compress-type=zst
compress-level=1
start-fast=y

[bench]
pg1-path=$PGDATA
pg1-socket-path=$SOCK
pg1-port=$PGPORT
pg1-user=postgres
EOF
  chown -R postgres: "$PGBR"
  pgbr stanza-create >/dev/null
  # The archive_command that pushes into this repository.
  PGBR_ARCHIVE="pgbackrest --config=$PGBR/pgbackrest.conf --stanza=bench archive-push %p"
}
set_archive_command() {
  psql_ "alter system set archive_command = '$1'" && psql_ "select pg_reload_conf()" >/dev/null
}
