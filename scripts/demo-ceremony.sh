#!/usr/bin/env bash
# The release-secrets ceremony part of the demo: three demo officers (2-of-3 quorum) with
# generated approval keys, a plan for regions eu and us, open -> approve -> run -> verify.
# A second `make demo` finds the closed ceremony and only re-verifies it.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
PKI=$VAR/pki
CER=$VAR/ceremonies
RELEASE=1
mkdir -p $VAR/officers $CER
set -a; . $VAR/demo-pins.env; set +a

step() { printf '\n== %s\n' "$*"; }

for officer in alice bob carol; do
    [ -f $VAR/officers/$officer.key ] || ceremony keygen --out $VAR/officers/$officer.key >/dev/null
done
pub() { python3 -c "
from cryptography.hazmat.primitives import serialization as s
k = s.load_pem_private_key(open('$VAR/officers/$1.key','rb').read(), None)
print(k.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode().strip())"; }

PLAN=$CER/release-$RELEASE.toml
if [ ! -f $PLAN ]; then
    cat > $PLAN <<TOML
# Demo plan: reviewed in advance, run unchanged. No PINs, modules or slots in here.
[ceremony]
id = "demo-release-$RELEASE"
type = "release-secrets"
release = "$RELEASE"
practice = false
output_dir = "release-$RELEASE"

[primary]
signing_certificate = "../pki/primary-signing.pem"
encryption_certificate = "../pki/primary-encryption.pem"

[quorum]
m = 2

[[officers]]
name = "alice"
role = "crypto-officer"
approval_key = """
$(pub alice)
"""

[[officers]]
name = "bob"
role = "crypto-officer"
approval_key = """
$(pub bob)
"""

[[officers]]
name = "carol"
role = "crypto-officer"
approval_key = """
$(pub carol)
"""

[[regions]]
name = "eu"
certificate = "../pki/regional-eu.pem"
fingerprint = "$(hsm fingerprint --token regional-eu --hex-only)"

[[regions]]
name = "us"
certificate = "../pki/regional-us.pem"
fingerprint = "$(hsm fingerprint --token regional-us --hex-only)"

[[secrets]]
name = "kdf-seed"
type = "hmac-sha256-seed"

[[secrets]]
name = "tenant-wrapping-key"
type = "aes-256"
TOML
fi
ENV=$VAR/ceremony-env.toml
[ -f $ENV ] || cat > $ENV <<TOML
primary_token = "primary"
user_pin_source = "env:HSM_PIN_PRIMARY"
so_pin_source = "env:HSM_SO_PIN_PRIMARY"
TOML

OUT=$CER/release-$RELEASE
spki_sha256() { openssl x509 -in "$1" -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1; }
if [ -f $OUT/transcript.sig.json ]; then
    step "ceremony demo-release-$RELEASE already closed; verifying it again"
    # A var/ made before trusted keys had a CKA_WRAP_TEMPLATE: the SO re-creates each one after
    # comparing its fingerprint with the certificate's (a key that has it: nothing changes).
    for name in eu us escrow; do
        cert=$PKI/regional-$name.pem; [ $name = escrow ] && cert=$PKI/primary-encryption.pem
        hsm retrust --token primary --label trusted-$name --fingerprint "$(spki_sha256 $cert)" |
            tail -n 1
    done
else
    step "ceremony plan"
    ceremony plan $PLAN
    step "ceremony open (fresh nonce), approvals by alice and bob (2 of 3)"
    ceremony open $PLAN --env $ENV
    for officer in alice bob; do
        [ -f $OUT/approvals/$officer.json ] || \
            ceremony approve --plan $PLAN --officer $officer --key $VAR/officers/$officer.key
    done
    step "ceremony run"
    ceremony run $PLAN --env $ENV
fi
step "ceremony verify (offline, no HSM)"
ceremony verify $OUT --cert $PKI/primary-signing.pem
step "openssl cms -verify of each bundle"
for b in $OUT/bundle-*.p7; do
    openssl cms -verify -binary -inform DER -in "$b" -CAfile $PKI/primary-signing.pem \
        -purpose any -out /dev/null 2>&1 | sed "s|^|$(basename "$b"): |"
done
