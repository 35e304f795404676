#!/usr/bin/env bash
# The XKS proxy: a token "xks" with one AES-256 encrypt/decrypt key, a node configuration whose
# only table is [xks] (one key store, prefix /demo, SigV4 credential from a 0600 file), the node
# started on 127.0.0.1, one Encrypt and one Decrypt with `curl --aws-sigv4` exactly as the
# specification's Appendix D does it, and the node stopped. Safe to run twice: the token, key,
# TLS material, credential and configuration are made once and reported afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
XKS=$VAR/xks
umask 077
grep -q '^HSM_PIN_XKS=' $VAR/demo-pins.env || python3 - >> $VAR/demo-pins.env <<'PY'
import secrets
print(f"HSM_SO_PIN_XKS={secrets.token_hex(8)}")
print(f"HSM_PIN_XKS={secrets.token_hex(6)}")
PY
set -a; . $VAR/demo-pins.env; set +a
step() { printf '\n== %s\n' "$*"; }
mkdir -p $XKS/secrets

step "XKS token and key: AES-256 generated in the token, AES-GCM only, never extractable"
hsm init-token --label xks
hsm xks-key create --token xks --id demo-key --usage encrypt,decrypt

step "TLS material in $XKS/tls, the key store's SigV4 credential in $XKS/secrets (0600)"
python3 -m kms.server.pki $XKS/tls --regions xks
if [ ! -f $XKS/access-key-id ]; then
    python3 -c 'import secrets; print("".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(24)))' > $XKS/access-key-id
    openssl rand 32 | base64 > "$XKS/secrets/$(cat $XKS/access-key-id)"
    echo "credential made: access key id $(cat $XKS/access-key-id) (secret not printed)"
else
    echo "credential exists: access key id $(cat $XKS/access-key-id)"
fi
AKID=$(cat $XKS/access-key-id)
if [ ! -f $XKS/xks.toml ]; then
    cat > $XKS/xks.toml <<TOML
[xks]
token = "xks"
host = "127.0.0.1"
port = 8600
certificate = "tls/xks-server.pem"
private_key = "tls/xks-server.key"
audit_dir = "audit"

[[xks.keystores]]
name = "demo"
path_prefix = "/demo"
region = "us-east-1"
keys = ["demo-key"]
requests_per_second = 100

[[xks.keystores.credentials]]
access_key_id = "$AKID"
secret_source = "file:secrets/$AKID"
TOML
    echo "configuration written: $XKS/xks.toml"
fi
hsm audit --token xks

step "start the XKS proxy (kms serve on a TOML with only [xks]) on 127.0.0.1"
pid=
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; }
trap cleanup EXIT
log=$XKS/serve.log
: > $log
kms --config $XKS/xks.toml serve --port 0 > $log 2>&1 &
pid=$!
for _ in $(seq 300); do grep -qs "serving" $log && break; sleep 0.1; done
grep -qs "serving" $log || { cat $log; exit 1; }
port=$(sed -n 's/^kms: listening on https:[^ ]*:\([0-9]*\).*/\1/p' $log)
BASE=https://localhost:$port/demo/kms/xks/v1
echo "XKS proxy: $BASE"

# The secret goes to curl on stdin (-K -), never on its command line (which /proc shows).
xks_curl() {  # path, body file
    { printf 'user = "%s:' "$AKID"; tr -d '\n' < "$XKS/secrets/$AKID"; printf '"\n'; } |
        curl -sS -K - --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --cacert $XKS/tls/ca.pem \
            -X POST -H "Content-Type: application/json" --data-binary @"$2" "$BASE$1"
}
meta() {
    printf '{"awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice", "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab", "kmsOperation": "%s", "kmsRequestId": "%s"}' "$1" "$(python3 -c 'import uuid; print(uuid.uuid4())')"
}
step "curl --aws-sigv4: Encrypt \"Hello World!\" with AAD and a CDIV"
printf '{"requestMetadata": %s, "plaintext": "SGVsbG8gV29ybGQh", "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}' \
    "$(meta GenerateDataKey)" > $XKS/encrypt.json
xks_curl /keys/demo-key/encrypt $XKS/encrypt.json > $XKS/encrypted.json
cat $XKS/encrypted.json; echo
step "curl --aws-sigv4: Decrypt it again"
python3 - "$XKS/encrypted.json" "$(meta Decrypt)" > $XKS/decrypt.json <<'PY'
import json, sys
enc = json.load(open(sys.argv[1]))
print(json.dumps({"requestMetadata": json.loads(sys.argv[2]), "encryptionAlgorithm": "AES_GCM",
                  "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n",
                  **{k: enc[k] for k in ("ciphertext", "initializationVector", "authenticationTag")}}))
PY
xks_curl /keys/demo-key/decrypt $XKS/decrypt.json | tee $XKS/decrypted.json; echo
python3 -c 'import base64, json, sys; print("plaintext:", base64.b64decode(json.load(open(sys.argv[1]))["plaintext"]).decode())' $XKS/decrypted.json

step "stop the proxy (SIGTERM: drain, flush the audit log)"
kill -TERM "$pid"; wait "$pid"; echo "proxy exited $?"; pid=
kms audit verify $XKS/audit/audit-w0.jsonl
echo "after the demo: kms --config $XKS/xks.toml serve   (port 8600); docs/xks.md says what AWS KMS needs"
