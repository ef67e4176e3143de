#!/usr/bin/env bash
# Markdown tables from a tools/bench/run.sh results directory: per tool the median over the
# runs and the range, rates and ratios against the baseline (pg_receivewal for the drain,
# pg_basebackup for basebackups, pgBackRest for restores; ratio > 1 = faster than the baseline).
#   tools/bench/summarize.sh target/bench-results/<time>
set -euo pipefail
out=${1:?results directory}
res=$out/results.tsv

stats() { # numbers on stdin -> "median min max"
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - -"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
col() { # col <scale> <phase> <tool> <column number>
  awk -F'\t' -v s="$1" -v p="$2" -v t="$3" -v c="$4" 'NR > 1 && $1 == s && $2 == p && $3 == t { print $c }' "$res"
}

table() { # table <scale> <phase> <baseline tool>
  local scale=$1 phase=$2 base=$3 base_med tool
  base_med=$(col "$scale" "$phase" "$base" 5 | stats | cut -d' ' -f1)
  if [ "$phase" = drain ]; then
    echo "| tool | rate vs $base | MB/s (median) | seconds: median (min–max) | runs | stored MB | peak RSS MiB | load (1 min) during runs |"
  else
    echo "| tool | speed vs $base | database MB/s (median) | seconds: median (min–max) | runs | stored MB | peak RSS MiB | load (1 min) during runs |"
  fi
  echo "|---|---|---|---|---|---|---|---|"
  for tool in $(awk -F'\t' -v s="$scale" -v p="$phase" 'NR > 1 && $1 == s && $2 == p { print $3 }' "$res" | awk '!seen[$0]++'); do
    read -r med min max < <(col "$scale" "$phase" "$tool" 5 | stats)
    local bytes stored rss n loads
    bytes=$(col "$scale" "$phase" "$tool" 6 | head -1)
    stored=$(col "$scale" "$phase" "$tool" 7 | stats | cut -d' ' -f1)
    rss=$(col "$scale" "$phase" "$tool" 8 | stats | cut -d' ' -f3)
    n=$(col "$scale" "$phase" "$tool" 5 | wc -l)
    loads=$(col "$scale" "$phase" "$tool" 9 | cut -d, -f1 | stats | awk '{ print $2 "–" $3 }')
    awk -v t="$tool" -v med="$med" -v min="$min" -v max="$max" -v base="$base_med" -v b="$bytes" \
      -v st="$stored" -v rss="$rss" -v n="$n" -v l="$loads" 'BEGIN {
        ratio = (base == "-" || med == 0) ? "-" : sprintf("%.2f×", base / med)
        printf "| %s | %s | %.0f | %.2f (%.2f–%.2f) | %d | %.0f | %s | %s |\n", t, ratio, b / med / 1e6,
          med, min, max, n, st / 1e6, (rss > 0 ? sprintf("%.0f", rss / 1024) : "n/a"), l }'
  done
  echo
}

# restore_table <scale>: rows of phases restore (total), restore-get (the restore command),
# restore-recovery (PostgreSQL start until pg_is_in_recovery() is false) and restore-startup-sync
# (the part of recovery PostgreSQL spends fsyncing the data directory); baseline pgbackrest.
restore_table() {
  local scale=$1 base_med tool
  base_med=$(col "$scale" restore pgbackrest 5 | stats | cut -d' ' -f1)
  echo "| tool | total vs pgbackrest | total seconds: median (min–max) | restore command, s | recovery, s | of which PostgreSQL's startup fsync, s | runs | data directory MB | stored MB | peak RSS MiB (restore command) | load (1 min) during runs |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for tool in $(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s && $2 == "restore" { print $3 }' "$res" | awk '!seen[$0]++'); do
    local total get rec sync bytes stored rss n loads
    total=$(col "$scale" restore "$tool" 5 | stats)
    get=$(col "$scale" restore-get "$tool" 5 | stats)
    rec=$(col "$scale" restore-recovery "$tool" 5 | stats)
    sync=$(col "$scale" restore-startup-sync "$tool" 5 | stats)
    bytes=$(col "$scale" restore "$tool" 6 | stats | cut -d' ' -f1)
    stored=$(col "$scale" restore "$tool" 7 | head -1)
    rss=$(col "$scale" restore "$tool" 8 | stats | cut -d' ' -f3)
    n=$(col "$scale" restore "$tool" 5 | wc -l)
    loads=$(col "$scale" restore "$tool" 9 | cut -d, -f1 | stats | awk '{ print $2 "–" $3 }')
    awk -v t="$tool" -v total="$total" -v get="$get" -v rec="$rec" -v sync="$sync" -v base="$base_med" -v b="$bytes" \
      -v st="$stored" -v rss="$rss" -v n="$n" -v l="$loads" 'BEGIN {
        split(total, T, " "); split(get, G, " "); split(rec, R, " "); split(sync, S, " ")
        ratio = (base == "-" || T[1] == 0) ? "-" : sprintf("%.2f×", base / T[1])
        printf "| %s | %s | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %d | %.0f | %.0f | %s | %s |\n",
          t, ratio, T[1], T[2], T[3], G[1], G[2], G[3], R[1], R[2], R[3], S[1], S[2], S[3], n, b / 1e6, st / 1e6,
          (rss > 0 ? sprintf("%.0f", rss / 1024) : "n/a"), l }'
  done
  echo
}

cat "$out/machine.txt" | sed 's/^/    /'
echo
for scale in $(awk -F'\t' 'NR > 1 { print $1 }' "$res" | awk '!seen[$0]++'); do
  bytes=$(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s && $2 == "drain" { print $6; exit }' "$res")
  if [ -n "$bytes" ]; then
    echo "### WAL drain, pgbench scale ${scale#s}: $(awk -v b="$bytes" 'BEGIN { printf "%.0f MB (%.0f MiB)", b / 1e6, b / 1048576 }') of WAL held by the slots"
    echo
    table "$scale" drain pg_receivewal
    if [ -f "$out/cpu.tsv" ] && [ "$(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s' "$out/cpu.tsv" | wc -l)" -gt 0 ]; then
      echo "CPU seconds, median (min–max): the tool's process, the walsender serving it, the S3 server (s3s-fs, and stunnel for walhoard-s3-tls and pgbackrest-async-s3); n/a: not measured (pgBackRest's async process leaves the archiver's process tree)"
      echo
      echo "| tool | tool CPU s | walsender CPU s | S3 server CPU s | total CPU s |"
      echo "|---|---|---|---|---|"
      for tool in $(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s { print $2 }' "$out/cpu.tsv" | awk '!seen[$0]++'); do
        ccol() { awk -F'\t' -v s="$scale" -v t="$tool" -v c="$1" 'NR > 1 && $1 == s && $2 == t && $c != "-" { print $c }' "$out/cpu.tsv"; }
        tot=$(awk -F'\t' -v s="$scale" -v t="$tool" 'NR > 1 && $1 == s && $2 == t { print $4 + $5 + ($6 == "-" ? 0 : $6) }' "$out/cpu.tsv" | stats)
        range() { awk -v none="$1" '$1 == "-" { print none; next } { print $1 " (" $2 "–" $3 ")" }'; }
        if [ -z "$(ccol 4)" ]; then tot="- - -"; fi
        printf '| %s | %s | %s | %s | %s |\n' "$tool" "$(ccol 4 | stats | range n/a)" "$(ccol 5 | stats | range n/a)" \
          "$(ccol 6 | stats | range –)" "$(range n/a <<<"$tot")"
      done
      echo
    fi
    if [ -f "$out/floor-$scale.txt" ]; then
      echo "Per-segment work alone, one core (\`benches/drain_floor.rs\` on the same backlog): $(tail -1 "$out/floor-$scale.txt")"
      echo
    fi
  fi
  bytes=$(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s && $2 == "basebackup" { print $6; exit }' "$res")
  if [ -n "$bytes" ]; then
    echo "### Basebackup, pgbench scale ${scale#s}: database $(awk -v b="$bytes" 'BEGIN { printf "%.0f MB", b / 1e6 }')"
    echo
    table "$scale" basebackup pg_basebackup
  fi
  wal=$(awk -F'\t' -v s="$scale" 'NR > 1 && $1 == s && $2 == "restore-recovery" { print $6; exit }' "$res")
  if [ -n "$wal" ]; then
    echo "### Restore + recovery to the end of the archive, pgbench scale ${scale#s}: $(awk -v b="$wal" 'BEGIN { printf "%.0f MB (%.0f MiB)", b / 1e6, b / 1048576 }') of WAL written after the backups"
    echo
    restore_table "$scale"
  fi
done
if [ "$(wc -l <"$out/lag.tsv")" -gt 1 ]; then
  echo "### Live lag under pgbench -c 4 -j 2 (MiB behind pg_current_wal_lsn(), sampled every 0.5 s)"
  echo
  echo "| run | seconds | WAL MB/s | samples | not yet archived: p50 | p95 | max | not yet sent: p50 | p95 | max | load 1/5/15 at end |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  awk -F'\t' 'NR > 1 { printf "| %s %s | %.0f | %.1f | %s | %s | %s | %s | %s | %s | %s | %s |\n",
    $1, $2, $3, $4 / $3 / 1e6, $5, $6, $7, $8, $9, $10, $11, $12 }' "$out/lag.tsv"
  echo
fi
