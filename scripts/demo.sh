#!/usr/bin/env bash
# The demo: three SoftHSM2 tokens under var/tokens, primary and regional keys, certificates in
# var/pki, every chain checked with openssl. Safe to run twice: existing tokens, keys and
# certificates are reported, never duplicated (`make clean` starts over).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-lib.sh
VAR=var
PKI=$VAR/pki
mkdir -p "$PKI"
umask 077
# Demo PINs: random, a different SO/user pair per token, made once, kept in a git-ignored 0600
# file and never printed or put on a command line. The CLIs look up HSM_PIN_<LABEL> and
# HSM_SO_PIN_<LABEL> (label upper-cased, '-' -> '_'), so `set -a; . var/demo-pins.env` is all a
# user needs to run the documented commands against the demo tokens.
if [ -f $VAR/demo-pins.env ] && ! grep -q '^HSM_PIN_PRIMARY=' $VAR/demo-pins.env; then
    echo "var/ was made by an older version of this demo (one PIN for every token, keys" >&2
    echo "without the key policy): run 'make clean' and then 'make demo' again." >&2
    exit 1
fi
if [ ! -f $VAR/demo-pins.env ]; then  # written whole, then renamed: never half a file
    py - > $VAR/demo-pins.env.tmp <<'PY'
import secrets
for label in ("PRIMARY", "REGIONAL_EU", "REGIONAL_US"):
    print(f"HSM_SO_PIN_{label}={secrets.token_hex(8)}")
    print(f"HSM_PIN_{label}={secrets.token_hex(6)}")
PY
    mv $VAR/demo-pins.env.tmp $VAR/demo-pins.env
fi
# ...and where the demo tokens are and this checkout's .venv commands,
# so sourcing the one file is all a shell needs.
grep -q '^SOFTHSM2_CONF=' $VAR/demo-pins.env ||
    echo "SOFTHSM2_CONF=$PWD/$VAR/softhsm2.conf" >> $VAR/demo-pins.env
grep -q '^PATH=' $VAR/demo-pins.env || echo "PATH=$PWD/.venv/bin:\$PATH" >> $VAR/demo-pins.env
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

step "hsm info: does the token enforce the key policy?"
hsm info --token primary | grep -E "^(Token|Trusted|Policy|  )"

bash scripts/demo-ceremony.sh

step "hsm audit (primary, after the ceremony): trusted recipients and the release record, no secret left"
hsm audit --token primary
bash scripts/demo-kms.sh
bash scripts/demo-kms-service.sh
bash scripts/demo-customer-keys.sh

step "hsm audit (regional-eu, after the KMS ran: no release secret was left on the token)"
hsm audit --token regional-eu

bash scripts/demo-cloud.sh

step "hsm audit (primary, after the cloud exports: the cloud key and the trusted import keys)"
hsm audit --token primary
bash scripts/demo-xks.sh

step "done: certificates in $PKI, ceremony outputs in $VAR/ceremonies, tokens in $VAR/tokens, officers in $VAR/officers (make clean removes them)"
cat <<'NEXT'

What to try next (in a shell at the repository root):
  set -a; . var/demo-pins.env; set +a                 # the demo's token PINs and SOFTHSM2_CONF
  hsm audit --token regional-eu                       # every object against its key policy
  kms --config var/kms/eu.toml encrypt --org acme-prod "card 4111"      # prints a base64 blob
  kms --config var/kms/eu.toml decrypt --org acme-prod BLOB
  ceremony verify var/ceremonies/release-1 --cert var/pki/primary-signing.pem \
      --officers var/officers/pins.toml                # offline: 2 of the pinned officers
  # Officers' keys and PINs are not in var/demo-pins.env: alice's token and PIN file are in
  # var/officers/alice/ (see docs/ceremony-quorum.md), bob's and carol's key files beside it.
NEXT
