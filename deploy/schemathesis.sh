#!/usr/bin/env bash
# Schemathesis against the gateway's own OpenAPI document (/openapi.json), on a private stack:
# no 5xx and no response that breaks the document (status codes, content types, schemas,
# headers). Bounded: --max-examples per operation (default 100). Needs a release build.
#   bash deploy/schemathesis.sh [max-examples]
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-100}
work=$(mktemp -d)
trap 'kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q schemathesis
token=schemathesis-approver-token
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/slipway.toml" <<TOML
[gateway]
listen = "127.0.0.1:$port"
[[gateway.approvers]]
name = "bob"
groups = ["release-managers"]
token_sha256 = "$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
TOML
"${SLIPWAY_BIN:-target/release}"/slipway up --config "$work/slipway.toml" --port "$nats" --data-dir "$work/data" >"$work/up.log" 2>&1 &
up=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
# A real run, so the run operations are reached with an id that exists.
run=$(SLIPWAY_DATA_DIR="$work/data" "${SLIPWAY_BIN:-target/release}"/slipway --nats-url "nats://127.0.0.1:$nats" submit deploy/examples/hello/slipway.toml \
  --source deploy/examples/hello --wait --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
cat > "$work/schemathesis.toml" <<TOML
headers = { Authorization = "Bearer $token" }
[parameters]
id = "$run"
stage = "build"
TOML
cd "$work"
"$work/venv/bin/st" run "http://127.0.0.1:$port/openapi.json" -n "$examples" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance
