#!/usr/bin/env bash
# One walhoard daemon, many sites on one PostgreSQL server (issue 19; docs/benchmarks.md,
# "Many sites"). Every site has its own slot, all created before the load, so each site
# drains the same backlog into its own prefix of one local archive (zstd 1, encrypted).
# For each site count: wall time until every site's archive reached the backlog's end, the
# daemon's peak RSS (VmHWM), its CPU seconds (user + system) per GB of WAL archived, and the
# aggregate drain rate, and its RSS after IDLE_SECONDS with nothing to do (what the burst leaves
# allocated). Then the idle cost: a daemon restarted on the drained archives (nothing
# to do) is left alone for WALHOARD_BENCH_IDLE_SECONDS; its RSS and CPU. Last, idle from the
# start: sites on new slots with empty archives, connected and waiting.
#
#   tools/bench/sites.sh                    # 1, 10 and 50 sites, 256 MiB of WAL each
#
# Environment: WALHOARD_BENCH_SITES (site counts, default "1 10 50"), WALHOARD_BENCH_WAL_MIB
# (backlog, default 256), WALHOARD_BENCH_BUDGET_MIB (wal_buffer_memory_mib, default: the
# daemon's default), WALHOARD_BENCH_IDLE_SECONDS (default 30), WALHOARD_BENCH_BIN (a binary;
# else `cargo build --release`), WALHOARD_BENCH_OUT (default target/bench-results/sites-<time>).
# Needs root (PostgreSQL runs as 'postgres').
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

COUNTS=${WALHOARD_BENCH_SITES:-1 10 50}
WAL_MIB=${WALHOARD_BENCH_WAL_MIB:-256}
IDLE_SECONDS=${WALHOARD_BENCH_IDLE_SECONDS:-30}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/sites-$(date +%Y%m%d-%H%M%S)}
SCALE_LABEL=sites
[ "$(id -u)" = 0 ] || { echo "tools/bench/sites.sh needs root (PostgreSQL runs as 'postgres')" >&2; exit 1; }
for c in jq python3; do command -v "$c" >/dev/null || { echo "needs $c" >&2; exit 1; }; done
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
pick_walhoard

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-sites.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
mkdir -p "$OUT"
total=0
for n in $COUNTS; do total=$((total + n)); done
max=0
for n in $COUNTS; do [ "$n" -gt "$max" ] && max=$n; done
{
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver || echo ' (modified)')"
  machine_info
  echo "settings: sites='$COUNTS' wal_mib=$WAL_MIB budget_mib=${WALHOARD_BENCH_BUDGET_MIB:-default} idle_seconds=$IDLE_SECONDS"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'sites\tseconds\twal_bytes_archived\tpeak_rss_mib\tcpu_s\tcpu_s_per_gb\tagg_mib_per_s\tload_1_5_15\trss_after_idle_mib\n' >"$OUT/drain.tsv"
printf 'sites\tidle_rss_mib\tidle_cpu_s\tidle_seconds\n' >"$OUT/idle.tsv"
printf 'sites\tfresh_idle_rss_mib\tidle_cpu_s\tidle_seconds\n' >"$OUT/idle-fresh.tsv"

KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")

# One slot per site of every run, created back to back before the load: all hold the backlog.
slots=()
for n in $COUNTS; do for i in $(seq "$n"); do slots+=("n${n}_$i"); done; done
PG_MAX_WAL_SENDERS=$((max + 5)) PG_MAX_SLOTS=$((2 * total + 5)) pg_up 1 "$WAL_MIB" "${slots[*]}"

# sites_config <dir> <count> [slot prefix]: sites s1..s<count> on slots <prefix><count>_<i>
# (prefix n: the drain's), one local archive.
sites_config() {
  local d=$1 n=$2 prefix=${3:-n} budget='{}' sites='{}' i storage
  storage=$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')
  for i in $(seq "$n"); do
    sites=$(jq --arg k "s$i" --argjson v "$(wh_site "${prefix}${n}_$i" "$storage")" '. + {($k): $v}' <<<"$sites")
  done
  [ -n "${WALHOARD_BENCH_BUDGET_MIB:-}" ] && budget=$(jq -n --argjson m "$WALHOARD_BENCH_BUDGET_MIB" '{wal_buffer_memory_mib: $m}')
  wh_config_sites "$d" "$sites" "$budget"
}

# all_archived <http port> <target>: whether every site's archived_lsn reached <target>.
all_archived() {
  local lsns l
  lsns=$(curl -s "http://127.0.0.1:$1/status" | jq -r '.backup_sites[].walreceiver.archived_lsn // "0/0"' 2>/dev/null) || return 1
  [ -n "$lsns" ] || return 1
  for l in $lsns; do [ "$(lsn2n "$l")" -ge "$2" ] || return 1; done
}

# idle_run <dir> <sites> <tsv> <label>: the daemon of <dir> left alone 5 + IDLE_SECONDS s; its
# VmRSS and CPU over the last IDLE_SECONDS into <tsv>. Every site must be connected.
idle_run() {
  local d=$1 n=$2 c0 c1 irss connected pid
  WALHOARD_LOG=warn "$WALHOARD" daemon --config "$d/walhoard.json" >>"$d/idle.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  nap 5
  c0=$(proc_cpu "$pid")
  nap "$IDLE_SECONDS"
  c1=$(proc_cpu "$pid")
  irss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  connected=$(jq '[.backup_sites[].walreceiver.connected | select(.)] | length' "$d/state.json")
  stop_pid "$pid"
  [ "$connected" = "$n" ] || { log "$4: $connected of $n sites connected; see $d/idle.log"; exit 1; }
  printf '%s\t%s\t%s\t%s\n' "$n" "$(awk -v k="$irss" 'BEGIN { printf "%.1f", k / 1024 }')" \
    "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" "$IDLE_SECONDS" >>"$3"
  log "$4: $n sites: RSS $((irss / 1024)) MiB"
}

for n in $COUNTS; do
  d=$ROOT/sites-$n
  sites_config "$d" "$n"
  port=$(jq -r .http_port "$d/walhoard.json")
  warm_backlog
  t0=$(now)
  WALHOARD_LOG=info "$WALHOARD" daemon --config "$d/walhoard.json" >"$d/daemon.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  deadline=$((EPOCHSECONDS + 3600))
  # Polled every half second with curl + jq: a few ms of CPU each, outside the daemon.
  until all_archived "$port" "$TARGET_N"; do
    kill -0 "$pid" 2>/dev/null || { log "daemon exited; see $d/daemon.log"; exit 1; }
    [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "$n sites: not archived in time"; exit 1; }
    nap 0.5
  done
  t1=$(now)
  rss=$(vmhwm "$pid")
  cpu=$(proc_cpu "$pid")
  # The same daemon left idle after the drain: what stays of the burst's memory.
  nap "$IDLE_SECONDS"
  after=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  stop_pid "$pid"
  for i in $(seq "$n"); do
    [ -e "$d/archive/s$i/xlog/$LAST_SEG" ] || { log "site s$i: $LAST_SEG not archived"; exit 1; }
  done
  bytes=$((BACKLOG * n))
  secs=$(elapsed "$t0" "$t1")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$secs" "$bytes" "$((rss / 1024))" "$cpu" \
    "$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { printf "%.2f", c / (b / 1e9) }')" \
    "$(awk -v s="$secs" -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 / s }')" "$(loads | tr ' ' ,)" \
    "$((after / 1024))" >>"$OUT/drain.tsv"
  log "drain: $n sites: $secs s, peak RSS $((rss / 1024)) MiB, CPU $cpu s, RSS $((after / 1024)) MiB after $IDLE_SECONDS s idle"

  # Idle: restarted on archives that hold the whole backlog, nothing new written.
  idle_run "$d" "$n" "$OUT/idle.tsv" "idle after the drain"
  rm -rf "$d/archive" "$d/spool"
  for i in $(seq "$n"); do psql_ "select pg_drop_replication_slot('n${n}_$i')" >/dev/null; done
done
# Idle from the start: new slots at the end of WAL and empty archives, so the sites connect
# and wait; nothing to resume, nothing to look up. What a site costs while it has no work.
for n in $COUNTS; do
  d=$ROOT/fresh-$n
  for i in $(seq "$n"); do psql_ "select pg_create_physical_replication_slot('f${n}_$i', true)" >/dev/null; done
  sites_config "$d" "$n" f
  idle_run "$d" "$n" "$OUT/idle-fresh.tsv" "idle from the start"
  for i in $(seq "$n"); do psql_ "select pg_drop_replication_slot('f${n}_$i')" >/dev/null; done
done
echo "== drain" >&2
column -t -s $'\t' "$OUT/drain.tsv" >&2
echo "== idle" >&2
column -t -s $'\t' "$OUT/idle.tsv" >&2
echo "== idle from the start" >&2
column -t -s $'\t' "$OUT/idle-fresh.tsv" >&2
echo "results in $OUT" >&2
