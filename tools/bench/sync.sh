#!/usr/bin/env bash
# What a synchronous standby costs the primary's commits (issue 16, docs/benchmarks.md,
# "Synchronous archive"): pgbench TPS and commit latency (p50/p99 of the per-transaction
# latencies of `pgbench --log`, and the mean of the END statement from `pgbench -r`) at -c 1
# and -c 8, small transactions (`pgbench -N`: one account update, one select, one history
# insert per commit), with
#   none              no synchronous standby
#   receivewal        pg_receivewal --synchronous as the synchronous standby
#   walhoard-local    walhoard with `synchronous_archive: true` into local storage
#   walhoard-s3       the same into s3s-fs
# Not part of tools/test.sh or CI.
#
#   tools/bench/sync.sh                        # all four cases, -c 1 and -c 8, 20 s each
#   tools/bench/sync.sh none receivewal        # only these cases
#
# Environment: WALHOARD_BENCH_SYNC_SECONDS (pgbench duration per run, default 20; short, the
# machine is shared), WALHOARD_BENCH_SYNC_CLIENTS (default "1 8"), WALHOARD_BENCH_SCALE
# (pgbench scale, default 10), WALHOARD_BENCH_OUT (results directory, default
# target/bench-results/sync-<time>), WALHOARD_BENCH_BIN (a walhoard binary instead of
# `cargo build --release`), WALHOARD_BENCH_KEEP=1 keeps the scratch directory.
#
# walhoard streams as application_name `walhoard_main` (site `main`), which is what
# synchronous_standby_names names; a case counts only once pg_stat_replication shows that
# standby as `sync`. Needs root (PostgreSQL runs as 'postgres'). Everything lives under one
# mktemp directory; all traffic is on a unix socket or 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

SECONDS_PER_RUN=${WALHOARD_BENCH_SYNC_SECONDS:-20}
CLIENTS=${WALHOARD_BENCH_SYNC_CLIENTS:-1 8}
SCALE=${WALHOARD_BENCH_SCALE:-10}
CASES=${*:-none receivewal walhoard-local walhoard-s3}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/sync-$(date +%Y%m%d-%H%M%S)}
SCALE_LABEL=$SCALE

[ "$(id -u)" = 0 ] || { echo "tools/bench/sync.sh needs root (PostgreSQL runs as 'postgres')" >&2; exit 1; }
for c in $CASES; do
  case $c in none | receivewal | walhoard-local | walhoard-s3) ;; *) echo "unknown case $c" >&2; exit 2 ;; esac
done
command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres

cache=${WALHOARD_CACHE:-/var/cache/walhoard}
S3S_FS=${WALHOARD_S3S_FS:-$cache/s3s-fs/bin/s3s-fs}
if [[ " $CASES " == *" walhoard-s3 "* ]] && [ ! -x "$S3S_FS" ]; then
  echo "== installing s3s-fs into $cache/s3s-fs" >&2
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$cache/s3s-fs"
fi
if [[ " $CASES " == *" walhoard-"* ]]; then
  pick_walhoard
fi

mkdir -p "$OUT"
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-sync.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
trap 'exit 130' INT TERM

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver || echo ' (modified)')"
  machine_info
  echo "tools: $("$PGBIN/postgres" --version), ${WALHOARD:-no walhoard}"
  echo "settings: seconds=$SECONDS_PER_RUN clients='$CLIENTS' scale=$SCALE cases='$CASES'"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'case\tclients\tseconds\ttransactions\ttps\tlat_p50_ms\tlat_p99_ms\tlat_max_ms\tover_100ms\tcommit_avg_ms\tload_1_5_15\n' >"$OUT/sync.tsv"

pg_plain_up
"$PGBIN/pgbench" -i -q -s "$SCALE" -h "$SOCK" -p "$PGPORT" -U postgres postgres 2>"$ROOT/pg/pgbench-init.log"

KEYS=
if [[ " $CASES " == *" walhoard-"* ]]; then
  KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
  PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")
fi

# s3_up <dir>: s3s-fs with bucket 'archive' in <dir>; sets S3_PID S3_PORT.
s3_up() {
  mkdir -p "$1/archive"
  S3_PORT=$(free_port)
  "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key bench-ak --secret-key bench-secret-key "$1" >/dev/null 2>&1 &
  S3_PID=$!
  PIDS+=("$S3_PID")
  local _
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$S3_PORT") 2>/dev/null && return 0; sleep 0.1; done
  log "s3s-fs did not listen on port $S3_PORT"
  return 1
}

# drop_slot <slot>: once its walsender is gone.
drop_slot() {
  local _
  for _ in $(seq 100); do
    [ "$(psql_ "select active from pg_replication_slots where slot_name = '$1'")" = t ] || break
    sleep 0.1
  done
  psql_ "select pg_drop_replication_slot('$1')" >/dev/null
}

# sync_names <names>: synchronous_standby_names, reloaded.
sync_names() {
  psql_ "alter system set synchronous_standby_names = '$1'" >/dev/null
  psql_ "select pg_reload_conf()" >/dev/null
}

# wait_sync <application_name> <pid>: until pg_stat_replication shows it as the sync standby.
wait_sync() {
  local deadline=$((EPOCHSECONDS + 60)) st
  while :; do
    st=$(psql_ "select sync_state from pg_stat_replication where application_name = '$1'")
    [ "$st" = sync ] && return 0
    kill -0 "$2" 2>/dev/null || { log "$1 exited before it became the synchronous standby"; return 1; }
    [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "$1 never became the synchronous standby (state '$st')"; return 1; }
    sleep 0.2
  done
}

# run_pgbench <case> <clients>: one timed run, a line in sync.tsv.
run_pgbench() {
  local c=$1 n=$2 d=$ROOT/runs/$1-c$2
  mkdir -p "$d"
  chmod 777 "$d"
  psql_ "checkpoint" >/dev/null
  "$PGBIN/pgbench" -n -N -c "$n" -j "$n" -T "$SECONDS_PER_RUN" -r --log --log-prefix="$d/tx" \
    -h "$SOCK" -p "$PGPORT" -U postgres postgres >"$d/pgbench.out" 2>"$d/pgbench.err"
  local tps txs commit p50 p99 max slow
  tps=$(awk '/^tps = / { print $3; exit }' "$d/pgbench.out")
  txs=$(awk -F': ' '/number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$d/pgbench.out")
  # `-r`: the mean latency of each statement; END is the commit.
  commit=$(awk '$NF == "END;" { print $1 }' "$d/pgbench.out" | tail -1)
  # `--log`: one line per transaction, the third field its latency in microseconds.
  # Also the slowest, and how many took over 100 ms (stalls the percentiles hide).
  read -r p50 p99 max slow < <(cat "$d"/tx.* | awk '{ print $3 }' | sort -n | awk '
    { v[NR] = $1; if ($1 > 100000) slow++ }
    END {
      if (NR == 0) { print "- - - -"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      printf "%.3f %.3f %.3f %d\n", v[i50] / 1000, v[i99] / 1000, v[NR] / 1000, slow
    }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$n" "$SECONDS_PER_RUN" "$txs" "$tps" "$p50" "$p99" "$max" "$slow" "$commit" \
    "$(loads | tr ' ' ,)" >>"$OUT/sync.tsv"
  log "result: $c -c $n: $tps tps, p50 $p50 ms, p99 $p99 ms, max $max ms ($slow over 100 ms), commit mean $commit ms ($txs transactions)"
  rm -f "$d"/tx.*
}

run_case() {
  local c=$1 n
  for n in $CLIENTS; do run_pgbench "$c" "$n"; done
}

# --- the cases ----------------------------------------------------------------------------
case_none() {
  sync_names ''
  run_case none
}

case_receivewal() {
  local d=$ROOT/receivewal pid
  mkdir -p "$d"
  psql_ "select pg_create_physical_replication_slot('bench_rw', true)" >/dev/null
  "$PGBIN/pg_receivewal" -D "$d" -S bench_rw --synchronous --no-loop \
    -d "host=$SOCK port=$PGPORT user=postgres application_name=bench_rw" >"$ROOT/receivewal.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  sync_names bench_rw
  wait_sync bench_rw "$pid"
  run_case receivewal
  sync_names ''
  stop_pid "$pid"
  drop_slot bench_rw
}

# case_walhoard <case> <object_storage JSON>
case_walhoard() {
  local c=$1 storage=$2 d=$ROOT/$1 site
  site=$(wh_site wh_sync "$storage" | jq '. + {synchronous_archive: true}')
  wh_config_sites "$d" "$(jq -n --argjson s "$site" '{main: $s}')"
  psql_ "select pg_create_physical_replication_slot('wh_sync', true)" >/dev/null
  WALHOARD_LOG=info "$WALHOARD" daemon --config "$d/walhoard.json" >"$d/daemon.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  sync_names walhoard_main
  if wait_sync walhoard_main "$pid"; then
    run_case "$c"
  else
    log "$c: skipped; daemon log $d/daemon.log:"
    tail -20 "$d/daemon.log" >&2
  fi
  sync_names ''
  stop_pid "$pid"
  drop_slot wh_sync
  du -sb "$d" | awk '{ print "stored: " $1 " bytes" }' >&2
}

for c in $CASES; do
  log "== $c"
  case $c in
    none) case_none ;;
    receivewal) case_receivewal ;;
    walhoard-local) case_walhoard "$c" "$(jq -n --arg dir "$ROOT/$c/archive" '{storage_type: "local", directory: $dir}')" ;;
    walhoard-s3)
      s3_up "$ROOT/s3"
      case_walhoard "$c" "$(jq -n --argjson port "$S3_PORT" '{storage_type: "s3", bucket_name: "archive",
        region: "us-east-1", aws_access_key_id: "bench-ak", aws_secret_access_key: "bench-secret-key",
        host: "127.0.0.1", port: $port, is_secure: false}')"
      stop_pid "$S3_PID"
      ;;
  esac
done
column -t -s $'\t' "$OUT/sync.tsv" >&2
log "results in $OUT"
