#!/bin/sh
# Deploys the model server to one environment: stops what runs there, starts the new version
# from the unpacked artifact on the environment's port, and waits until it is healthy.
# Slipway gives SLIPWAY_ENVIRONMENT, SLIPWAY_VERSION, SLIPWAY_ARTIFACT_DIR, SLIPWAY_PREVIOUS_VERSION;
# the pipeline spec gives PORT and DEMO_STATE_DIR (where servers and their pids live).
set -eu
state="$DEMO_STATE_DIR/$SLIPWAY_ENVIRONMENT"
mkdir -p "$state"
if [ -f "$state/pid" ]; then
    old=$(cat "$state/pid")
    kill "$old" 2>/dev/null || true
    i=0
    while kill -0 "$old" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
dest="$state/$SLIPWAY_VERSION"
rm -rf "$dest"
mkdir -p "$dest"
cp -R "$SLIPWAY_ARTIFACT_DIR"/. "$dest"/
# A session of its own, so the server outlives this deploy command.
setsid "$dest/dist/model-server" --port "$PORT" --config "$dest/dist/model.conf" --environment "$SLIPWAY_ENVIRONMENT" \
    >"$state/server.log" 2>&1 </dev/null &
echo $! >"$state/pid"
echo "$SLIPWAY_VERSION" >"$state/version"
"$dest/dist/model-server" --wait-healthy "http://127.0.0.1:$PORT/healthz" --timeout 10
echo "deployed $SLIPWAY_VERSION to $SLIPWAY_ENVIRONMENT on port $PORT (previous: ${SLIPWAY_PREVIOUS_VERSION:-none})"
