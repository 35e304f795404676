#!/usr/bin/env bash
# The demo: three SoftHSM2 tokens under var/tokens, primary and regional keys, certificates in
# var/pki, every chain checked with openssl. Safe to run twice: existing tokens, keys and
# certificates are reported, never duplicated (`make clean` starts over).
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
PKI=$VAR/pki
mkdir -p "$PKI"
umask 077
# Demo PINs: random, made once, kept in a git-ignored 0600 file; never printed.
if [ ! -f $VAR/demo-pins.env ]; then
    python3 -c "import secrets; print(f'HSM_SO_PIN={secrets.token_hex(8)}'); print(f'HSM_PIN={secrets.token_hex(6)}')" > $VAR/demo-pins.env
fi
set -a; . $VAR/demo-pins.env; set +a
umask 022

step() { printf '\n== %s\n' "$*"; }

step "tokens (SoftHSM2, SOFTHSM2_CONF=$SOFTHSM2_CONF)"
for label in primary regional-eu regional-us; do
    hsm init-token --label "$label"
done

step "primary HSM: signing (ECDSA P-384) and encryption (RSA-4096) key pairs"
hsm init-primary --token primary --out "$PKI"

for region in eu us; do
    step "regional HSM $region: encryption key pair (RSA-4096) and certification request"
    hsm init-regional --token "regional-$region" --region "$region" --out "$PKI"
    # The officer at the regional console reads the fingerprint from the token itself...
    fpr=$(hsm fingerprint --token "regional-$region" --hex-only)
    step "primary HSM certifies regional-$region after the fingerprint comparison"
    # ...and the primary officer types what they heard.
    hsm certify-regional --token primary --request "$PKI/regional-$region.request.json" \
        --out "$PKI" --fingerprint "$fpr"
done

step "openssl verify"
openssl verify -CAfile "$PKI/primary-signing.pem" "$PKI/primary-encryption.pem" \
    "$PKI/regional-eu.pem" "$PKI/regional-us.pem"

# Demo PINs only: pkcs11-tool takes the PIN on its command line (it has no other route).
step "pkcs11-tool --list-objects (primary)"
pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label primary --list-objects \
    --pin "$HSM_PIN" 2>/dev/null | grep -E "Object|label|ID|Usage|Access" || true

bash scripts/demo-ceremony.sh
bash scripts/demo-kms.sh
bash scripts/demo-kms-service.sh

step "done: certificates in $PKI, ceremony outputs in $VAR/ceremonies, tokens in $VAR/tokens (make clean removes them)"
