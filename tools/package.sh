#!/usr/bin/env bash
# Builds walhoard's Debian package with cargo-deb ([package.metadata.deb] in Cargo.toml),
# installs it on this machine with dpkg -i, and checks what it installed: the binary runs
# (`/usr/bin/walhoard --version`), the sample configuration validates
# (`walhoard check --config-only` on /etc/walhoard/walhoard.json.example) and the systemd units
# pass `systemd-analyze verify` where that tool exists. Needs root (dpkg -i). Installs
# cargo-deb when it is missing (cargo install --locked). A release build: minutes, not for CI.
# WALHOARD_DEB_OUT=dir keeps the .deb there (default target/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== package: %s\033[0m\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "dpkg -i needs root"
command -v dpkg >/dev/null || fail "dpkg is needed (a Debian-based system)"

if ! command -v cargo-deb >/dev/null 2>&1; then
  step "installing cargo-deb (cargo install --locked cargo-deb)"
  cargo install --locked cargo-deb
fi

step "cargo deb (release build)"
out=${WALHOARD_DEB_OUT:-target/debian}
mkdir -p "$out"
# cargo-deb prints the path of the package it wrote as its last line.
deb=$(cargo deb --locked --output "$out" | tail -n 1)
[ -f "$deb" ] || fail "cargo deb did not write a package (got: $deb)"
echo "$deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"

step "dpkg -i"
dpkg -i "$deb"

step "installed files"
for f in /usr/bin/walhoard /usr/lib/systemd/system/walhoard.service \
         /usr/lib/systemd/system/walhoard@.service /etc/walhoard/walhoard.json.example; do
  [ -e "$f" ] || fail "$f is not installed"
  echo "ok $f"
done

step "/usr/bin/walhoard --version"
/usr/bin/walhoard --version

step "walhoard check --config-only /etc/walhoard/walhoard.json.example"
/usr/bin/walhoard check --config-only --config /etc/walhoard/walhoard.json.example

if command -v systemd-analyze >/dev/null 2>&1; then
  step "systemd-analyze verify (units as installed)"
  # An instance of the template is verified as a copy named like one (walhoard@example).
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  cp /usr/lib/systemd/system/walhoard@.service "$scratch/walhoard@example.service"
  # verify exits 0 on directives it ignores (a misspelt Type=, say) and only prints them:
  # any output counts as a failure.
  report=$(systemd-analyze verify /usr/lib/systemd/system/walhoard.service \
    "$scratch/walhoard@example.service" 2>&1) || fail "systemd-analyze verify: $report"
  [ -z "$report" ] || fail "systemd-analyze verify reported problems in walhoard's units: $report"
  echo "ok: both units verify"
fi

step "done: $deb installed and checked"
