#!/usr/bin/env bash
# The KMS part of the demo: two regional KMS nodes import release 1, a tenant per org type,
# records encrypted, a rotation (old records still decrypt), a destroy (old records fail clearly).
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=var
set -a; . $VAR/demo-pins.env; set +a
step() { printf '\n== %s\n' "$*"; }
mkdir -p $VAR/kms
for region in eu us; do
    CFG=$VAR/kms/$region.toml
    # written whole or not at all: an interrupted run must not leave half a configuration
    [ -f $CFG ] || cat > $CFG.tmp <<TOML
region = "$region"
token = "regional-$region"
pin_source = "env:HSM_PIN_REGIONAL_${region^^}"
primary_certificate = "../pki/primary-signing.pem"
bundle_dir = "../ceremonies/release-1"
store = "kms-$region.db"
TOML
    # The officers this region pins (a node refuses to start without them), in the file before
    # it appears; a var/ of the previous version gets them appended to its configurations.
    [ -f $CFG ] || { cat $VAR/officers/pins.toml >> $CFG.tmp && mv $CFG.tmp $CFG; }
    grep -q '^\[\[officers\]\]' $CFG || cat $VAR/officers/pins.toml >> $CFG
    step "KMS $region: import release bundles"
    kms --config $CFG init
    kms --config $CFG import
done

EU=$VAR/kms/eu.toml
. scripts/demo-lib.sh
if complete acme-prod && complete acme-dev && complete acme-sbx; then
    step "tenants complete already (a second make demo): status only"
    kms --config $EU status
    exit 0
fi
step "KMS eu: a tenant per org type"
for org_type in acme-prod:production acme-dev:developer acme-sbx:sandbox; do
    org=${org_type%%:*}
    if ! has_org $org; then
        kms --config $EU tenant create --org $org --type ${org_type#*:}
    elif ! complete $org; then   # created, then interrupted before its first secret
        kms --config $EU tenant rotate --org $org
    fi
done

step "encrypt sample records for acme-prod"
OLD=$(kms --config $EU encrypt --org acme-prod "card 4111-1111-1111-1111")
echo "ciphertext: ${OLD:0:60}..."
kms --config $EU decrypt --org acme-prod "$OLD"

step "rotate right away: refused by the rate limit"
kms --config $EU tenant rotate --org acme-prod || true

# "A day later" runs on its own org, acme-later, so that acme-prod's key stays usable right now
# (a rotation made with a clock 25 h ahead is dated tomorrow). Not on a copy of the store: the
# copy's rotation would replace the org's key-encryption key in the HSM, and this store's state of
# the org would then be refused as rolled back (docs/store.md, "Sealed org state").
has_org acme-later || kms --config $EU tenant create --org acme-later --type production
OLD=$(kms --config $EU encrypt --org acme-later "card 4111-1111-1111-1111")
step "a day later (acme-later; the demo drives the library with a clock 25 h ahead): rotate"
# The kms command has no clock override, on purpose; only library callers can pass a clock.
NEW=$(py - "$EU" <<'PY'
import base64, sys, time
from kms import config
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms
with Kms(config.load(sys.argv[1]), clock=lambda: time.time() + 25 * 3600) as node:
    node.start()
    row = node.rotate("acme-later")
    print(f"acme-later: field secret v{row.version} ACTIVE, previous archived", file=sys.stderr)
    blob = FieldEncryptor(node).encrypt("acme-later", b"card 5500-0000-0000-0004")
    print(base64.b64encode(blob).decode())
PY
)
step "the old record still decrypts, and so does the new one"
kms --config $EU decrypt --org acme-later "$OLD"
kms --config $EU decrypt --org acme-later "$NEW"
kms --config $EU tenant list --org acme-later

step "destroy version 1: records under it fail clearly, newer ones still decrypt"
kms --config $EU tenant destroy --org acme-later --version 1
kms --config $EU decrypt --org acme-later "$OLD" || true
kms --config $EU decrypt --org acme-later "$NEW"

step "back to today's store: every tenant is usable now"
kms --config $EU status
