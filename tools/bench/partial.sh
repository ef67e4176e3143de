#!/usr/bin/env bash
# Partial WAL uploads (issue 16, docs/benchmarks.md, "Partial uploads: bytes per byte of
# WAL"): plain bytes the daemon uploads in partial objects per byte of WAL written, under
# workloads of different WAL rates, with `partial_wal_upload_interval` at its default (5 s):
#   quiet    one one-row insert a second (psql)
#   medium   pgbench -N, 1 client, rate-limited to 200 transactions a second
#   busy     pgbench -N, 8 clients, flat out
#   bulk     insert ... select generate_series, 100000 rows a statement, back to back
# For each: WAL bytes (pg_current_wal_lsn before and after), its rate, the partial bytes and
# objects uploaded (the daemon's counters in its state file), complete segments archived,
# and the ratios: partial bytes / WAL, and 1 + that (every WAL byte also goes up once in its
# complete segment). Alongside, the floor a hard interval bound allows at that rate (a byte
# must go up in a partial object when its segment completes more than the deadline after it
# arrived): 1 + max(0, 1 - deadline * rate / segment size), the deadline being 3/4 of the
# interval. And what the store received: the bytes of every WAL object stored (partial objects
# and complete segments, compressed and encrypted: the daemon's pghoard_total_upload_size
# for type xlog on GET /metrics), from the workload's start until the segment it ended in is
# switched and archived, per byte of WAL. Not part of tools/test.sh or CI.
#
#   tools/bench/partial.sh                 # all four workloads, 60 s each
#   tools/bench/partial.sh quiet busy      # only these
#
# Environment: WALHOARD_BENCH_PARTIAL_SECONDS (per workload, default 60),
# WALHOARD_BENCH_PARTIAL_INTERVAL (default 5), WALHOARD_BENCH_OUT (results directory, default
# target/bench-results/partial-<time>), WALHOARD_BENCH_BIN (a walhoard binary instead of
# `cargo build --release`), WALHOARD_BENCH_KEEP=1 keeps the scratch directory.
# Needs root (PostgreSQL runs as 'postgres'). Local storage, zstd level 1, encrypted.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

SECONDS_PER_PHASE=${WALHOARD_BENCH_PARTIAL_SECONDS:-60}
INTERVAL=${WALHOARD_BENCH_PARTIAL_INTERVAL:-5}
PHASES=${*:-quiet medium busy bulk}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/partial-$(date +%Y%m%d-%H%M%S)}

[ "$(id -u)" = 0 ] || { echo "tools/bench/partial.sh needs root (PostgreSQL runs as 'postgres')" >&2; exit 1; }
for p in $PHASES; do
  case $p in quiet | medium | busy | bulk) ;; *) echo "unknown workload $p" >&2; exit 2 ;; esac
done
command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
pick_walhoard

mkdir -p "$OUT"
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-partial.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
trap 'exit 130' INT TERM

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver || echo ' (modified)')"
  machine_info
  echo "tools: $("$PGBIN/postgres" --version), $WALHOARD"
  echo "settings: seconds=$SECONDS_PER_PHASE interval=$INTERVAL workloads='$PHASES'"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'workload\tseconds\twal_bytes\twal_bytes_per_s\tpartial_bytes\tpartial_objects\tsegments_archived\tpartial_per_wal\tuploaded_per_wal\tfloor_per_wal\tstored_bytes\tstored_per_wal\tload_1_5_15\n' >"$OUT/partial.tsv"

pg_plain_up
"$PGBIN/pgbench" -i -q -s 10 -h "$SOCK" -p "$PGPORT" -U postgres postgres 2>"$ROOT/pg/pgbench-init.log"
psql_ "create table quiet (id bigint, at timestamptz default now())"
psql_ "create table bulk (id bigint, payload text)"

KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")
D=$ROOT/wh
site=$(wh_site wh_amp "$(jq -n --arg dir "$D/archive" '{storage_type: "local", directory: $dir}')" |
  jq --argjson i "$INTERVAL" '. + {partial_wal_upload_interval: $i}')
wh_config_sites "$D" "$(jq -n --argjson s "$site" '{main: $s}')" '{"prometheus": {}}'
psql_ "select pg_create_physical_replication_slot('wh_amp', true)" >/dev/null
WALHOARD_LOG=info "$WALHOARD" daemon --config "$D/walhoard.json" >"$D/daemon.log" 2>&1 &
WH_PID=$!
PIDS+=("$WH_PID")

# stored_wal_bytes: the bytes of WAL objects (partial and complete) the store received.
stored_wal_bytes() {
  curl -fsS "http://127.0.0.1:$(jq -r .http_port "$D/walhoard.json")/metrics" |
    awk '/^pghoard_total_upload_size\{/ && /type="xlog"/ { s += $NF } END { printf "%d", s }'
}
walreceiver() { jq -r ".backup_sites.main.walreceiver.$1 // 0" "$D/state.json" 2>/dev/null || echo 0; }

# caught_up: a segment switch, then until the archive holds everything up to it.
caught_up() {
  local sw target deadline=$((EPOCHSECONDS + 300)) a
  sw=$(psql_ "select pg_switch_wal()")
  target=$((($(lsn2n "$sw") + SEG - 1) / SEG * SEG))
  while :; do
    a=$(walreceiver archived_lsn)
    if [ "$a" != 0 ] && [ "$a" != null ] && [ "$(lsn2n "$a")" -ge "$target" ]; then return 0; fi
    kill -0 "$WH_PID" 2>/dev/null || { log "the daemon exited: $D/daemon.log"; exit 1; }
    [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "not archived up to $(n2lsn "$target") in time"; exit 1; }
    sleep 0.5
  done
}

workload() {
  local until=$((EPOCHSECONDS + SECONDS_PER_PHASE)) n=0
  case $1 in
    quiet)
      while [ "$EPOCHSECONDS" -lt "$until" ]; do
        n=$((n + 1))
        psql_ "insert into quiet (id) values ($n)"
        sleep 1
      done
      ;;
    medium)
      "$PGBIN/pgbench" -n -N -c 1 -R 200 -T "$SECONDS_PER_PHASE" -h "$SOCK" -p "$PGPORT" -U postgres postgres >"$ROOT/medium.out" 2>&1 ;;
    busy)
      "$PGBIN/pgbench" -n -N -c 8 -j 2 -T "$SECONDS_PER_PHASE" -h "$SOCK" -p "$PGPORT" -U postgres postgres >"$ROOT/busy.out" 2>&1 ;;
    bulk)
      while [ "$EPOCHSECONDS" -lt "$until" ]; do
        psql_ "insert into bulk select g, md5(g::text) from generate_series($n + 1, $n + 100000) g"
        n=$((n + 100000))
      done
      ;;
  esac
}

for p in $PHASES; do
  caught_up
  # The switch's own segment is archived; nothing of the next one is pending.
  sleep "$((INTERVAL * 2))"
  s0=$(stored_wal_bytes)
  b0=$(walreceiver partial_bytes_uploaded) o0=$(walreceiver partial_objects_uploaded) f0=$(walreceiver files_archived)
  l0=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
  log "== $p for $SECONDS_PER_PHASE s"
  t0=$(now)
  workload "$p"
  t1=$(now)
  l1=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
  # What is pending when the load stops goes up as partial objects too (it would have to):
  # twice the interval, and a state file write.
  sleep "$((INTERVAL * 2 + 2))"
  b1=$(walreceiver partial_bytes_uploaded) o1=$(walreceiver partial_objects_uploaded) f1=$(walreceiver files_archived)
  wal=$((l1 - l0)) part=$((b1 - b0))
  # Everything of this workload in the store: its last segment switched and archived too.
  caught_up
  sleep 2
  stored=$(($(stored_wal_bytes) - s0))
  awk -v w="$wal" -v pb="$part" -v st="$stored" -v po="$((o1 - o0))" -v f="$((f1 - f0))" -v s="$(elapsed "$t0" "$t1")" \
    -v i="$INTERVAL" -v seg="$SEG" -v p="$p" -v load="$(loads | tr ' ' ,)" 'BEGIN {
      rate = w / s; fl = 1 - 0.75 * i * rate / seg; if (fl < 0) fl = 0
      printf "%s\t%.1f\t%d\t%.0f\t%d\t%d\t%d\t%.3f\t%.3f\t%.3f\t%d\t%.3f\t%s\n", p, s, w, rate, pb, po, f, pb / w, 1 + pb / w, 1 + fl, st, st / w, load
    }' | tee -a "$OUT/partial.tsv" >&2
done
grep -c "reconnect\|connection lost" "$D/daemon.log" | sed 's/^/daemon log lines about reconnects: /' >&2 || true
column -t -s $'\t' "$OUT/partial.tsv" >&2
log "results in $OUT"
