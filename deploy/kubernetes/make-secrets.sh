#!/usr/bin/env bash
# Writes the secrets kustomization.yaml turns into Secrets, once, into secrets/ (keep them out of
# version control): a random password per NATS user and the gateway's signing key pair.
# Needs the `slipway` command on PATH.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p secrets
chmod 700 secrets
if [ ! -f secrets/nats.env ]; then
    umask 077
    for user in admin conductor builder tester deployer monitor gateway model-evaluator perf-regression cost-estimator cli; do
        var="SLIPWAY_NATS_PASS_$(echo "$user" | tr 'a-z-' 'A-Z_')"
        echo "$var=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" >> secrets/nats.env
    done
fi
if [ ! -f secrets/approval-signing.key ]; then
    public=$(slipway keygen --seed-file secrets/approval-signing.key)
    echo "SLIPWAY__APPROVALS__PUBLIC_KEY=$public" > secrets/approvals.env
fi
echo "secrets written to $(pwd)/secrets"
