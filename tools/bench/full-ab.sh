#!/usr/bin/env bash
# A/B of a full `get-basebackup` into an empty directory (docs/benchmarks.md, "Full restore of a
# basic backup against pgBackRest"): binaries alternate run by run, so load changes hit all
# alike. Only the restore command is timed (it includes every fsync: a restore reports success
# only once everything is durable).
#
#   tools/bench/full-ab.sh <walhoard.json> <runs> <binary>...
#
# <walhoard.json>: a configuration whose site "main" holds the backups, e.g. the
# wh-basic/walhoard.json that tools/bench/incremental.sh leaves with WALHOARD_BENCH_KEEP=1.
# Prints one line per run and binary: seconds of the restore, and the load average before it.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
CONFIG=$1 RUNS=$2
shift 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-full-ab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NAME=$("$1" restore list-basebackups --config "$CONFIG" --site main --json | jq -r '.[-1].name')
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
for r in $(seq "$RUNS"); do
  for bin in "$@"; do
    rm -rf "$WORK/full"
    sync
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$EPOCHREALTIME
    "$bin" restore get-basebackup --config "$CONFIG" --site main --basebackup "$NAME" \
      --target-dir "$WORK/full" --restore-to-primary >"$WORK/full.out" 2>&1
    t1=$EPOCHREALTIME
    echo "run $r $bin full $(secs "$t0" "$t1") load $load"
  done
done
