#!/usr/bin/env bash
# The test command (README, CI): install nats-server if needed, build the service binaries the
# end-to-end tests start as processes, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
