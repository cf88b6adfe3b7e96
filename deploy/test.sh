#!/usr/bin/env bash
# The test command (README, CI): install nats-server if needed, build the service binaries the
# end-to-end tests start as processes, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh --old-server --browser --python-tools --ops-tools
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
