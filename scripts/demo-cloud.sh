#!/usr/bin/env bash
# Cloud BYOK export on the demo's primary: a cloud key made in the token, exported to one
# provider of each kind, each wrap done inside the token to an import key the SO trusted. The
# providers are stood in for by RSA key pairs this script makes with `cryptography` (var/cloud/
# providers, private halves 0600); each export is then unwrapped as that provider documents it
# and checked against the printed check value. Idempotent: a second run adopts the key, the
# trusted import keys and the exports it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; . var/demo-pins.env; set +a
CLOUD=var/cloud
KEY=demo-cloud-key
KID="https://demo.managedhsm.azure.net/keys/KEKforBYOK/0000000000000000"
mkdir -p "$CLOUD/providers" "$CLOUD/exports"
step() { printf '\n== %s\n' "$*"; }
. scripts/demo-lib.sh

step "cloud providers' import keys (stand-ins made here; a real one comes from the provider)"
py - "$CLOUD/providers" <<'PY'
import datetime, os, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
out = Path(sys.argv[1])
for name, bits in (("aws", 4096), ("gcp-csek", 2048), ("gcp-kms", 3072), ("azure", 4096),
                   ("alibaba", 2048)):
    private = out / f"{name}.private.pem"
    if private.exists():
        print(f"{name}: exists")
        continue
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    public = key.public_key()
    if name == "gcp-csek":  # Google publishes its CSEK ingress key as a certificate
        cn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo csek ingress")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(cn).issuer_name(cn).public_key(public)
                .serial_number(1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        (out / f"{name}.pem").write_bytes(public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if name in ("aws", "alibaba"):  # GetParametersForImport returns an opaque import token
        (out / f"{name}.import-token").write_bytes(os.urandom(32).hex().encode())
    print(f"{name}: RSA-{bits} made")
PY

step "cloud key on the primary (AES-256, extractable only to SO-trusted keys)"
hsm cloud-key create --token primary --label "$KEY"   # a second run: "exists"

fpr() {  # what the provider's console shows: SHA-256 of the SubjectPublicKeyInfo
    python3 -c "
import hashlib, sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization as s
data = open(sys.argv[1], 'rb').read()
key = x509.load_pem_x509_certificate(data).public_key() if b'CERTIFICATE' in data else s.load_pem_public_key(data)
print(hashlib.sha256(key.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)).hexdigest())" "$1"
}

for spec in "aws RSA_AES_KEY_WRAP_SHA_1" "gcp-csek RSA_OAEP_SHA1" \
            "gcp-kms RSA_OAEP_3072_SHA1_AES_256" "azure CKM_RSA_AES_KEY_WRAP" \
            "alibaba RSAES_OAEP_SHA_1"; do
    set -- $spec
    provider=$1 algorithm=$2
    pub="$CLOUD/providers/$provider.pem"
    step "$provider: the SO trusts the import key after confirming its fingerprint"
    hsm cloud-key trust --token primary --provider "$provider" --wrapping-key "$pub" \
        --fingerprint "$(fpr "$pub")"
    out="$CLOUD/exports/$provider"
    step "$provider: export with $algorithm (wrapped inside the token)"
    if [ -f "$out/export.json" ]; then
        echo "export exists: $out/export.json"
    else
        extra=()
        [ -f "$CLOUD/providers/$provider.import-token" ] && \
            extra+=(--import-token "$CLOUD/providers/$provider.import-token")
        [ "$provider" = azure ] && extra+=(--kid "$KID")
        hsm cloud-key export --token primary --key "$KEY" --provider "$provider" \
            --wrapping-key "$pub" --algorithm "$algorithm" --out "$out" "${extra[@]}"
    fi
done

step "each provider (stand-in) unwraps its file as it documents, and checks the check value"
py - "$CLOUD" <<'PY'
import base64, json, sys
from pathlib import Path
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
cloud = Path(sys.argv[1])
for out in sorted((cloud / "exports").iterdir()):
    m = json.loads((out / "export.json").read_text())
    data = (out / m["wrapped_file"]).read_bytes()
    if m["provider"] == "azure":
        text = json.loads(data)["ciphertext"]
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    elif m["provider"] in ("gcp-csek", "alibaba"):
        data = base64.b64decode(data)
    priv = serialization.load_pem_private_key(
        (cloud / "providers" / f"{m['provider']}.private.pem").read_bytes(), None)
    sha = hashes.SHA256 if "SHA256" in m["algorithm"] or "SHA_256" in m["algorithm"] else hashes.SHA1
    oaep = padding.OAEP(mgf=padding.MGF1(sha()), algorithm=sha(), label=None)
    k = priv.key_size // 8
    if len(data) > k:  # RSA-AES: OAEP(ephemeral AES-256) || RFC 5649 wrap
        key = aes_key_unwrap_with_padding(priv.decrypt(data[:k], oaep), data[k:])
    else:
        key = priv.decrypt(data, oaep)
    mac = CMAC(algorithms.AES(key)); mac.update(bytes(16))
    ok = mac.finalize()[:5].hex() == m["check_value"]
    print(f"{m['provider']:<9} {m['algorithm']:<28} {m['wrapped_file']:<26} check value "
          f"{m['check_value']} {'matches' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(1)
PY
