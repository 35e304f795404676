#!/usr/bin/env bash
# The customer-controlled keys part of the demo (issue 9), on the eu KMS node: one org per flow.
#   byok-co   BYOK: the customer wraps a DEK to the org's certificate and uploads it (NONE)
#   cache-co  cache-only: the reference key service (HTTPS, client certificates) serves the DEK;
#             the customer revokes it and the KMS fails closed
#   ekm-co    EKM: the root key in an AWS-KMS-compatible server (moto) on 127.0.0.1
# The key service and moto are started here and stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
set -a; . $VAR/demo-pins.env; set +a
step() { printf '\n== %s\n' "$*"; }
EU=$VAR/kms/eu.toml
C=$VAR/customer
# The customer's BYOK key pins (`kms byok wrap` pins per user, in ~/.config by default): the
# demo's customer keeps them with the demo, so `make clean` forgets them with the keys.
export HSM_SUITE_BYOK_PINS=$PWD/$C/byok-pins.json
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
# Each flow is skipped only when its org is *complete* (an ACTIVE key), so a demo interrupted
# anywhere in here finishes what it started when run again, and a second full run makes nothing.
. scripts/demo-lib.sh
if complete byok-co && complete cache-co && complete ekm-co; then
    step "customer-key orgs complete already (a second make demo): skipped"
    exit 0
fi
mkdir -p $C/keys
# A throw-away TLS PKI for the two local servers (CA + a 127.0.0.1 server cert, and a client CA
# + client cert for the key service's mTLS); made again if an interrupted run left it half-made.
if [ ! -f $C/tls-client/leaf.key ]; then
    rm -rf $C/tls-server $C/tls-client
    py - $C <<'PY'
import sys
from pathlib import Path
from tests.localtls import make_pki
make_pki(Path(sys.argv[1]) / "tls-server")
make_pki(Path(sys.argv[1]) / "tls-client", client=True)
PY
fi
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

if complete byok-co; then
    step "BYOK (byok-co): complete already, skipped"
else
step "BYOK (byok-co): an org without a secret, its DEK certificate made in the regional HSM"
has_org byok-co || kms --config $EU tenant create --org byok-co --type sandbox --no-secret
[ -f $C/byok-co-dek.pem ] ||
    kms --config $EU byok certificate --org byok-co --purpose dek --out $C/byok-co-dek.pem
step "customer side (no HSM): a fresh DEK from the OS CSPRNG, RSA-OAEP-wrapped to the certificate"
if [ ! -f $C/byok-co/secret.sha256.b64 ]; then
    rm -rf $C/byok-co
    kms byok wrap --cert $C/byok-co-dek.pem --generate --out $C/byok-co
fi
step "upload: unwrapped and hash-checked inside the HSM, stored wrapped"
kms --config $EU tenant byok-upload --org byok-co --derivation NONE \
    --secret $C/byok-co/secret.b64 --hash $C/byok-co/secret.sha256.b64
B=$(kms --config $EU encrypt --org byok-co "byok record")
kms --config $EU decrypt --org byok-co "$B"
step "the same upload again: refused (rate limit / replay)"
kms --config $EU tenant byok-upload --org byok-co --derivation NONE \
    --secret $C/byok-co/secret.b64 --hash $C/byok-co/secret.sha256.b64 || true
fi

if complete cache-co; then
    step "cache-only (cache-co): complete already, skipped"
else
step "cache-only (cache-co): the reference key service on 127.0.0.1 with client certificates"
has_org cache-co || kms --config $EU tenant create --org cache-co --type sandbox --no-secret
[ -f $C/cache-co-seed.pem ] ||
    kms --config $EU byok certificate --org cache-co --out $C/cache-co-seed.pem
python3 -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())" > $C/keys/cache-co-k1.dek
cp $C/cache-co-seed.pem $C/keys/cache-co-k1.pem
KP=$(free_port)
kms keyservice serve --keys $C/keys --cert $C/tls-server/leaf.pem --key $C/tls-server/leaf.key \
    --client-ca $C/tls-client/ca.pem --port $KP 2>$C/keyservice.log &
PIDS+=($!)
wait_port $KP
kms --config $EU cache-only add --org cache-co --url https://127.0.0.1:$KP --kid cache-co-k1 \
    --ca $C/tls-server/ca.pem --client-cert $C/tls-client/leaf.pem --client-key $C/tls-client/leaf.key
K=$(kms --config $EU encrypt --org cache-co "cache-only record")
kms --config $EU decrypt --org cache-co "$K"
step "the customer revokes the key (removes it from the key service): the KMS fails closed"
rm $C/keys/cache-co-k1.dek
kms --config $EU decrypt --org cache-co "$K" || true
fi

if complete ekm-co; then
    step "EKM (ekm-co): complete already, skipped"
    exit 0
fi
step "EKM (ekm-co): the root key in the customer's AWS KMS (moto server over TLS on 127.0.0.1)"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=eu-west-1
MP=$(free_port)
moto_server -H 127.0.0.1 -p $MP -c $C/tls-server/leaf.pem -k $C/tls-server/leaf.key \
    >/dev/null 2>&1 &
PIDS+=($!)
wait_port $MP
ARN=$(py - https://127.0.0.1:$MP $C/tls-server/ca.pem <<'PY'
import sys, boto3
kms = boto3.client("kms", endpoint_url=sys.argv[1], verify=sys.argv[2], region_name="eu-west-1")
print(kms.create_key(Description="ekm-co root key")["KeyMetadata"]["Arn"])
PY
)
step "the least-privilege key policy the customer applies (JSON only on stdout)"
kms ekm policy --org ekm-co --principal arn:aws:iam::123456789012:role/kms-eu --key-arn "$ARN"
has_org ekm-co || kms --config $EU tenant create --org ekm-co --type sandbox --no-secret
# (again after an interrupted run: moto keeps its keys in memory, so the root key is new)
kms --config $EU ekm add --org ekm-co --key-id "$ARN" --endpoint-url https://127.0.0.1:$MP \
    --ca-bundle $C/tls-server/ca.pem
kms --config $EU tenant rotate --org ekm-co --source ekm
E=$(kms --config $EU encrypt --org ekm-co "ekm record")
kms --config $EU decrypt --org ekm-co "$E"
kms --config $EU tenant list --org ekm-co
step "stopping the key service and moto: nothing outlives the demo"
cleanup; PIDS=()
kms --config $EU decrypt --org ekm-co "$E" || true
