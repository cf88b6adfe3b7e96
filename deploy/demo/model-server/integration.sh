#!/bin/sh
# Integration suite: starts the built server on a free port and asks it a question.
set -eu
bin="$SLIPWAY_ARTIFACT_DIR/dist/model-server"
port=$((20000 + $$ % 20000))
"$bin" --port "$port" --config "$SLIPWAY_ARTIFACT_DIR/dist/model.conf" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
"$bin" --wait-healthy "http://127.0.0.1:$port/healthz" --timeout 10
"$bin" --get "http://127.0.0.1:$port/version"
"$bin" --get "http://127.0.0.1:$port/metrics" | grep -q demo_requests_total
