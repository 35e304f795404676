#!/usr/bin/env bash
# The release-secrets ceremony part of the demo: three demo officers (2-of-3 quorum), a plan
# for regions eu and us, open -> approve -> run -> countersign -> verify. alice keeps her key on
# a SoftHSM2 token of her own (her own token directory and PIN file under var/officers/alice,
# nothing of hers in var/demo-pins.env); bob and carol use key files, as rehearsals do. The
# regions pin the three officers' keys (var/officers/pins.toml, appended to each node's
# configuration by demo-kms.sh). A second `make demo` finds everything made and only
# re-verifies; on a var/ of the previous version it migrates release 1 by countersigning it.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
PKI=$VAR/pki
CER=$VAR/ceremonies
RELEASE=1
OFF=$VAR/officers
mkdir -p $OFF $CER
set -a; . $VAR/demo-pins.env; set +a

step() { printf '\n== %s\n' "$*"; }

# --- alice: an officer token of her own. What an insider needs to sign as alice is her token
# directory *and* her PIN file: neither is in var/demo-pins.env (the primary's and nodes' PINs).
ALICE=$OFF/alice
mkdir -p $ALICE/tokens && chmod 700 $ALICE
[ -f $ALICE/softhsm2.conf ] || printf '%s\n' "directories.tokendir = $PWD/$ALICE/tokens" \
    "objectstore.backend = file" "log.level = ERROR" "slots.removable = false" > $ALICE/softhsm2.conf
for f in pin so-pin; do
    [ -f $ALICE/$f ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(6))' > $ALICE/$f)
done
as_alice() { SOFTHSM2_CONF=$PWD/$ALICE/softhsm2.conf "$@"; }
ALICE_URI="pkcs11:token=officer-alice?pin-source=file:$PWD/$ALICE/pin"
as_alice hsm init-token --label officer-alice --so-pin-source file:$ALICE/so-pin \
    --pin-source file:$ALICE/pin
if [ ! -f $ALICE/public.txt ]; then
    step "alice: her officer key, generated inside her token (ECDSA P-256, SIGN only)"
    as_alice ceremony keygen --token "$ALICE_URI" > $ALICE/public.txt
fi
# --- bob and carol: key files (what a rehearsal uses; a production officer uses a token).
for officer in bob carol; do
    mkdir -p $OFF/$officer
    [ -f $OFF/$officer/public.txt ] || \
        ceremony keygen --out $OFF/$officer/key.pem > $OFF/$officer/public.txt
done
pub() { sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p' $OFF/$1/public.txt; }
fpr() { sed -n 's/^# SHA-256(SPKI) *//p' $OFF/$1/public.txt | tr -d ' '; }
# What every region pins: the three officers, any 2 of them, from release 1 on.
PINS=$OFF/pins.toml
[ -f $PINS ] || cat > $PINS <<TOML

[[officers]]
from_release = "1"
m = 2
keys = { alice = "$(fpr alice)", bob = "$(fpr bob)", carol = "$(fpr carol)" }
TOML
step "officers pinned by the regions ($PINS)"
cat $PINS

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
    step "ceremony demo-release-$RELEASE already closed"
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
    step "ceremony open (fresh nonce), approvals by alice (on her token) and bob (2 of 3)"
    ceremony open $PLAN --env $ENV
    [ -f $OUT/approvals/alice.json ] || \
        as_alice ceremony approve --plan $PLAN --officer alice --token "$ALICE_URI"
    [ -f $OUT/approvals/bob.json ] || \
        ceremony approve --plan $PLAN --officer bob --key $OFF/bob/key.pem
    step "ceremony run"
    ceremony run $PLAN --env $ENV
fi
# The release digest the ceremony showed at its close (one SHA-256 over every manifest); each
# officer compares it with what they wrote down, then countersigns every bundle. No primary
# HSM is involved. Signing again changes nothing ("already signed").
DIGEST=$(python3 -c "import sys; from ceremony.countersign import release_digest_of as r
print(r(sys.argv[1], sys.argv[2])[0].hex())" $OUT $PKI/primary-signing.pem)
step "officers countersign release $RELEASE: alice on her token, bob with his key file"
as_alice ceremony countersign $OUT --cert $PKI/primary-signing.pem --officer alice \
    --token "$ALICE_URI" --digest $DIGEST
ceremony countersign $OUT --cert $PKI/primary-signing.pem --officer bob \
    --key $OFF/bob/key.pem --digest $DIGEST
step "ceremony verify (offline, no HSM; 2 of the officers in $PINS)"
ceremony verify $OUT --cert $PKI/primary-signing.pem --officers $PINS
step "openssl cms -verify of each bundle (every signature: the primary's and the officers')"
for b in $OUT/bundle-*.p7; do
    # The officers' self-signed certificates ride in the bundle; openssl needs them as trust
    # anchors to check their signatures. (Which officers count is the pins above, not openssl.)
    anchors=$(mktemp)
    cat $PKI/primary-signing.pem > $anchors
    openssl pkcs7 -inform DER -in "$b" -print_certs 2>/dev/null | \
        sed -n '/BEGIN CERT/,/END CERT/p' >> $anchors
    openssl cms -verify -binary -inform DER -in "$b" -CAfile $anchors \
        -purpose any -out /dev/null 2>&1 | sed "s|^|$(basename "$b"): |"
    rm -f $anchors
done
