#!/bin/sh
# Deploys the model server to one environment (or one slot of it): stops what runs there,
# starts the new version from the unpacked artifact on its port, and waits until it is healthy.
# Slipway gives SLIPWAY_ENVIRONMENT, SLIPWAY_VERSION, SLIPWAY_ARTIFACT_DIR,
# SLIPWAY_PREVIOUS_VERSION, and in an environment with a rollout SLIPWAY_SLOT (stable or
# candidate: the two run side by side behind the demo's router); the pipeline spec gives PORT
# (the stable slot's), CANDIDATE_PORT and DEMO_STATE_DIR (where servers and their pids live).
set -eu
place="$SLIPWAY_ENVIRONMENT"
port="$PORT"
if [ -n "${SLIPWAY_SLOT:-}" ]; then
    place="$SLIPWAY_ENVIRONMENT-$SLIPWAY_SLOT"
    if [ "$SLIPWAY_SLOT" = candidate ]; then
        port="$CANDIDATE_PORT"
    fi
fi
state="$DEMO_STATE_DIR/$place"
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
setsid "$dest/dist/model-server" --port "$port" --config "$dest/dist/model.conf" --environment "$SLIPWAY_ENVIRONMENT" \
    >"$state/server.log" 2>&1 </dev/null &
echo $! >"$state/pid"
echo "$SLIPWAY_VERSION" >"$state/version"
if ! "$dest/dist/model-server" --wait-healthy "http://127.0.0.1:$port/healthz" --timeout 10; then
    # Why it never answered (a port taken, a bad config) is in the server's own log.
    tail -n 5 "$state/server.log" >&2
    exit 1
fi
echo "deployed $SLIPWAY_VERSION to $place on port $port (previous: ${SLIPWAY_PREVIOUS_VERSION:-none})"
