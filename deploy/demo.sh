#!/usr/bin/env bash
# The main job: a whole run of the example project through every stage of its pipeline,
# against a local nats-server that `slipway demo` starts (and stops) for you.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cargo build --release --bins --locked
exec target/release/slipway demo "$@"
