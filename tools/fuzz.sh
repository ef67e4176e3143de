#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 60) each; non-zero exit on a crash.
# The machine has a stable toolchain only: RUSTC_BOOTSTRAP=1 lets it accept the nightly flags
# (-Zsanitizer=address) that cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  echo "== fuzzing $target for ${FUZZ_SECONDS:-60}s"
  cargo fuzz run "$target" -- -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=2048
done
