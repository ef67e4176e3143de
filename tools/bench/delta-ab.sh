#!/usr/bin/env bash
# A/B of `get-basebackup --delta` (docs/benchmarks.md, "--delta over a stream-format backup"):
# for each run and each binary, a full restore of a site's newest backup into an empty
# directory, then --delta over a fresh copy of a directory restored from an older backup.
# Only the restore commands are timed; binaries alternate, so load changes hit all alike.
#
#   tools/bench/delta-ab.sh <walhoard.json> <stale dir> <runs> <binary>...
#
# <walhoard.json>: a configuration whose site "main" holds the backups, e.g. the
# wh-basic/walhoard.json that tools/bench/incremental.sh leaves with WALHOARD_BENCH_KEEP=1;
# <stale dir>: a restore of its first backup (left as it is; each run works on a copy).
# Prints one line per run and binary: seconds of the full restore and of the delta restore.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
CONFIG=$1 STALE=$2 RUNS=$3
shift 3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-delta-ab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NAME=$("$1" restore list-basebackups --config "$CONFIG" --site main --json | jq -r '.[-1].name')
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
for r in $(seq "$RUNS"); do
  for bin in "$@"; do
    rm -rf "$WORK/full" "$WORK/delta"
    sync
    t0=$EPOCHREALTIME
    "$bin" restore get-basebackup --config "$CONFIG" --site main --basebackup "$NAME" \
      --target-dir "$WORK/full" --restore-to-primary >"$WORK/full.out" 2>&1
    t1=$EPOCHREALTIME
    rm -rf "$WORK/full"
    cp -a "$STALE" "$WORK/delta"
    sync
    t2=$EPOCHREALTIME
    "$bin" restore get-basebackup --config "$CONFIG" --site main --basebackup "$NAME" \
      --target-dir "$WORK/delta" --restore-to-primary --delta >"$WORK/delta.out" 2>&1
    t3=$EPOCHREALTIME
    echo "run $r $bin full $(secs "$t0" "$t1") delta $(secs "$t2" "$t3") load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
