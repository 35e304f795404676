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
    [ -f $CFG ] || cat > $CFG <<TOML
region = "$region"
token = "regional-$region"
pin_source = "env:HSM_PIN"
primary_certificate = "../pki/primary-signing.pem"
bundle_dir = "../ceremonies/release-1"
store = "kms-$region.db"
TOML
    step "KMS $region: import release bundles"
    kms --config $CFG init
    kms --config $CFG import
done

EU=$VAR/kms/eu.toml
if kms --config $EU status --json | grep -q '"org": "acme-prod"'; then
    step "tenants exist already (a second make demo): status only"
    kms --config $EU status
    exit 0
fi
step "KMS eu: a tenant per org type"
kms --config $EU tenant create --org acme-prod --type production
kms --config $EU tenant create --org acme-dev --type developer
kms --config $EU tenant create --org acme-sbx --type sandbox

step "encrypt sample records for acme-prod"
OLD=$(kms --config $EU encrypt --org acme-prod "card 4111-1111-1111-1111")
echo "ciphertext: ${OLD:0:60}..."
kms --config $EU decrypt --org acme-prod "$OLD"

step "rotate right away: refused by the rate limit"
kms --config $EU tenant rotate --org acme-prod || true

step "rotate a day later (demo clock), then the old record still decrypts"
KMS_DEMO_CLOCK_OFFSET_HOURS=25 kms --config $EU tenant rotate --org acme-prod
NEW=$(KMS_DEMO_CLOCK_OFFSET_HOURS=25 kms --config $EU encrypt --org acme-prod "card 5500-0000-0000-0004")
kms --config $EU decrypt --org acme-prod "$OLD"
kms --config $EU decrypt --org acme-prod "$NEW"
kms --config $EU tenant list --org acme-prod

step "destroy version 1: records under it fail clearly, newer ones still decrypt"
kms --config $EU tenant destroy --org acme-prod --version 1
kms --config $EU decrypt --org acme-prod "$OLD" || true
kms --config $EU decrypt --org acme-prod "$NEW"
kms --config $EU status
