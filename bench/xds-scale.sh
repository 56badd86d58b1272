#!/usr/bin/env bash
# Control-plane scale benchmark: N simulated proxies (lightweight ADS clients
# in one process) against a mesh of 1,000 services and 10,000 endpoints; the
# time for one change to reach them (p50, p99, max), control-plane memory
# and CPU, config size, and one real proxy's memory. Results go to
# bench/RESULTS.md (its own section, below the data-plane one). See
# bench/README.md.
#
# Environment: XDS_SCALE_BUILD=0 skips the cargo builds; MESHWORK_BIN picks
# the meshwork binary for the real-proxy measurement (default
# target/release/meshwork, built here); XDS_SCALE_RESULTS the results file
# (empty: print only). Extra arguments go to the program (e.g. --proxies 200;
# `--help` lists them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
# The benchmark is its own workspace; sharing the main target directory
# shares the compiled dependencies with the main release build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
MESHWORK_BIN=${MESHWORK_BIN:-$CARGO_TARGET_DIR/release/meshwork}

if [ "${XDS_SCALE_BUILD:-1}" != 0 ]; then
    echo "== cargo build --release (bench/xds-scale)" >&2
    cargo build --release --manifest-path bench/xds-scale/Cargo.toml
    if [ "$MESHWORK_BIN" = "$CARGO_TARGET_DIR/release/meshwork" ]; then
        echo "== cargo build --release -p meshwork (the real proxy)" >&2
        cargo build --release -p meshwork
    fi
fi

# 1,000 client connections plus as many on the server side.
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

args=()
if [ -x "$MESHWORK_BIN" ]; then
    args+=(--meshwork "$MESHWORK_BIN")
else
    echo "no meshwork binary at $MESHWORK_BIN: the real-proxy row is skipped" >&2
fi
results=${XDS_SCALE_RESULTS-bench/RESULTS.md}
if [ -n "$results" ]; then
    args+=(--results "$results")
fi
exec "$CARGO_TARGET_DIR/release/xds-scale" "${args[@]}" "$@"
