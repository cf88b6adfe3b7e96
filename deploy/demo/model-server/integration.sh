#!/bin/sh
# Integration suite: starts the built server on a free port and asks it a question.
set -eu
bin="$SLIPWAY_ARTIFACT_DIR/dist/model-server"
# Below the ephemeral range, where every test's servers pick their ports; another port when
# the server cannot bind this one (it exits at once).
for try in 1 2 3 4 5; do
    port=$((10000 + ($$ * 7 + try * 1009) % 20000))
    "$bin" --port "$port" --config "$SLIPWAY_ARTIFACT_DIR/dist/model.conf" &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    sleep 0.2
    if kill -0 "$pid" 2>/dev/null; then
        break
    fi
    [ "$try" -lt 5 ] || { echo "no free port for the server" >&2; exit 1; }
done
"$bin" --wait-healthy "http://127.0.0.1:$port/healthz" --timeout 10
"$bin" --get "http://127.0.0.1:$port/version"
"$bin" --get "http://127.0.0.1:$port/metrics" | grep -q demo_requests_total
