#!/usr/bin/env bash
# The KMS as a network service: TLS material under var/kms/tls, a [service] section in each node
# config, then a two-node eu region on 127.0.0.1 (both nodes on the eu SQLite store), an
# encryption service fetching a DEK over mTLS, an unauthorised client refused, and both nodes
# stopped with SIGTERM (they drain and exit 0). Nothing started here outlives the script.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
set -a; . $VAR/demo-pins.env; set +a
step() { printf '\n== %s\n' "$*"; }
. scripts/demo-lib.sh
TLS=$VAR/kms/tls

step "TLS material in $TLS (demo CA, a server certificate per region, three clients; keys 0600)"
python3 -m kms.server.pki $TLS --regions eu us

service_section() {  # region, port, audit dir
    cat <<TOML

[service]
host = "127.0.0.1"
port = $2
workers = 2
certificate = "tls/$1-server.pem"
private_key = "tls/$1-server.key"
client_ca = "tls/ca.pem"
audit_dir = "$3"

[[service.clients]]
identity = "spiffe://hsm-suite/encryption-service"
roles = ["data"]
orgs = ["*"]

[[service.clients]]
identity = "spiffe://hsm-suite/admin"
roles = ["admin"]
orgs = ["*"]
TOML
}
port=8443
for region in eu us; do
    CFG=$VAR/kms/$region.toml
    if ! grep -q '^\[service\]' $CFG; then
        service_section $region $port "audit-$region" >> $CFG
        echo "service section added to $CFG (port $port)"
    fi
    port=$((port + 100))
done
# The second eu node: the same region, token and store; its own audit directory.
EUB=$VAR/kms/eu-b.toml
if [ ! -f $EUB ]; then
    sed '/^\[service\]/,$d' $VAR/kms/eu.toml > $EUB
    service_section eu 8444 "audit-eu-b" >> $EUB
fi
grep -q '^\[\[officers\]\]' $EUB || cat $VAR/officers/pins.toml >> $EUB

step "start the eu region: two nodes (each 1 worker here), one SQLite store, on 127.0.0.1"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
urls=()
for cfg in $VAR/kms/eu.toml $EUB; do
    log=$VAR/kms/$(basename $cfg .toml)-serve.log
    : > $log   # emptied here, before the background start, so no old "serving" is read
    kms --config $cfg serve --port 0 --workers 1 > $log 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do grep -qs "serving" $log && break; sleep 0.1; done
    grep -qs "serving" $log || { cat $log; exit 1; }
    url=$(sed -n 's/^kms: listening on \(https:[^ ]*\).*/\1/p' $log)
    urls+=("$url")
    echo "node $(basename $cfg .toml): $url"
done

step "an encryption service fetches acme-dev's DEK over mTLS (node list with failover)"
py - "$TLS" "${urls[@]}" <<'PY'
import sys
from kms.caller.client import Forbidden, KmsClient, RemoteKeyProvider
from kms.caller.sdk import FieldEncryptor
tls, urls = sys.argv[1], sys.argv[2:]
svc = KmsClient(urls, cert=f"{tls}/encryption-service.pem", key=f"{tls}/encryption-service.key",
                ca=f"{tls}/ca.pem")
version, derivation, dek = svc.dek_for_encrypt("acme-dev")
print(f"encryption-service: acme-dev field key v{version} ({derivation}), a {len(dek)}-byte DEK "
      "(not printed)")
sdk = FieldEncryptor(RemoteKeyProvider(svc))
blob = sdk.encrypt("acme-dev", b"card 4111-1111-1111-1111")
print(f"encrypted through the service, decrypted again: {sdk.decrypt('acme-dev', blob).decode()}")
bad = KmsClient(urls, cert=f"{tls}/unauthorised.pem", key=f"{tls}/unauthorised.key",
                ca=f"{tls}/ca.pem")
try:
    bad.dek_for_encrypt("acme-dev")
    sys.exit("the unauthorised client was served: the demo policy is wrong")
except Forbidden as exc:
    print(f"unauthorised (CA-signed, named by no policy): refused, 403: {exc}")
PY

step "stop both nodes (SIGTERM: drain, destroy session objects, flush cache and audit log)"
for p in "${pids[@]}"; do kill -TERM "$p"; done
for p in "${pids[@]}"; do wait "$p"; echo "node pid $p exited $?"; done
pids=()
# Offline, no token: every checkpoint's signature against the audit key's fingerprint, read
# from the token once (in production: at the regional console, kept with the region's records).
audit_key=$(hsm fingerprint --token regional-eu --key regional-eu-audit --hex-only)
kms audit verify $VAR/kms/audit-eu $VAR/kms/audit-eu-b --key "$audit_key"
echo "after the demo: kms --config $VAR/kms/eu.toml serve   (port 8443, 2 workers)"
