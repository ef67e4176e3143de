#!/usr/bin/env bash
# A WALHOARD_BENCH_BIN wrapper that runs every `walhoard daemon` of a bench script under
# `perf record` (flat profile, all threads; perf is the daemon's parent, so threads started
# before any attach are sampled too). Other subcommands run as they are.
#
#   WALHOARD_BENCH_PERF_BIN=target/release/walhoard WALHOARD_BENCH_BIN=tools/bench/perf-daemon.sh \
#     WALHOARD_BENCH_PERF_OUT=/tmp/perf tools/bench/sites.sh
#   perf report -i /tmp/perf/<time>-<pid>.data --no-children --sort sym
#
# The script's own CPU and RSS figures are then the wrapper's, not the daemon's: use such a
# run for the profile only. Environment: WALHOARD_BENCH_PERF_BIN (the walhoard binary),
# WALHOARD_BENCH_PERF_OUT (directory for the perf.data files, default /tmp/walhoard-perf),
# WALHOARD_BENCH_PERF_FREQ (samples per second, default 499).
set -uo pipefail
bin=${WALHOARD_BENCH_PERF_BIN:?set WALHOARD_BENCH_PERF_BIN to the walhoard binary}
if [ "${1:-}" != daemon ]; then exec "$bin" "$@"; fi
out=${WALHOARD_BENCH_PERF_OUT:-/tmp/walhoard-perf}
mkdir -p "$out"
perf record -F "${WALHOARD_BENCH_PERF_FREQ:-499}" -o "$out/$(date +%H%M%S)-$$.data" -- "$bin" "$@" >/dev/null 2>&1 &
perf_pid=$!
# A stop asked of this wrapper goes to the daemon (perf's child); perf ends with it.
trap 'kill -TERM $(pgrep -P "$perf_pid") 2>/dev/null' TERM INT
wait "$perf_pid"
wait "$perf_pid"
