#!/usr/bin/env bash
# pghoard against walhoard with many sites on one PostgreSQL server (issue 19; docs/benchmarks.md,
# "Many sites"). One pghoard daemon with N backup sites in `active_backup_mode: pg_receivexlog`
# (pghoard spawns one pg_receivewal per site), and one walhoard daemon with the same N sites,
# each site on its own replication slot, all slots created before the load, so every site
# drains the same backlog into its own prefix of one local archive; zstd level 1 and
# encryption (one 3072-bit key) for both, as in tools/bench/sites.sh. Runs alternate between
# the tools (pghoard, walhoard, pghoard, ...).
#
# Measured for the daemon's whole process tree (pghoard: the Python process with its
# compression and transfer threads, the multiprocessing forkserver and manager, and the
# pg_receivewal children; walhoard: one process), the same way for both tools:
#   - drain: wall time from the daemon's start until every site's archive holds every segment
#     of the backlog, each with its .metadata sidecar (pghoard writes the sidecar after the
#     object, walhoard before it, so both must exist); polled every 0.5 s without forking;
#   - peak RSS: the largest sum of VmRSS over the tree, sampled at each poll, and the sum of
#     the tree's VmHWM at the end (an upper bound: the processes peak at different times);
#   - CPU: user + system seconds of every process in the tree (all threads) plus what the root
#     reaped from exited children (cutime + cstime), at the end of the drain, per GB archived;
#   - after the drain, the same daemon left alone IDLE_SECONDS: tree VmRSS and Pss;
#   - idle from the start: 1 and N sites on new slots with empty archives, every slot active
#     (checked in pg_replication_slots), 5 s to settle, then IDLE_SECONDS: tree VmRSS, Pss and
#     CPU; (RSS at N - RSS at 1) / (N - 1) is the cost of an idle site.
#
#   tools/bench/sites_pghoard.sh                  # as root: 10 sites, 256 MiB of WAL, 2 runs each
#
# Environment: WALHOARD_BENCH_SITES (site count, default 10), WALHOARD_BENCH_WAL_MIB (backlog,
# default 256), WALHOARD_BENCH_RUNS (runs per tool, default 2), WALHOARD_BENCH_TOOLS (in the
# order each run alternates them, default "pghoard walhoard"; `pghoard` is the venv
# WALHOARD_BENCH_PGHOARD_VENV, default pghoard 2.1.0 from PyPI by tools/install-pghoard.sh;
# `pghoard=<venv>` another, e.g. a newer pghoard from a checkout by tools/pghoard-venv.sh;
# results are labelled pghoard-<version>; `walhoard=<MiB>`: walhoard with that
# wal_buffer_memory_mib, labelled walhoard-<MiB>mib), WALHOARD_BENCH_IDLE_SECONDS (default 30),
# WALHOARD_BENCH_TIMEOUT (seconds a drain may take, default 900), WALHOARD_BENCH_BIN (a walhoard
# binary; else `cargo build --release`), WALHOARD_BENCH_OUT
# (default target/bench-results/sites-pghoard-<time>).
#
#   WALHOARD_BENCH_TOOLS="pghoard walhoard pghoard=/var/cache/walhoard/pghoard270-venv" \
#     WALHOARD_BENCH_BIN=target/release/walhoard tools/bench/sites_pghoard.sh
#
# pghoard 2.1.0 (PyPI's newest) knows no WAL page magic newer than PostgreSQL 11's and refuses every
# PostgreSQL 15 segment (pghoard.wal.verify_wal); for such a venv the daemon is started through
# a two-line wrapper that adds 15's magic (0xD110, from PostgreSQL's xlog_internal.h) to
# pghoard.wal.WAL_MAGIC before calling pghoard's own main(). Nothing else of pghoard is changed.
# pghoard 2.1.0 also looks for `pg_receivexlog` in pg_bin_directory, which PostgreSQL 10+ no
# longer has: every site gets `pg_receivexlog_path` (Debian's 15 pg_receivewal).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

N=${WALHOARD_BENCH_SITES:-10}
WAL_MIB=${WALHOARD_BENCH_WAL_MIB:-256}
RUNS=${WALHOARD_BENCH_RUNS:-2}
TOOLS=${WALHOARD_BENCH_TOOLS:-pghoard walhoard}
IDLE_SECONDS=${WALHOARD_BENCH_IDLE_SECONDS:-30}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/sites-pghoard-$(date +%Y%m%d-%H%M%S)}
[ "$(id -u)" = 0 ] || { echo "tools/bench/sites_pghoard.sh needs root (PostgreSQL runs as 'postgres')" >&2; exit 1; }
for c in jq python3; do command -v "$c" >/dev/null || { echo "needs $c" >&2; exit 1; }; done
[ "$N" -ge 2 ] || { echo "WALHOARD_BENCH_SITES must be at least 2" >&2; exit 1; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
pick_walhoard
# Per tool (index in TOOLS): KIND walhoard or pghoard, LABEL (pghoard-<version>,
# walhoard-<budget>mib), VENV (pghoard's venv; walhoard's wal_buffer_memory_mib or -), SHIM
# (1: started through the PostgreSQL 15 WAL magic wrapper, see the top of this file).
KIND=() LABEL=() VENV=() SHIM=()
for t in $TOOLS; do
  case $t in
    walhoard) KIND+=(walhoard) LABEL+=(walhoard) VENV+=(-) SHIM+=(0) ;;
    walhoard=[1-9]*) KIND+=(walhoard) LABEL+=("walhoard-${t#walhoard=}mib") VENV+=("${t#walhoard=}") SHIM+=(0) ;;
    pghoard | pghoard=*)
      v=${t#pghoard}
      v=${v#=}
      [ -n "$v" ] || v=${WALHOARD_BENCH_PGHOARD_VENV:-$("$repo/tools/install-pghoard.sh")}
      [ -x "$v/bin/pghoard" ] || { echo "no pghoard in $v" >&2; exit 1; }
      KIND+=(pghoard) LABEL+=("pghoard-$("$v/bin/pghoard" --version)") VENV+=("$v")
      if "$v/bin/python" -c 'import sys, pghoard.wal as w; sys.exit(0xD110 not in w.WAL_MAGIC)'; then SHIM+=(0); else SHIM+=(1); fi
      ;;
    *) echo "WALHOARD_BENCH_TOOLS: unknown tool '$t' (walhoard, walhoard=<MiB>, pghoard or pghoard=<venv>)" >&2; exit 1 ;;
  esac
done

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-sites-pghoard.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
mkdir -p "$OUT"
{
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver || echo ' (modified)')"
  echo "walhoard: $WALHOARD ($(stat -c %y "$WALHOARD"))"
  for ti in "${!KIND[@]}"; do
    [ "${KIND[$ti]}" = pghoard ] && echo "${LABEL[$ti]}: ${VENV[$ti]}$([ "${SHIM[$ti]}" = 1 ] && echo ' (+ PostgreSQL 15 WAL magic)')"
  done
  echo "pg_receivewal: $("$PGBIN/pg_receivewal" --version)"
  machine_info
  echo "settings: sites=$N wal_mib=$WAL_MIB runs=$RUNS tools='$TOOLS' idle_seconds=$IDLE_SECONDS"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'tool\trun\tsites\tseconds\twal_bytes\tstored_bytes\tpeak_rss_mib\thwm_sum_mib\tprocs\tcpu_s\tcpu_s_per_gb\tagg_mib_per_s\tload_1_5_15\tidle_rss_mib\tidle_pss_mib\n' >"$OUT/drain.tsv"
printf 'tool\tsites\trss_mib\tpss_mib\tprocs\tcpu_s\tidle_seconds\n' >"$OUT/idle-fresh.tsv"

KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")

# One slot per site of every drain run, created back to back before the load: all hold the
# backlog. Slot names: t<tool index>_<run>_<site>.
slots=()
for r in $(seq "$RUNS"); do
  for ti in "${!KIND[@]}"; do for i in $(seq "$N"); do slots+=("t${ti}_${r}_$i"); done; done
done
PG_MAX_WAL_SENDERS=$((N + 5)) PG_MAX_SLOTS=$((${#slots[@]} + N + 6)) pg_up 1 "$WAL_MIB" "${slots[*]}"
# The backlog's segments, newest first (a missing last segment ends the check soonest).
SEGS=()
for f in "$PGDATA"/pg_wal/*; do
  b=${f##*/}
  [ ${#b} = 24 ] || continue
  if [[ ! "$b" < "$FIRST_SEG" ]] && [[ ! "$b" > "$LAST_SEG" ]]; then SEGS=("$b" "${SEGS[@]}"); fi
done
log "backlog: ${#SEGS[@]} segments $FIRST_SEG .. $LAST_SEG"

# --- the daemon's process tree, read from /proc without forking (the poll loop runs beside the
# timed drain) ---
# tree_pids <pid>: TREE = <pid> and its descendants (the children of every thread).
tree_pids() {
  TREE=("$1")
  local i=0 t c
  while [ "$i" -lt "${#TREE[@]}" ]; do
    for t in /proc/"${TREE[$i]}"/task/*/children; do
      c=()
      read -r -a c 2>/dev/null <"$t" || true
      TREE+=("${c[@]}")
    done
    i=$((i + 1))
  done
}
# tree_sum <file> <field>: SUM = the sum of <field> (kB) of /proc/<pid>/<file> over TREE.
tree_sum() {
  local p k v _
  SUM=0
  for p in "${TREE[@]}"; do
    while read -r k v _; do
      [ "$k" = "$2:" ] && SUM=$((SUM + v))
    done 2>/dev/null <"/proc/$p/$1" || true
  done
}
# tree_cpu: CPU seconds (user + system) of every process in TREE, plus the root's reaped children.
tree_cpu() {
  local p files=()
  for p in "${TREE[@]}"; do [ -r "/proc/$p/stat" ] && files+=("/proc/$p/stat"); done
  awk -v root="/proc/${TREE[0]}/stat" '{ c = $0; sub(/^.*\) /, "", c); split(c, f, " ")
      t += f[12] + f[13]; if (FILENAME == root) t += f[14] + f[15] }
    END { printf "%.2f", t / 100 }' "${files[@]}" 2>/dev/null
}
# stop_tree <pid>: TERM to the daemon, up to 60 s for it to exit, then KILL to whatever of its
# tree (as seen just before) is left.
stop_tree() {
  local pid=$1 p
  tree_pids "$pid"
  local tree=("${TREE[@]}")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 120); do
    kill -0 "$pid" 2>/dev/null || break
    nap 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${tree[@]:1}"; do kill -KILL "$p" 2>/dev/null || true; done
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# --- configurations ---
# site_name <i>: s<i>, zero-padded to the width of N (s01 .. s10). pghoard 2.1.0 finds a WAL
# file's site by the first site whose spool path is a string prefix of the file's path
# (Compressor.find_site_for_file): with sites s1 and s10, s10's segments are uploaded under
# s1's prefix (over s1's own). Seen in the first run of this script; fixed-width names avoid it.
site_name() { printf 's%0*d' "${#N}" "$1"; }
SITE_NAMES=()
for i in $(seq "$N"); do SITE_NAMES+=("$(site_name "$i")"); done
# pgh_config <dir> <count> <slot prefix>: <dir>/pghoard.json, sites 1..<count> on slots
# <prefix>_<i>, one local archive, zstd 1, encrypted, no basebackups; thread counts at
# pghoard's defaults (2 cores: 3 compression, 5 transfer threads, as walhoard's).
pgh_config() {
  local d=$1 n=$2 prefix=$3 sites='{}' i site
  mkdir -p "$d"
  for i in $(seq "$n"); do
    site=$(jq -n --arg sock "$SOCK" --argjson port "$PGPORT" --arg slot "${prefix}_$i" \
      --arg pgdata "$PGDATA" --arg bin "$PGBIN" --arg archive "$d/archive" --arg pub "$PUBLIC" '{
        active_backup_mode: "pg_receivexlog",
        nodes: [{host: $sock, port: $port, user: "postgres", slot: $slot}],
        pg_data_directory: $pgdata,
        pg_bin_directory: $bin,
        pg_receivexlog_path: ($bin + "/pg_receivewal"),
        object_storage: {storage_type: "local", directory: $archive},
        encryption_key_id: "k1",
        encryption_keys: {k1: {public: $pub}},
        basebackup_interval_hours: null
      }')
    sites=$(jq --arg k "$(site_name "$i")" --argjson v "$site" '. + {($k): $v}' <<<"$sites")
  done
  jq -n --arg d "$d" --argjson sites "$sites" --argjson http "$(free_port)" '{
      backup_location: ($d + "/spool"),
      json_state_file_path: ($d + "/state.json"),
      alert_file_dir: $d,
      maintenance_mode_file: ($d + "/maintenance_mode_file"),
      http_address: "127.0.0.1",
      http_port: $http,
      log_level: "INFO",
      compression: {algorithm: "zstd", level: 1},
      backup_sites: $sites
    }' >"$d/pghoard.json"
}
# wh_config <dir> <count> <slot prefix> <wal_buffer_memory_mib or ->: <dir>/walhoard.json,
# the same sites for walhoard.
wh_config() {
  local d=$1 n=$2 prefix=$3 budget='{}' sites='{}' i storage
  storage=$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')
  for i in $(seq "$n"); do
    sites=$(jq --arg k "$(site_name "$i")" --argjson v "$(wh_site "${prefix}_$i" "$storage")" '. + {($k): $v}' <<<"$sites")
  done
  [ "$4" = - ] || budget=$(jq -n --argjson m "$4" '{wal_buffer_memory_mib: $m}')
  wh_config_sites "$d" "$sites" "$budget"
}
# configure <tool index> <dir> <count> <slot prefix>: that tool's configuration in <dir>.
configure() {
  if [ "${KIND[$1]}" = pghoard ]; then pgh_config "$2" "$3" "$4"; else wh_config "$2" "$3" "$4" "${VENV[$1]}"; fi
}
# start_daemon <tool index> <dir> <log>: DAEMON = the pid of that tool's daemon on <dir>'s
# configuration.
start_daemon() {
  local v=${VENV[$1]}
  if [ "${KIND[$1]}" = walhoard ]; then
    WALHOARD_LOG=info "$WALHOARD" daemon --config "$2/walhoard.json" >>"$3" 2>&1 &
  elif [ "${SHIM[$1]}" = 1 ]; then
    "$v/bin/python" -c 'import sys, pghoard.wal as w; w.WAL_MAGIC[0xD110] = 150000; w.WAL_MAGIC_BY_VERSION[150000] = 0xD110
from pghoard.pghoard import main; sys.exit(main())' --short-log --config "$2/pghoard.json" >>"$3" 2>&1 &
  else
    "$v/bin/pghoard" --short-log --config "$2/pghoard.json" >>"$3" 2>&1 &
  fi
  DAEMON=$!
  PIDS+=("$DAEMON")
}
# all_archived <dir> <count>: whether every site's archive holds every backlog segment and its sidecar.
all_archived() {
  local i s
  for i in "${SITE_NAMES[@]:0:$2}"; do
    for s in "${SEGS[@]}"; do
      [ -e "$1/archive/$i/xlog/$s.metadata" ] && [ -e "$1/archive/$i/xlog/$s" ] || return 1
    done
  done
}
drop_slots() {
  local s
  for s in "$@"; do
    for _ in $(seq 20); do
      psql_ "select pg_drop_replication_slot('$s')" >/dev/null 2>&1 && break
      nap 0.5
    done
  done
}

# --- drains, alternating the tools ---
for r in $(seq "$RUNS"); do
  for ti in "${!KIND[@]}"; do
    t=${LABEL[$ti]}
    d=$ROOT/$t-$r
    prefix=t${ti}_$r
    configure "$ti" "$d" "$N" "$prefix"
    warm_backlog
    t0=$(now)
    start_daemon "$ti" "$d" "$d/daemon.log"
    pid=$DAEMON
    deadline=$((EPOCHSECONDS + ${WALHOARD_BENCH_TIMEOUT:-900}))
    peak=0
    until all_archived "$d" "$N"; do
      kill -0 "$pid" 2>/dev/null || { log "$t exited; see $d/daemon.log"; exit 1; }
      [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "$t, $N sites: not archived in time"; exit 1; }
      tree_pids "$pid"
      tree_sum status VmRSS
      [ "$SUM" -gt "$peak" ] && peak=$SUM
      nap 0.5
    done
    t1=$(now)
    tree_pids "$pid"
    cpu=$(tree_cpu)
    procs=${#TREE[@]}
    tree_sum status VmRSS
    [ "$SUM" -gt "$peak" ] && peak=$SUM
    tree_sum status VmHWM
    hwm=$SUM
    # The same daemon left idle after the drain: what stays of the burst's memory.
    nap "$IDLE_SECONDS"
    tree_pids "$pid"
    tree_sum status VmRSS
    after=$SUM
    tree_sum smaps_rollup Pss
    after_pss=$SUM
    stop_tree "$pid"
    stored=$(du -sb "$d/archive" | cut -f1)
    bytes=$((BACKLOG * N))
    secs=$(elapsed "$t0" "$t1")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$N" "$secs" "$bytes" "$stored" \
      "$(mib "$peak")" "$(mib "$hwm")" "$procs" "$cpu" \
      "$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { printf "%.2f", c / (b / 1e9) }')" \
      "$(awk -v s="$secs" -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 / s }')" "$(loads | tr ' ' ,)" \
      "$(mib "$after")" "$(mib "$after_pss")" >>"$OUT/drain.tsv"
    log "drain: $t run $r, $N sites: $secs s, peak RSS $(mib "$peak") MiB (VmHWM sum $(mib "$hwm")), $procs processes, CPU $cpu s; idle after $IDLE_SECONDS s: RSS $(mib "$after") MiB"
    rm -rf "$d/archive" "$d/spool"
    mapfile -t used < <(for i in $(seq "$N"); do echo "${prefix}_$i"; done)
    drop_slots "${used[@]}"
  done
done

# --- idle from the start: new slots at the end of WAL, empty archives ---
for n in 1 "$N"; do
  for ti in "${!KIND[@]}"; do
    t=${LABEL[$ti]}
    d=$ROOT/fresh-$t-$n
    prefix=f${ti}_$n
    for i in $(seq "$n"); do psql_ "select pg_create_physical_replication_slot('${prefix}_$i', true)" >/dev/null; done
    configure "$ti" "$d" "$n" "$prefix"
    start_daemon "$ti" "$d" "$d/daemon.log"
    pid=$DAEMON
    nap 5
    tree_pids "$pid"
    c0=$(tree_cpu)
    nap "$IDLE_SECONDS"
    tree_pids "$pid"
    c1=$(tree_cpu)
    tree_sum status VmRSS
    rss=$SUM
    tree_sum smaps_rollup Pss
    pss=$SUM
    active=$(psql_ "select count(*) from pg_replication_slots where active and slot_name ~ '^${prefix}_[0-9]+$'")
    stop_tree "$pid"
    [ "$active" = "$n" ] || { log "$t idle: $active of $n slots active; see $d/daemon.log"; exit 1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$n" "$(mib "$rss")" "$(mib "$pss")" "${#TREE[@]}" \
      "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" "$IDLE_SECONDS" >>"$OUT/idle-fresh.tsv"
    log "idle from the start: $t, $n sites: RSS $(mib "$rss") MiB, Pss $(mib "$pss") MiB, ${#TREE[@]} processes"
    mapfile -t used < <(for i in $(seq "$n"); do echo "${prefix}_$i"; done)
    drop_slots "${used[@]}"
  done
done

echo "== drain" >&2
column -t -s $'\t' "$OUT/drain.tsv" >&2
echo "== idle from the start" >&2
column -t -s $'\t' "$OUT/idle-fresh.tsv" >&2
# Medians per tool, and the idle cost of a site.
python3 - "$OUT" "$N" <<'EOF' | tee "$OUT/summary.txt" >&2
import csv, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
drain = list(csv.DictReader(open(out + "/drain.tsv"), delimiter="\t"))
idle = list(csv.DictReader(open(out + "/idle-fresh.tsv"), delimiter="\t"))
print("== medians per tool")
for tool in dict.fromkeys(r["tool"] for r in drain):
    rows = [r for r in drain if r["tool"] == tool]
    med = {k: statistics.median(float(r[k]) for r in rows)
           for k in ("seconds", "peak_rss_mib", "hwm_sum_mib", "cpu_s", "cpu_s_per_gb", "agg_mib_per_s", "idle_rss_mib", "idle_pss_mib")}
    print(f"{tool}: {len(rows)} runs: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
for tool in dict.fromkeys(r["tool"] for r in idle):
    by = {int(r["sites"]): r for r in idle if r["tool"] == tool}
    if 1 in by and n in by:
        for k in ("rss_mib", "pss_mib"):
            per = (float(by[n][k]) - float(by[1][k])) / (n - 1)
            print(f"{tool}: idle {k} per site ({by[n][k]} - {by[1][k]}) / {n - 1} = {per:.2f} MiB")
EOF
echo "results in $OUT" >&2
