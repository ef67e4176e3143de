#!/usr/bin/env bash
# walhoard against the tools a user would otherwise pick, on the same data in the same run
# (docs/benchmarks.md, "Against the peers"). Not part of tools/test.sh or CI.
#
#   tools/bench/run.sh                 # everything: drain, basebackup, lag, restore, then memory at 1/4 size
#   tools/bench/run.sh drain lag       # only these phases (drain basebackup lag restore memory)
#   tools/bench/run.sh restore         # restore alone (takes its own backups)
#   WALHOARD_BENCH_QUICK=1 tools/bench/run.sh   # a small scale, for trying the harness (~3 min)
#
# Environment: WALHOARD_BENCH_SCALE (pgbench scale, default 100), WALHOARD_BENCH_WAL_MIB (WAL
# backlog held by the slots, default 2200), WALHOARD_BENCH_REPS (runs of each measurement,
# default 3), WALHOARD_BENCH_LAG_SECONDS (pgbench duration per lag run, default 60),
# WALHOARD_BENCH_RESTORE_TX (pgbench transactions, in 4 clients, writing the WAL the restores
# replay; default 60000), WALHOARD_BENCH_OUT (results directory, default target/bench-results/<time>),
# WALHOARD_BENCH_BIN (a walhoard binary to use instead of building one; else
# `cargo build --release` into $CARGO_TARGET_DIR, default target/),
# WALHOARD_BENCH_KEEP=1 keeps the scratch directory (in $TMPDIR) for inspection,
# WALHOARD_BENCH_PERF=1 profiles each `walhoard restore get-basebackup` with `perf record -g`,
# WALHOARD_BENCH_DRAIN_TOOLS picks the drain's tools (default: all six: pg_receivewal,
# walhoard-local, walhoard-s3, pgbackrest, walhoard-s3-tls, pgbackrest-s3; the last two put
# both tools' archives into s3s-fs behind one stunnel TLS proxy, since pgBackRest's S3 client
# speaks only HTTPS). The drain phase ends
# with `cargo bench --bench drain_floor` over its backlog (floor-<scale>.txt).
#
# Needs root (PostgreSQL runs as the 'postgres' user, packages are installed with apt).
# Everything is written under one mktemp directory; all traffic is on a unix socket or 127.0.0.1.
#
# Each phase is a function over the primary that pg_up leaves behind. The restore phase takes
# its own backups (a walhoard local-tar basebackup and a pgBackRest full backup, back to back),
# lets pgbench write WAL into both archives, then times `walhoard restore get-basebackup` +
# recovery to the end of the archive against `pgbackrest restore --process-max=2` + recovery.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/lib.sh"

if [ -n "${WALHOARD_BENCH_QUICK:-}" ]; then
  : "${WALHOARD_BENCH_SCALE:=10}" "${WALHOARD_BENCH_WAL_MIB:=300}" "${WALHOARD_BENCH_LAG_SECONDS:=15}"
  : "${WALHOARD_BENCH_RESTORE_TX:=10000}"
fi
SCALE=${WALHOARD_BENCH_SCALE:-100}
WAL_MIB=${WALHOARD_BENCH_WAL_MIB:-2200}
REPS=${WALHOARD_BENCH_REPS:-3}
LAG_SECONDS=${WALHOARD_BENCH_LAG_SECONDS:-60}
RESTORE_TX=${WALHOARD_BENCH_RESTORE_TX:-60000}
PHASES=${*:-drain basebackup lag restore memory}
OUT=${WALHOARD_BENCH_OUT:-$repo/target/bench-results/$(date +%Y%m%d-%H%M%S)}

[ "$(id -u)" = 0 ] || { echo "tools/bench/run.sh needs root (apt, and PostgreSQL runs as 'postgres')" >&2; exit 1; }

# --- what the runs need -------------------------------------------------------------------
apt_updated=
need_pkg() { # need_pkg <command-or-path> <debian package>
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    echo "== installing $2" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
need_pkg $PGBIN/pg_receivewal postgresql-15
need_pkg pgbackrest pgbackrest
need_pkg /usr/bin/time time
need_pkg curl curl
need_pkg stunnel4 stunnel4
need_pkg openssl openssl
need_pkg jq jq
need_pkg python3 python3
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
cache=${WALHOARD_CACHE:-/var/cache/walhoard}
S3S_FS=${WALHOARD_S3S_FS:-$cache/s3s-fs/bin/s3s-fs}
if [ ! -x "$S3S_FS" ]; then
  echo "== installing s3s-fs into $cache/s3s-fs" >&2
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$cache/s3s-fs"
fi
# The binary: WALHOARD_BENCH_BIN as is, else a release build in CARGO_TARGET_DIR (default
# target/), so that a separate target directory avoids waiting on another build's lock.
pick_walhoard

mkdir -p "$OUT"
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/walhoard-bench.XXXXXX")
chmod 755 "$ROOT"
trap cleanup EXIT
trap 'exit 130' INT TERM

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src protocol walreceiver basebackup || echo ' (modified)')"
  machine_info
  echo "os: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
  echo "tools: $("$PGBIN/postgres" --version), $(pgbackrest version), $("$WALHOARD" --version 2>/dev/null || echo walhoard) ($WALHOARD)"
  echo "settings: scale=$SCALE wal_mib=$WAL_MIB reps=$REPS lag_seconds=$LAG_SECONDS restore_tx=$RESTORE_TX phases='$PHASES'"
  echo "load at start: $(loads)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
printf 'scale\tphase\ttool\trep\tseconds\tbytes\tstored_bytes\tmax_rss_kib\tload_1_5_15\n' >"$OUT/results.tsv"
printf 'scale\ttool\trep\ttool_cpu_s\twalsender_cpu_s\thelper_cpu_s\n' >"$OUT/cpu.tsv"
printf 'scale\trep\tseconds\twal_bytes\tsamples\tarchived_p50\tarchived_p95\tarchived_max\tsent_p50\tsent_p95\tsent_max\tload_1_5_15\n' >"$OUT/lag.tsv"

KEYS=$("$WALHOARD" create-keys --key-id k1 --bits 3072)
PUBLIC=$(jq -r '.encryption_keys.k1.public' <<<"$KEYS")

# --- walhoard -----------------------------------------------------------------------------
# wh_config <dir> <slot> <object_storage JSON> [site JSON merged in]: zstd level 1, encrypted
# with a 3072-bit key, no scheduled basebackups, everything else at its default.
wh_config() {
  local site extra=${4:-'{}'}
  site=$(wh_site "$2" "$3" | jq --argjson extra "$extra" '. + $extra')
  wh_config_sites "$1" "$(jq -n --argjson s "$site" '{main: $s}')"
}

# wh_archived_n <http port>: sets WH_ARCHIVED_N to the archived byte position from GET
# /status (0 until known), over bash's /dev/tcp and a regex: no process is forked.
wh_archived_n() {
  local body='' fd
  WH_ARCHIVED_N=0
  { exec {fd}<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 0
  printf 'GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&"$fd"
  IFS= read -r -d '' -t 5 body <&"$fd" || true
  exec {fd}>&-
  if [[ $body =~ \"archived_lsn\":\"([0-9A-Fa-f]+)/([0-9A-Fa-f]+)\" ]]; then
    WH_ARCHIVED_N=$(((16#${BASH_REMATCH[1]} << 32) + 16#${BASH_REMATCH[2]}))
  fi
}

# wh_wait_archived <config> <pid> <target byte position> <timeout s>
wh_wait_archived() {
  local cfg=$1 pid=$2 target=$3 deadline=$((EPOCHSECONDS + $4)) port
  port=$(jq -r .http_port "$cfg")
  while :; do
    wh_archived_n "$port"
    [ "$WH_ARCHIVED_N" -ge "$target" ] && return 0
    kill -0 "$pid" 2>/dev/null || { log "walhoard daemon exited early; log: $(dirname "$cfg")/daemon.log"; return 1; }
    [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "walhoard did not archive up to $(n2lsn "$target") in time"; return 1; }
    nap 0.05
  done
}

wh_start() { # wh_start <dir>: sets WH_PID
  WALHOARD_LOG=info "$WALHOARD" daemon --config "$1/walhoard.json" >"$1/daemon.log" 2>&1 &
  WH_PID=$!
  PIDS+=("$WH_PID")
}

wait_listen() { # wait_listen <port> <what>
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  log "$2 did not listen on port $1"; return 1
}

# s3_start <dir> [tls]: s3s-fs with bucket 'archive'; sets S3_PID S3_PORT. With tls, also a
# stunnel in front of it (pgBackRest speaks S3 only over HTTPS) with a certificate of the
# run's own CA ($ROOT/tls/ca.pem); sets TLS_PID TLS_PORT.
S3_PID= TLS_PID=
s3_start() {
  mkdir -p "$1/archive"
  S3_PORT=$(free_port)
  "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key bench-ak --secret-key bench-secret-key "$1" >/dev/null 2>&1 &
  S3_PID=$!
  PIDS+=("$S3_PID")
  wait_listen "$S3_PORT" s3s-fs || return 1
  TLS_PID=
  [ "${2:-}" = tls ] || return 0
  tls_ca
  TLS_PORT=$(free_port)
  printf 'foreground = yes\npid =\n[s3]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
    "$TLS_PORT" "$S3_PORT" "$ROOT/tls/cert.pem" "$ROOT/tls/key.pem" >"$1/stunnel.conf"
  stunnel4 "$1/stunnel.conf" >"$1/stunnel.log" 2>&1 &
  TLS_PID=$!
  PIDS+=("$TLS_PID")
  wait_listen "$TLS_PORT" stunnel
}
s3_stop() {
  if [ -n "$TLS_PID" ]; then stop_pid "$TLS_PID"; fi
  stop_pid "$S3_PID"
  S3_PID= TLS_PID=
}
# CPU seconds of the S3 server side: s3s-fs, and stunnel when there is one.
s3_cpu() {
  local tls=0
  if [ -n "$TLS_PID" ]; then tls=$(proc_cpu "$TLS_PID"); fi
  awk -v a="$(proc_cpu "$S3_PID")" -v b="$tls" 'BEGIN { printf "%.2f", a + b }'
}

# tls_ca: once per run, a CA and a certificate for localhost and 127.0.0.1 signed by it, in
# $ROOT/tls (pgBackRest matches only a host name against it, so it connects to localhost).
tls_ca() {
  [ -f "$ROOT/tls/cert.pem" ] && return 0
  mkdir -p "$ROOT/tls"
  (
    cd "$ROOT/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=walhoard-bench-ca
    openssl req -newkey rsa:2048 -nodes -keyout key.pem -out leaf.csr -subj /CN=localhost
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile leaf.ext
  ) >/dev/null 2>&1
}

# pgBackRest: pgbr, pgbr_setup, set_archive_command, PGBR_ARCHIVE are in lib.sh.

# --- phase: WAL drain ---------------------------------------------------------------------
drain_receivewal() {
  local r=$1 d t0 t1 ws0
  d=$ROOT/drain-rw-$r
  mkdir -p "$d/wal"
  ws0=$(reaped_cpu)
  t0=$(now)
  /usr/bin/time -v -o "$d/time" "$PGBIN/pg_receivewal" -h "$SOCK" -p "$PGPORT" -U postgres \
    --slot "rw_$r" --no-sync --no-loop --endpos "$(n2lsn "$TARGET_N")" -D "$d/wal"
  t1=$(now)
  [ -f "$d/wal/$LAST_SEG" ] || { log "pg_receivewal stopped before $LAST_SEG"; return 1; }
  result drain pg_receivewal "$r" "$(elapsed "$t0" "$t1")" "$BACKLOG" "$(du -sb "$d/wal" | cut -f1)" "$(time_rss "$d/time")"
  cpu_result pg_receivewal "$r" "$(awk -F': ' '/User time|System time/ { c += $2 } END { printf "%.2f", c }' "$d/time")" \
    "$(walsender_cpu_since "$ws0")" -
  rm -rf "$d"
  psql_ "select pg_drop_replication_slot('rw_$r')" >/dev/null
}

drain_walhoard() { # drain_walhoard <rep> local|s3|s3-tls
  local r=$1 kind=$2 d=$ROOT/drain-wh-$2-$1 storage t0 t1 rss stored
  mkdir -p "$d"
  if [ "$kind" != local ]; then
    # s3-tls: the same server behind the same TLS proxy as pgbackrest-s3 (HTTPS, the run's CA
    # trusted through SSL_CERT_FILE below).
    local port secure=false
    if [ "$kind" = s3-tls ]; then
      s3_start "$d/s3" tls
      port=$TLS_PORT secure=true
    else
      s3_start "$d/s3"
      port=$S3_PORT
    fi
    storage=$(jq -n --argjson port "$port" --argjson secure "$secure" '{storage_type: "s3",
      bucket_name: "archive", region: "us-east-1", aws_access_key_id: "bench-ak",
      aws_secret_access_key: "bench-secret-key", host: "127.0.0.1", port: $port, is_secure: $secure}')
  else
    storage=$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')
  fi
  wh_config "$d" "wh_${kind//-/_}_$r" "$storage"
  local ws0 cpu helper=-
  ws0=$(reaped_cpu)
  t0=$(now)
  if [ "$kind" = s3-tls ]; then SSL_CERT_FILE=$ROOT/tls/ca.pem wh_start "$d"; else wh_start "$d"; fi
  wh_wait_archived "$d/walhoard.json" "$WH_PID" "$TARGET_N" 1800
  t1=$(now)
  rss=$(vmhwm "$WH_PID")
  cpu=$(proc_cpu "$WH_PID")
  [ "$kind" != local ] && helper=$(s3_cpu)
  stop_pid "$WH_PID"
  cpu_result "walhoard-$kind" "$r" "$cpu" "$(walsender_cpu_since "$ws0")" "$helper"
  local store=$d/archive
  [ "$kind" != local ] && store=$d/s3
  # The archive itself must hold the backlog's last segment, whatever the status said.
  [ -n "$(find "$store" -name "$LAST_SEG" -print -quit)" ] || { log "walhoard: $LAST_SEG not in $store"; return 1; }
  stored=$(du -sb "$store" | cut -f1)
  if [ "$kind" != local ]; then s3_stop; fi
  result drain "walhoard-$kind" "$r" "$(elapsed "$t0" "$t1")" "$BACKLOG" "$stored" "$rss"
  rm -rf "$d"
  psql_ "select pg_drop_replication_slot('wh_${kind//-/_}_$r')" >/dev/null
}

drain_pgbackrest() { # drain_pgbackrest <rep> [s3]
  local r=$1 kind=${2:-posix} t0 t1 last f b tool=pgbackrest-async helper=- store
  # Every run the same backlog: an empty repository and spool, and the backlog's segments
  # (archived by an earlier run) marked ready for the archiver once more.
  if [ "$kind" = s3 ]; then
    tool=pgbackrest-async-s3
    chmod 755 "$ROOT"
    s3_start "$ROOT/drain-pgbr-s3" tls
    pgbr_setup s3
  else
    pgbr_setup
  fi
  for f in "$PGDATA"/pg_wal/archive_status/*.done; do
    [ -e "$f" ] || continue
    b=${f##*/}; b=${b%.done}
    if [[ ! "$b" < "$FIRST_SEG" ]] && [[ ! "$b" > "$LAST_SEG" ]]; then mv "$f" "${f%.done}.ready"; fi
  done
  psql_ "select pg_stat_reset_shared('archiver')" >/dev/null
  t0=$(now)
  set_archive_command "$PGBR_ARCHIVE"
  # The archiver goes in order and renames a segment's .ready to .done once archive_command
  # succeeded, so the last segment's .done ends the run; looking for it forks nothing. A
  # failure is looked for (with psql) only every 5 s.
  local deadline=$((EPOCHSECONDS + 1800)) checked=$EPOCHSECONDS
  while [ ! -e "$PGDATA/pg_wal/archive_status/$LAST_SEG.done" ]; do
    if [ $((EPOCHSECONDS - checked)) -ge 5 ]; then
      checked=$EPOCHSECONDS
      [ "$(psql_ "select failed_count from pg_stat_archiver")" = 0 ] || { log "pgbackrest archive-push failed; see $PGBR/log and $ROOT/pg/server.log"; return 1; }
    fi
    [ "$EPOCHSECONDS" -lt "$deadline" ] || { log "pgbackrest did not archive $LAST_SEG in time"; return 1; }
    nap 0.05
  done
  t1=$(now)
  last=$(psql_ "select coalesce(last_archived_wal, '') || ' ' || failed_count from pg_stat_archiver")
  if [[ "${last% *}" < "$LAST_SEG" ]] || [ "${last#* }" != 0 ]; then
    log "pgbackrest: archiver reports '$last' after $LAST_SEG.done"; return 1
  fi
  set_archive_command ''
  store=$PGBR/repo/archive
  if [ "$kind" = s3 ]; then
    helper=$(s3_cpu)
    s3_stop
    store=$ROOT/drain-pgbr-s3
    # Later phases set up their own (local) repository.
    PGBR=
  fi
  # pgBackRest's CPU is not measured: its async process leaves the archiver's process tree.
  cpu_result "$tool" "$r" - - "$helper"
  result drain "$tool" "$r" "$(elapsed "$t0" "$t1")" "$BACKLOG" "$(du -sb "$store" | cut -f1)" 0
  if [ "$kind" = s3 ]; then rm -rf "$store"; fi
}

# walsender_cpu_since <reaped_cpu before the run>: waits (up to 5 s) until no walsender is
# left, so that its CPU is in reaped_cpu, and prints the CPU seconds the run's walsender used.
walsender_cpu_since() {
  local i
  for i in $(seq 50); do
    [ "$(psql_ "select count(*) from pg_stat_replication")" = 0 ] && break
    nap 0.1
  done
  awk -v a="$1" -v b="$(reaped_cpu)" 'BEGIN { printf "%.2f", b - a }'
}

# drain_floor: the CPU the daemon's per-segment work (SHA-1, zstd 1, encryption) needs for
# this backlog on one core, whatever else it does (benches/drain_floor.rs); into floor-<scale>.txt.
drain_floor() {
  if ! command -v cargo >/dev/null 2>&1; then log "no cargo: drain floor not measured"; return 0; fi
  (cd "$repo" && WALHOARD_BENCH_WAL_DIR=$PGDATA/pg_wal WALHOARD_BENCH_WAL_FIRST=$FIRST_SEG \
    WALHOARD_BENCH_WAL_LAST=$LAST_SEG cargo bench --locked --bench drain_floor 2>"$OUT/floor-build.log") |
    grep '^drain floor' | tee -a "$OUT/floor-$SCALE_LABEL.txt" >&2 || log "drain floor failed: see $OUT/floor-build.log"
}

phase_drain() {
  local r tool
  for r in $(seq "$REPS"); do
    for tool in $DRAIN_TOOLS; do
      warm_backlog
      prefault_memory $((BACKLOG + 268435456))
      case $tool in
        pg_receivewal) drain_receivewal "$r" ;;
        walhoard-local) drain_walhoard "$r" local ;;
        walhoard-s3) drain_walhoard "$r" s3 ;;
        walhoard-s3-tls) drain_walhoard "$r" s3-tls ;;
        pgbackrest) drain_pgbackrest "$r" ;;
        pgbackrest-s3) drain_pgbackrest "$r" s3 ;;
      esac
    done
  done
  drain_floor
}

# --- phase: basebackup --------------------------------------------------------------------
bb_pg_basebackup() {
  local r=$1 d=$ROOT/bb-pg_basebackup t0 t1
  rm -rf "$d"; mkdir -p "$d"
  t0=$(now)
  /usr/bin/time -v -o "$d.time" "$PGBIN/pg_basebackup" -h "$SOCK" -p "$PGPORT" -U postgres \
    -D "$d" -Ft -X none -c fast --compress=client-zstd:1
  t1=$(now)
  result basebackup pg_basebackup "$r" "$(elapsed "$t0" "$t1")" "$DB_BYTES" "$(du -sb "$d" | cut -f1)" "$(time_rss "$d.time")"
}

bb_walhoard() { # bb_walhoard <rep> basic|local-tar [zstd threads]
  local r=$1 mode=$2 threads=${3:-0} d=$ROOT/bb-walhoard-$2-${3:-0} t0 t1 extra name=walhoard-$2
  [ "$threads" = 0 ] || name+="-zstd$threads"
  rm -rf "$d"
  extra=$(jq -n --arg mode "$mode" --arg data "$PGDATA" --argjson threads "$threads" '{basebackup_mode: $mode,
      basebackup_compression_threads: $threads}
    + (if $mode == "local-tar" then {pg_data_directory: $data, basebackup_threads: 2,
         basebackup_chunk_size: 67108864} else {} end)')
  wh_config "$d" "wh_bb" "$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')" "$extra"
  t0=$(now)
  /usr/bin/time -v -o "$d.time" "$WALHOARD" basebackup --config "$d/walhoard.json" --site main >"$d.out" 2>&1 ||
    { log "walhoard basebackup failed: $(tail -5 "$d.out")"; return 1; }
  t1=$(now)
  result basebackup "$name" "$r" "$(elapsed "$t0" "$t1")" "$DB_BYTES" "$(du -sb "$d/archive" | cut -f1)" "$(time_rss "$d.time")"
}

bb_pgbackrest() {
  local r=$1 t0 t1 label
  t0=$(now)
  as_pg /usr/bin/time -v -o "$PGBR/backup.time" pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench --type=full backup
  t1=$(now)
  label=$(ls -d "$PGBR"/repo/backup/bench/*F | sort | tail -1)
  result basebackup pgbackrest-full "$r" "$(elapsed "$t0" "$t1")" "$DB_BYTES" "$(du -sb "$label" | cut -f1)" "$(time_rss "$PGBR/backup.time")"
}

phase_basebackup() {
  local r tool
  # pgBackRest's backup waits for its WAL to be archived, so archiving runs in this phase.
  if [[ " $BB_TOOLS " == *" pgbackrest "* ]]; then
    [ -n "$PGBR" ] || pgbr_setup
    set_archive_command "$PGBR_ARCHIVE"
  fi
  for r in $(seq "$REPS"); do
    for tool in $BB_TOOLS; do
      case $tool in
        pg_basebackup) bb_pg_basebackup "$r" ;;
        walhoard-basic) bb_walhoard "$r" basic ;;
        walhoard-basic-zstd2) bb_walhoard "$r" basic 2 ;;
        walhoard-local-tar) bb_walhoard "$r" local-tar ;;
        pgbackrest) bb_pgbackrest "$r" ;;
      esac
    done
  done
  set_archive_command ''
}

# --- phase: live lag ----------------------------------------------------------------------
pct() { # pct <file> <column> <percentile>: nearest-rank percentile, in MiB
  awk -v c="$2" '{ print $c }' "$1" | sort -n | awk -v p="$3" '{ v[NR] = $1 }
    END { i = int((p / 100) * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.1f", v[i] / 1048576 }'
}

phase_lag() {
  local r d cfg boundary t0 start_n end_n cur a rc samples
  for r in $(seq "$REPS"); do
    d=$ROOT/lag-$r
    psql_ "select pg_create_physical_replication_slot('wh_lag_$r', true)" >/dev/null
    wh_config "$d" "wh_lag_$r" "$(jq -n --arg dir "$d/archive" '{storage_type: "local", directory: $dir}')"
    cfg=$d/walhoard.json
    wh_start "$d"
    # Caught up before the load starts: the first segment is archived.
    boundary=$(($(lsn2n "$(psql_ 'select pg_switch_wal()')") + SEG - 1))
    psql_ "checkpoint" >/dev/null
    wh_wait_archived "$cfg" "$WH_PID" $((boundary / SEG * SEG)) 120
    start_n=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
    t0=$(now)
    "$PGBIN/pgbench" -n -c 4 -j 2 -T "$LAG_SECONDS" -h "$SOCK" -p "$PGPORT" -U postgres postgres >"$d/pgbench.log" 2>&1 &
    local bench=$!
    PIDS+=("$bench")
    : >"$d/samples"
    local tick wait_ms port
    port=$(jq -r .http_port "$cfg")
    tick=$(($(date +%s%N) / 1000000))
    # Archived: walhoard's archived_lsn (GET /status). Sent: the walsender's sent_lsn, what
    # has left the server (walhoard's received_lsn is only refreshed at status updates).
    while kill -0 "$bench" 2>/dev/null; do
      local pos
      pos=$(psql_ "select pg_current_wal_lsn() || ' ' || coalesce((select sent_lsn from pg_stat_replication where application_name <> 'pg_basebackup' limit 1)::text, '')")
      cur=$(lsn2n "${pos% *}")
      rc=${pos#* }
      wh_archived_n "$port"
      if [ "$WH_ARCHIVED_N" -gt 0 ] && [ -n "$rc" ]; then
        echo "$(($(date +%s%N) / 1000000)) $((cur - WH_ARCHIVED_N)) $((cur - $(lsn2n "$rc")))" >>"$d/samples"
      fi
      # Every 0.5 s, however long the sample took.
      tick=$((tick + 500))
      wait_ms=$((tick - $(date +%s%N) / 1000000))
      if [ "$wait_ms" -gt 0 ]; then sleep "$(awk -v m="$wait_ms" 'BEGIN { print m / 1000 }')"; fi
    done
    wait "$bench" || { log "pgbench failed: $(tail -3 "$d/pgbench.log")"; return 1; }
    end_n=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
    samples=$(wc -l <"$d/samples")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SCALE_LABEL" "$r" "$(elapsed "$t0" "$(now)")" $((end_n - start_n)) "$samples" \
      "$(pct "$d/samples" 2 50)" "$(pct "$d/samples" 2 95)" "$(pct "$d/samples" 2 100)" \
      "$(pct "$d/samples" 3 50)" "$(pct "$d/samples" 3 95)" "$(pct "$d/samples" 3 100)" "$(loads | tr ' ' ,)" >>"$OUT/lag.tsv"
    log "lag run $r: $(tail -1 "$OUT/lag.tsv"); $(grep -E '^tps' "$d/pgbench.log" | head -1)"
    cp "$d/samples" "$OUT/lag-samples-$SCALE_LABEL-$r.txt"
    stop_pid "$WH_PID"
    rm -rf "$d"
    psql_ "select pg_drop_replication_slot('wh_lag_$r')" >/dev/null
  done
}

# --- phase: restore -----------------------------------------------------------------------
# One walhoard basebackup (local-tar, the mode the basebackup phase shows ahead) and one
# pgBackRest full backup of the same database, taken back to back; then pgbench writes WAL that
# both archives receive (walhoard: a daemon on its own slot; pgBackRest: archive_command), so
# recovery to the end of the archive replays the same WAL for both. Each run restores into an
# empty directory and starts PostgreSQL on it until it has left recovery.
RS=
rs_check() { # rs_check <socket dir> <port>: what both restored servers must return
  "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -d postgres -c \
    "select (select sum(abalance) || ',' || count(*) from pgbench_accounts) || ',' ||
            (select sum(tbalance) from pgbench_tellers) || ',' || (select count(*) from pgbench_history)"
}

restore_setup() {
  RS=$ROOT/restore
  rm -rf "$RS"
  mkdir -p "$RS/runs"
  chown postgres: "$RS/runs"
  # PostgreSQL runs the restore_command as 'postgres': the binary must be where it can run it.
  install -m 755 "$WALHOARD" "$RS/walhoard"
  psql_ "select pg_create_physical_replication_slot('wh_restore', true)" >/dev/null
  local extra
  extra=$(jq -n --arg data "$PGDATA" --argjson keys "$KEYS" '{basebackup_mode: "local-tar",
    pg_data_directory: $data, basebackup_threads: 2, basebackup_chunk_size: 67108864} + $keys')
  wh_config "$RS/wh" wh_restore "$(jq -n --arg dir "$RS/wh/archive" '{storage_type: "local", directory: $dir}')" "$extra"
  RS_CFG=$RS/wh/walhoard.json
  # The daemon runs from before the backup to the end of the WAL: it archives both.
  wh_start "$RS/wh"
  local daemon=$WH_PID
  [ -n "$PGBR" ] || pgbr_setup
  set_archive_command "$PGBR_ARCHIVE"
  log "restore: walhoard basebackup (local-tar, 2 threads) and pgbackrest full backup"
  "$RS/walhoard" basebackup --config "$RS_CFG" --site main >"$RS/wh-backup.out" 2>&1 ||
    { log "walhoard basebackup failed: $(tail -5 "$RS/wh-backup.out")"; return 1; }
  pgbr --type=full backup
  local wal0 sw end_n last_seg
  wal0=$(lsn2n "$(psql_ 'select pg_current_wal_lsn()')")
  # A fixed number of transactions, not a duration: the same WAL whatever the load.
  log "restore: pgbench -n -c 4 -j 2 -t $((RESTORE_TX / 4)) for the WAL to replay"
  "$PGBIN/pgbench" -n -c 4 -j 2 -t "$((RESTORE_TX / 4))" -h "$SOCK" -p "$PGPORT" -U postgres postgres >"$RS/pgbench.log" 2>&1 ||
    { log "pgbench failed: $(tail -3 "$RS/pgbench.log")"; return 1; }
  sw=$(psql_ "select pg_switch_wal()")
  end_n=$((($(lsn2n "$sw") + SEG - 1) / SEG * SEG))
  last_seg=$(psql_ "select pg_walfile_name('$sw')")
  RS_WAL=$((end_n - wal0))
  log "restore: $((RS_WAL / 1048576)) MiB of WAL after the backups ($(grep -E '^tps' "$RS/pgbench.log" | head -1)); last segment $last_seg"
  wh_wait_archived "$RS_CFG" "$daemon" "$end_n" 600
  local deadline=$(($(date +%s) + 600)) last
  while :; do
    last=$(psql_ "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    if [ -n "$last" ] && [[ ! "$last" < "$last_seg" ]]; then break; fi
    [ "$(date +%s)" -lt "$deadline" ] || { log "pgbackrest did not archive $last_seg in time"; return 1; }
    sleep 0.2
  done
  [ -n "$(find "$RS/wh/archive" -name "$last_seg" -print -quit)" ] || { log "walhoard: $last_seg not in its archive"; return 1; }
  stop_pid "$daemon"
  set_archive_command ''
  psql_ "select pg_drop_replication_slot('wh_restore')" >/dev/null
  RS_EXPECT=$(rs_check "$SOCK" "$PGPORT")
  RS_WH_STORED=$(du -sb "$RS/wh/archive/main/basebackup_chunk" | cut -f1)
  RS_PGBR_STORED=$(du -sb "$(ls -d "$PGBR"/repo/backup/bench/*F | sort | tail -1)" | cut -f1)
  log "restore: primary at the end of the WAL: $RS_EXPECT"
}

# restored_up <tool> <rep> <data dir> <restore start> <restore end> <stored bytes>: starts
# PostgreSQL on the restored directory, times recovery until it accepts read-write work, checks
# the data and writes the rows.
restored_up() {
  local tool=$1 r=$2 d=$3 t0=$4 t1=$5 stored=$6 bytes port sock t2 state got deadline pid
  bytes=$(du -sb "$d" | cut -f1)
  port=$(free_port)
  sock=$d.sock
  mkdir -p "$sock"
  chown postgres: "$sock"
  # Its own port and socket, and no archiving (it would push a new timeline into the archive).
  as_pg "$PGBIN/pg_ctl" -D "$d" -l "$d.log" -W -s \
    -o "-c port=$port -c unix_socket_directories=$sock -c archive_mode=off" start
  deadline=$(($(date +%s) + 1800))
  while :; do
    [ -n "${pid:-}" ] || { pid=$(head -1 "$d/postmaster.pid" 2>/dev/null || true); [ -z "$pid" ] || PIDS+=("$pid"); }
    state=$("$PGBIN/psql" -X -At -h "$sock" -p "$port" -U postgres -d postgres -c "select pg_is_in_recovery()" 2>/dev/null || true)
    [ "$state" = f ] && break
    if [ -n "${pid:-}" ] && ! kill -0 "$pid" 2>/dev/null; then log "$tool: restored server exited: $(tail -5 "$d.log")"; return 1; fi
    [ "$(date +%s)" -lt "$deadline" ] || { log "$tool: still in recovery after 30 min"; return 1; }
    sleep 0.1
  done
  t2=$(now)
  got=$(rs_check "$sock" "$port")
  as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w -s stop
  cp "$d.log" "$OUT/restore-$SCALE_LABEL-$tool-$r.log"
  cp "$d.out" "$OUT/restore-$SCALE_LABEL-$tool-$r.out"
  if [ "$got" != "$RS_EXPECT" ]; then
    log "$tool: restored data differs from the primary's: $got, expected $RS_EXPECT (log: $d.log)"
    return 1
  fi
  local rss sync
  rss=$(time_rss "$d.time")
  # PostgreSQL fsyncs the whole data directory before recovery starts (the backup's pg_control
  # says it was not shut down): from "was interrupted" to "starting archive recovery".
  sync=$(awk '/database system was interrupted/ && !a { split($2, t, ":"); a = t[1] * 3600 + t[2] * 60 + t[3] }
    /starting archive recovery/ && a { split($2, t, ":"); printf "%.2f", t[1] * 3600 + t[2] * 60 + t[3] - a; exit }' "$d.log")
  result restore-get "$tool" "$r" "$(elapsed "$t0" "$t1")" "$bytes" "$stored" "$rss"
  result restore-recovery "$tool" "$r" "$(elapsed "$t1" "$t2")" "$RS_WAL" 0 0
  result restore-startup-sync "$tool" "$r" "${sync:-0}" "$bytes" 0 0
  result restore "$tool" "$r" "$(elapsed "$t0" "$t2")" "$bytes" "$stored" "$rss"
  grep -hE 'redo done|archive recovery complete|selected new timeline' "$d.log" | sed "s/^/  $tool: /" >&2 || true
  rm -rf "$d" "$sock"
}

restore_dir() { # an empty data directory, as PostgreSQL wants it
  rm -rf "$1" "$1.sock" "$1.log" "$1.out" "$1.time"
  mkdir -m 700 "$1"
  chown postgres: "$1"
}

restore_walhoard() {
  local r=$1 d=$RS/runs/walhoard t0 t1
  restore_dir "$d"
  # WALHOARD_BENCH_PERF=1: under `perf record -g` (which slows it), into $OUT/perf-restore-*.data.
  local perf=()
  [ -z "${WALHOARD_BENCH_PERF:-}" ] || perf=(perf record -g -q -o "$OUT/perf-restore-$SCALE_LABEL-$r.data" --)
  t0=$(now)
  "${perf[@]}" runuser -u postgres -- /usr/bin/time -v -o "$d.time" "$RS/walhoard" restore get-basebackup --config "$RS_CFG" --site main \
    --target-dir "$d" --restore-to-primary >"$d.out" 2>&1 ||
    { log "walhoard restore get-basebackup failed: $(tail -5 "$d.out")"; return 1; }
  t1=$(now)
  restored_up walhoard "$r" "$d" "$t0" "$t1" "$RS_WH_STORED"
}

restore_pgbackrest() {
  local r=$1 d=$RS/runs/pgbackrest t0 t1
  restore_dir "$d"
  t0=$(now)
  as_pg /usr/bin/time -v -o "$d.time" pgbackrest --config="$PGBR/pgbackrest.conf" --stanza=bench \
    --pg1-path="$d" --process-max=2 --type=default restore >"$d.out" 2>&1 ||
    { log "pgbackrest restore failed: $(tail -5 "$d.out")"; return 1; }
  t1=$(now)
  restored_up pgbackrest "$r" "$d" "$t0" "$t1" "$RS_PGBR_STORED"
}

phase_restore() {
  restore_setup
  local r
  for r in $(seq "$REPS"); do
    restore_walhoard "$r"
    restore_pgbackrest "$r"
  done
}

# --- a scenario: one primary, the phases over it --------------------------------------------
scenario() { # scenario <scale> <wal MiB> <phases...>
  local scale=$1 wal=$2; shift 2
  SCALE_LABEL="s$scale"
  local slots="anchor" r t
  for r in $(seq "$REPS"); do
    for t in $DRAIN_TOOLS; do
      case $t in
        pg_receivewal) slots+=" rw_$r" ;;
        walhoard-local) slots+=" wh_local_$r" ;;
        walhoard-s3) slots+=" wh_s3_$r" ;;
        walhoard-s3-tls) slots+=" wh_s3_tls_$r" ;;
      esac
    done
  done
  pg_up "$scale" "$wal" "$slots"
  PGBR=
  local p
  for p in "$@"; do
    log "== phase $p (scale $scale)"
    "phase_$p"
  done
  pg_down
  rm -rf "${ROOT:?}"/*
}

main_phases=()
for p in $PHASES; do
  case $p in
    drain | basebackup | lag | restore) main_phases+=("$p") ;;
    memory) ;;
    *) echo "unknown phase $p (drain basebackup lag restore memory)" >&2; exit 2 ;;
  esac
done
if [ ${#main_phases[@]} -gt 0 ]; then
  DRAIN_TOOLS=${WALHOARD_BENCH_DRAIN_TOOLS:-"pg_receivewal walhoard-local walhoard-s3 pgbackrest walhoard-s3-tls pgbackrest-s3"}
  BB_TOOLS="pg_basebackup walhoard-basic walhoard-basic-zstd2 walhoard-local-tar pgbackrest"
  scenario "$SCALE" "$WAL_MIB" "${main_phases[@]}"
fi
if [[ " $PHASES " == *" memory "* ]]; then
  # The same walhoard runs at a quarter of the size: peak RSS should not change.
  DRAIN_TOOLS="walhoard-local"
  BB_TOOLS="walhoard-basic walhoard-local-tar"
  scenario $((SCALE / 4 > 0 ? SCALE / 4 : 1)) $((WAL_MIB / 4)) drain basebackup
fi
echo "load at end: $(loads)" >>"$OUT/machine.txt"
"$here/summarize.sh" "$OUT" | tee "$OUT/summary.md"
