#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 60) each; non-zero exit on a crash.
# fuzz/ holds the targets on the protocol and basebackup crates; fuzz/app/ those that need the
# whole walhoard crate (configuration, encrypted-object decoder), run only with FUZZ_APP=1:
# building all of walhoard under the address sanitizer takes several minutes on two cores.
# The machine has a stable toolchain only: RUSTC_BOOTSTRAP=1 lets it accept the nightly flags
# (-Zsanitizer=address) that cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
dirs=(fuzz)
if [ "${FUZZ_APP:-0}" = 1 ]; then dirs+=(fuzz/app); fi
for dir in "${dirs[@]}"; do
  for target in $(cargo fuzz list --fuzz-dir "$dir"); do
    echo "== fuzzing $dir/$target for ${FUZZ_SECONDS:-60}s"
    cargo fuzz run --fuzz-dir "$dir" "$target" -- -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=2048
  done
done
