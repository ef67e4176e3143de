#!/usr/bin/env bash
# Issue 18's measurements (docs/benchmarks.md, "Incremental backups and delta restore"): what a
# second backup costs after about 1 % of the blocks changed, and what bringing a data
# directory that fell behind by that change up to date costs. Not part of tools/test.sh or CI.
#
#   tools/bench/incremental.sh                    # PostgreSQL 15: basic, delta, pgBackRest
#   WALHOARD_BENCH_PG=17 tools/bench/incremental.sh   # 17: basic, delta, incremental (pgBackRest
#                                                 # only if the installed one supports 17)
#
# For every tool, on the same primary: a first (full) backup, all back to back; then one row
# updated in every 100th block of pgbench_accounts and a CHECKPOINT (the same change for all);
# then the second backup of each, back to back: its seconds and the bytes it added to the
# store. Then, for each tool, a data directory restored from its first backup (the standby
# that fell behind) is brought to the second backup: walhoard `get-basebackup --delta`,
# pgBackRest `restore --delta`; and for reference a restore of the second backup into an
# empty directory. Only the restore commands are timed (no recovery). For `incremental` the
# second backup is a chain (the first, full, <- the second): `--delta` over the restore of the
# full backup downloads only the incremental one and applies its blocks in place.
#
# Tools (WALHOARD_BENCH_INCR_TOOLS, default "basic delta incremental pgbackrest"):
#   basic        walhoard basebackup_mode basic (the second backup is full again)
#   delta        walhoard basebackup_mode delta (pghoard's layout: files unchanged since the
#                last backup are not uploaded again)
#   incremental  walhoard basebackup_mode incremental (PostgreSQL 17+, block level)
#   pgbackrest   pgbackrest --type=full, then --type=incr (file level, its default)
# A tool that fails (an unknown mode in this build, a PostgreSQL major it does not support) is
# logged and left out; the rest still run.
#
# Environment: WALHOARD_BENCH_SCALE (pgbench scale, default 100), WALHOARD_BENCH_PG (major,
# default 15; others from tools/install-pg.sh, with Debian's 15 client programs),
# WALHOARD_BENCH_REPS (restore runs per tool, default 1), WALHOARD_BENCH_OUT,
# WALHOARD_BENCH_BIN, WALHOARD_BENCH_KEEP as for tools/bench/run.sh.
#
# Needs root (PostgreSQL runs as 'postgres'; pgBackRest and time are installed with apt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

SCALE=${WALHOARD_BENCH_SCALE:-100}
PG_MAJOR=${WALHOARD_BENCH_PG:-15}
REPS=${WALHOARD_BENCH_REPS:-1}
TOOLS=${WALHOARD_BENCH_INCR_TOOLS:-basic delta incremental pgbackrest}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/incremental-$(date +%Y%m%d-%H%M%S)}
SCALE_LABEL="s$SCALE"

[ "$(id -u)" = 0 ] || { echo "tools/bench/incremental.sh needs root" >&2; exit 1; }
for p in pgbackrest:pgbackrest /usr/bin/time:time jq:jq; do
  command -v "${p%%:*}" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${p#*:}" >/dev/null
done
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres

pick_walhoard

mkdir -p "$OUT"
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-bench.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
trap 'exit 130' INT TERM

# The server's programs of the major asked for; the client programs (psql, pgbench) are
# Debian's 15, which talk to any of them. lib.sh runs everything from $PGBIN.
if [ "$PG_MAJOR" != 15 ]; then
  server=$("$repo/tools/install-pg.sh" "$PG_MAJOR" | sed -n 's/^major=[0-9]* bin=//p')
  mkdir -p "$ROOT/pgbin"
  for b in initdb pg_ctl postgres; do ln -s "$server/$b" "$ROOT/pgbin/$b"; done
  for b in psql pgbench pg_basebackup; do ln -s "$PGBIN/$b" "$ROOT/pgbin/$b"; done
  PGBIN=$ROOT/pgbin
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver basebackup || echo ' (modified)')"
  machine_info
  echo "os: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
  echo "tools: $("$PGBIN/postgres" --version), $(pgbackrest version), $("$WALHOARD" --version 2>/dev/null || echo walhoard) ($WALHOARD)"
  echo "settings: scale=$SCALE pg=$PG_MAJOR reps=$REPS tools='$TOOLS'"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'scale\tphase\ttool\trep\tseconds\tbytes\tstored_bytes\tmax_rss_kib\tload_1_5_15\n' >"$OUT/results.tsv"

KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")

pg_up "$SCALE" 1 anchor
# Incremental backups need WAL summaries (PostgreSQL 17+).
if [ "$PG_MAJOR" -ge 17 ]; then psql_ "alter system set summarize_wal = on" && psql_ "select pg_reload_conf()" >/dev/null; fi

# --- the tools' backups ---------------------------------------------------------------------
# wh_dir <tool>: the tool's walhoard configuration and local store (zstd 1, encrypted with a
# 3072-bit key, the private key too so that restore reads it).
wh_dir() { echo "$ROOT/wh-$1"; }
wh_setup() {
  local tool=$1 d extra
  d=$(wh_dir "$tool")
  extra=$(jq -n --arg mode "$tool" --arg data "$PGDATA" --argjson keys "$KEYS" '{basebackup_mode: $mode}
    + (if $mode == "delta" then {pg_data_directory: $data} else {} end) + $keys')
  mkdir -p "$d"
  local site
  site=$(wh_site wh_unused "$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')" | jq --argjson e "$extra" '. + $e')
  wh_config_sites "$d" "$(jq -n --argjson s "$site" '{main: $s}')"
}

# backup <tool> <phase>: one backup; writes the result row (seconds, bytes added to the store).
backup() {
  local tool=$1 phase=$2 d t0 t1 before after label
  case $tool in
    pgbackrest)
      local type=full
      [ "$phase" = second ] && type=incr
      before=$(du -sb "$PGBR/repo/backup" | cut -f1)
      t0=$(now)
      as_pg /usr/bin/time -v -o "$PGBR/backup.time" pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench --type=$type backup >"$ROOT/pgbr-$phase.out" 2>&1 ||
        { log "pgbackrest $type backup failed: $(tail -5 "$ROOT/pgbr-$phase.out")"; return 1; }
      t1=$(now)
      after=$(du -sb "$PGBR/repo/backup" | cut -f1)
      result "backup-$phase" pgbackrest-$type 1 "$(elapsed "$t0" "$t1")" "$DB_BYTES" $((after - before)) "$(time_rss "$PGBR/backup.time")"
      ;;
    *)
      d=$(wh_dir "$tool")
      before=$(du -sb "$d/archive" 2>/dev/null | cut -f1 || echo 0)
      t0=$(now)
      /usr/bin/time -v -o "$d/backup-$phase.time" "$WALHOARD" basebackup --config "$d/walhoard.json" --site main >"$d/backup-$phase.out" 2>&1 ||
        { log "walhoard $tool basebackup failed: $(tail -5 "$d/backup-$phase.out")"; return 1; }
      t1=$(now)
      after=$(du -sb "$d/archive" | cut -f1)
      result "backup-$phase" "walhoard-$tool" 1 "$(elapsed "$t0" "$t1")" "$DB_BYTES" $((after - ${before:-0})) "$(time_rss "$d/backup-$phase.time")"
      ;;
  esac
}

# The backup names of a walhoard tool, oldest first.
wh_names() { "$WALHOARD" restore list-basebackups --config "$(wh_dir "$1")/walhoard.json" --site main --json | jq -r '.[].name'; }

OK_TOOLS=
if [[ " $TOOLS " == *" pgbackrest "* ]]; then
  pgbr_setup
  set_archive_command "$PGBR_ARCHIVE"
fi
log "== first backups (scale $SCALE, database $((DB_BYTES / 1048576)) MiB)"
for tool in $TOOLS; do
  [ "$tool" = pgbackrest ] || wh_setup "$tool"
  if backup "$tool" first; then OK_TOOLS+=" $tool"; else log "$tool left out"; fi
done

# The change: one row in every 100th block of pgbench_accounts (the old version's block gets
# its xmax, the new version goes where there is room, an index entry is added), then a
# checkpoint, so that it is in the data files every tool reads.
blocks=$(psql_ "select pg_relation_size('pgbench_accounts') / current_setting('block_size')::int")
changed=$(psql_ "with t as (select ('(' || b || ',1)')::tid as t from generate_series(0, $blocks - 1, 100) b)
  update pgbench_accounts set abalance = abalance + 1 where ctid = any(array(select t from t)) returning 1" | wc -l)
psql_ "checkpoint" >/dev/null
log "changed $changed rows, one in every 100th of $blocks blocks of pgbench_accounts"
echo "change: $changed rows of pgbench_accounts updated, one in every 100th of its $blocks blocks" >>"$OUT/machine.txt"

log "== second backups"
SECOND_OK=
for tool in $OK_TOOLS; do
  if backup "$tool" second; then SECOND_OK+=" $tool"; else log "$tool left out"; fi
done
set_archive_command ''

# --- bringing a data directory that fell behind up to date ------------------------------------
# stale <tool> <dir>: <dir> restored (untimed) from the tool's first backup.
stale() {
  local tool=$1 dir=$2
  rm -rf "$dir"; mkdir -m 700 "$dir"; chown postgres: "$dir"
  case $tool in
    pgbackrest)
      as_pg pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench --pg1-path="$dir" \
        --process-max=2 --set="$(ls "$PGBR/repo/backup/bench" | grep 'F$' | sort | head -1)" restore >"$dir.stale.out" 2>&1
      ;;
    *)
      "$WALHOARD" restore get-basebackup --config "$(wh_dir "$tool")/walhoard.json" --site main \
        --basebackup "$(wh_names "$tool" | head -1)" --target-dir "$dir" --restore-to-primary >"$dir.stale.out" 2>&1
      ;;
  esac || { log "$tool: restoring the first backup failed: $(tail -3 "$dir.stale.out")"; return 1; }
  sync
}

# restore_to_second <tool> <dir> delta|full: timed.
restore_to_second() {
  local tool=$1 dir=$2 how=$3 r=$4 t0 t1 flag=() rc=0
  [ "$how" = delta ] && flag=(--delta)
  t0=$(now)
  case $tool in
    pgbackrest)
      # As 'postgres', who may write only below $PGBR: the time file goes there.
      as_pg /usr/bin/time -v -o "$PGBR/restore.time" pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench \
        --pg1-path="$dir" --process-max=2 "${flag[@]}" restore >"$dir.out" 2>&1 || rc=$?
      cp "$PGBR/restore.time" "$dir.time" 2>/dev/null || true
      ;;
    *)
      /usr/bin/time -v -o "$dir.time" "$WALHOARD" restore get-basebackup --config "$(wh_dir "$tool")/walhoard.json" \
        --site main --basebackup "$(wh_names "$tool" | tail -1)" --target-dir "$dir" --restore-to-primary "${flag[@]}" >"$dir.out" 2>&1 || rc=$?
      ;;
  esac
  t1=$(now)
  cp "$dir.out" "$OUT/restore-$how-$tool-$r.out"
  [ "$rc" = 0 ] || { log "$tool: $how restore failed: $(tail -3 "$dir.out")"; return 1; }
  local name=walhoard-$tool
  [ "$tool" = pgbackrest ] && name=pgbackrest
  result "restore-$how" "$name" "$r" "$(elapsed "$t0" "$t1")" "$(du -sb "$dir" | cut -f1)" 0 "$(time_rss "$dir.time")"
}

for r in $(seq "$REPS"); do
  for tool in $SECOND_OK; do
    d=$ROOT/restore-$tool
    log "== $tool: restore into an empty directory, then --delta over a restore of the first backup (run $r)"
    rm -rf "$d"; mkdir -m 700 "$d"; chown postgres: "$d"
    sync
    restore_to_second "$tool" "$d" full "$r" || true
    stale "$tool" "$d" && { restore_to_second "$tool" "$d" delta "$r" || true; }
    rm -rf "$d"
  done
done
pg_down

echo "load at end: $(loads)" >>"$OUT/machine.txt"
# The table docs/benchmarks.md quotes: seconds and bytes per phase and tool.
{
  printf '| phase | tool | run | seconds | bytes added to the store |\n|---|---|---|---|---|\n'
  awk -F'\t' 'NR > 1 { printf "| %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, ($2 ~ /^backup/ ? $7 : "-") }' "$OUT/results.tsv"
} | tee "$OUT/summary.md"
