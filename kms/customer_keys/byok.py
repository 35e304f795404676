"""BYOK: customer-supplied tenant secrets (PBKDF2) and DEKs (NONE), wrapped to an org's
certificate whose private key lives in the regional HSM and may only unwrap.

KMS side: :func:`certificate` makes the org's key pair (``hsm.keys.byok``) and its certificate;
:func:`upload` unwraps a ``secret.b64`` inside the HSM, compares ``secret.sha256.b64`` there, and
stores the result wrapped like every tenant secret (rate limits, replay refusal and the database
rules in the same store transaction). Customer side, no HSM: :func:`wrap`.

Who signs the certificate: the regional node's own certificate-signing key ``byok-issuer-<region>``
(ECDSA P-384, sign-only, non-extractable, in the same HSM). Not the BYOK key itself: its policy
forbids signing, which is the point. Not a CSR for the customer's CA: a CSR is signed by the
subject key. Not the primary: it is offline in the ceremony room, and a per-org certificate
cannot wait for a ceremony. The customer checks the issuer's fingerprint (printed by ``kms byok
certificate``, and the issuer certificate follows the BYOK certificate in the PEM file) out of
band, once per region.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import pem as asn1_pem
from cryptography.hazmat.primitives import hashes

from hsm.keys import byok as hbyok
from hsm.keys import keygen, roles, x509
from hsm.core import ops
from suite.files import write_new
from hsm.core.token import KeyRef

from kms.customer_keys import byok_pins
from kms.errors import KmsError, PolicyViolation

KIND = "byok"
ISSUER_ROLE = roles.SIGNING_ROLES["ecdsa-p384"]
CERT_DAYS = 2 * 365
# Customer-side OAEP hashes (SHA-1/MGF1-SHA1 is the default the platform accepts everywhere).
# The customer's side (`kms byok wrap`): the RSA-OAEP hashes it may wrap with, MGF1 the same;
# the KMS side accepts the same names (hsm.keys.byok.OAEP_HASHES).
WRAP_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha512": hashes.SHA512}


# ----------------------------------------------------------------------------- KMS side
def _issuer(kms) -> tuple[KeyRef, x509.x509.Certificate]:
    label = f"byok-issuer-{kms.config.region}"
    info = keygen.existing_keypair(kms.token, ISSUER_ROLE, label) or keygen.generate_keypair(
        kms.token, ISSUER_ROLE, label)
    key = info.private
    spki = x509.public_key_info(kms.token, info.public)
    name = x509.names(role="BYOK certificate issuer", token_label=kms.token.label,
                      organization="hsm-suite", region=kms.config.region)
    cert = x509.issue(kms.token, issuer_key=key, signature=ISSUER_ROLE.signature, subject=name,
                      subject_spki=spki, issuer_name=None, issuer_spki=spki, ca=True,
                      key_usage={"key_cert_sign"}, days=10 * 365)
    return key, cert


def certificate(kms, org_id: str, out: Path, *, purpose: str = "seed") -> dict:
    """Make (or re-certify) the org's BYOK key pair for ``purpose`` and write its certificate
    followed by the issuer's to ``out`` (never overwritten). Returns what was registered."""
    if purpose not in hbyok.PURPOSES:
        raise KmsError(f"purpose must be one of {', '.join(hbyok.PURPOSES)}")
    kms.store.org_type(org_id)       # UnknownTenant before any key is made
    if Path(out).exists():
        raise KmsError(f"{out} already exists; outputs are never overwritten")
    spec = kms.customer_key(org_id, KIND) or {}
    label = hbyok.label_for(org_id, purpose)
    if purpose not in spec or not keygen.label_in_use(kms.token, label):
        hbyok.generate(kms.token, org_id, purpose)
    hbyok.require(kms.token, org_id, purpose)
    issuer_key, issuer_cert = _issuer(kms)
    spki = x509.public_key_info(kms.token, ops.public(label))
    cert = x509.issue(
        kms.token, issuer_key=issuer_key, signature=ISSUER_ROLE.signature,
        subject=x509.names(role=f"BYOK {purpose} key of org {org_id}",
                           token_label=kms.token.label, organization="hsm-suite",
                           region=kms.config.region),
        subject_spki=spki, issuer_name=issuer_cert.subject,
        issuer_spki=issuer_cert.public_key, ca=False, key_usage={"key_encipherment"},
        days=CERT_DAYS)
    write_new(Path(out), x509.to_pem(cert) + x509.to_pem(issuer_cert))
    spec[purpose] = {"label": label, "spki_sha256": x509.fingerprint(spki).hex()}
    kms.put_customer_key(org_id, KIND, spec)
    return {"label": label, "spki_sha256": spec[purpose]["spki_sha256"],
            "issuer_sha256": x509.fingerprint(issuer_cert.public_key).hex()}


def _read_b64(path: Path, what: str) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise KmsError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KmsError(f"{what} {path} is not base64 text") from None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KmsError(f"{what} {path} is not valid base64 (truncated or altered?)") from None
    if not data:
        raise KmsError(f"{what} {path} is empty")
    return data


def upload(kms, org_id: str, key_type: str, secret_file: Path, hash_file: Path, *,
           derivation: str = "PBKDF2", oaep: str = "sha1"):
    """The customer's wrapped secret, unwrapped and checked inside the HSM, stored wrapped."""
    ciphertext = _read_b64(secret_file, "encrypted secret")
    digest = _read_b64(hash_file, "hash file")
    if len(digest) != 32:
        raise KmsError(f"hash file {hash_file} holds {len(digest)} bytes, not a SHA-256 (32)")
    return upload_wrapped(kms, org_id, key_type, ciphertext, digest, derivation=derivation,
                          oaep=oaep)


def upload_wrapped(kms, org_id: str, key_type: str, ciphertext: bytes, digest: bytes, *,
                   derivation: str = "PBKDF2", oaep: str = "sha1"):
    """The same from bytes (the service's upload route): RSA-OAEP ``ciphertext`` to the org's
    BYOK certificate, ``digest`` the SHA-256 of the plaintext secret."""
    if derivation not in ("PBKDF2", "NONE"):
        raise KmsError("derivation must be PBKDF2 or NONE")
    if key_type == "database" and derivation != "PBKDF2":
        raise PolicyViolation("database-encryption uploads are seeds only: derivation NONE is "
                              "refused", hint="upload with --derivation PBKDF2")
    if len(digest) != 32:
        raise KmsError(f"the hash holds {len(digest)} bytes, not a SHA-256 (32)")
    purpose = "seed" if derivation == "PBKDF2" else "dek"
    spec = kms.customer_key(org_id, KIND) or {}
    if purpose not in spec:
        raise KmsError(f"org {org_id} has no BYOK {purpose} certificate (derivation "
                       f"{derivation})", hint=f"`kms byok certificate --org {org_id} "
                       f"--purpose {purpose}`, then wrap to it")
    material = hbyok.unwrap_upload(kms.token, org_id, purpose, ciphertext, digest, oaep=oaep)
    return kms.upload_secret(org_id, key_type, material, derivation=derivation,
                             upload_sha256=hashlib.sha256(ciphertext).hexdigest())


# ----------------------------------------------------------------------------- customer side
def _load_rsa_cert(path: Path):
    from cryptography.hazmat.primitives.asymmetric import rsa
    cert = _load_cert(path)
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 3072:
        raise KmsError(f"{path}: a BYOK certificate carries an RSA key of at least 3072 bits")
    return cert, key


def _load_cert(path: Path):
    from cryptography import x509 as cx509
    try:
        data = Path(path).read_bytes()
        if asn1_pem.detect(data):
            cert = cx509.load_pem_x509_certificate(data)   # the first one: the BYOK cert
        else:
            cert = cx509.load_der_x509_certificate(data)
    except OSError as exc:
        raise KmsError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise KmsError(f"{path} is not an X.509 certificate") from None
    return cert


@dataclass(frozen=True)
class Pinning:
    """``kms byok wrap``'s key pin (:mod:`kms.customer_keys.byok_pins`): the pin file, the org the
    customer
    expects (None: the one the certificate names) and a new key they accept by fingerprint."""
    path: Path
    org: str | None = None
    accept: str | None = None


def spki_sha256(cert) -> str:
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo: what `kms byok certificate`
    prints, read from the token."""
    from cryptography.hazmat.primitives import serialization
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _pin_target(cert, path: Path, expected_org: str | None) -> tuple[str, str]:
    """(org, purpose) of a BYOK certificate; the org the customer expects must be the one it
    names."""
    from cryptography.x509.oid import NameOID
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    found = byok_pins.subject_org(str(names[0].value)) if names else None
    if found is None:
        raise KmsError(f"{path} is not a BYOK certificate of this suite (its subject names no "
                       "org and purpose)", hint="use the PEM file `kms byok certificate` wrote")
    purpose, org = found
    if expected_org is not None and org != expected_org:
        raise byok_pins.PinMismatch(f"{path} is a BYOK certificate for org {org}, not "
                                    f"{expected_org}; nothing was written")
    return org, purpose


def wrap(cert: Path, out_dir: Path, *, secret: bytes | None = None, hash_name: str = "sha1",
         pinning: Pinning | None = None) -> tuple[Path, Path]:
    """Encrypt a 32-byte secret to the certificate (RSA-OAEP, MGF1 with the same hash, no
    label) and write ``secret.b64`` and ``secret.sha256.b64``. ``secret`` None: a fresh one from
    the OS CSPRNG, which is never written anywhere. With ``pinning`` (the CLI always), the
    certificate's key must be the one pinned for its org, or is pinned on first use."""
    with _pinned(cert, pinning):
        return _wrap(cert, out_dir, secret=secret, hash_name=hash_name)


@contextlib.contextmanager
def _pinned(cert: Path, pinning: Pinning | None):
    if pinning is None:
        yield None
        return
    loaded = _load_rsa_cert(cert)[0]
    org, purpose = _pin_target(loaded, cert, pinning.org)
    with byok_pins.checked(pinning.path, org, purpose, spki_sha256(loaded),
                           accept=pinning.accept) as result:
        yield result
    _report_pin(result)


def _report_pin(result: byok_pins.PinResult) -> None:
    import sys
    what = {"pinned": "pinned on first use: compare it with the fingerprint the KMS operator "
                      "read from the token",
            "matched": "the key pinned for this org",
            "replaced": f"accepted, replacing {result.previous}"}[result.status]
    print(f"org {result.org} BYOK {result.purpose} key SPKI SHA-256 {result.fingerprint} "
          f"({what}; pins in {result.path})", file=sys.stderr)


def _wrap(cert: Path, out_dir: Path, *, secret: bytes | None, hash_name: str
          ) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives.asymmetric import padding
    if hash_name not in WRAP_HASHES:
        raise KmsError(f"OAEP hash must be one of {', '.join(WRAP_HASHES)}")
    key = _load_rsa_cert(cert)[1]
    if secret is None:
        secret = os.urandom(32)       # getrandom(2): the OS CSPRNG, every byte value possible
    if len(secret) != 32:
        raise KmsError(f"the secret is {len(secret)} bytes; BYOK secrets are 32 bytes")
    h = WRAP_HASHES[hash_name]()
    ciphertext = key.encrypt(secret, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    out_dir = Path(out_dir)
    for name in ("secret.b64", "secret.sha256.b64"):   # both or neither
        if (out_dir / name).exists():
            raise KmsError(f"{out_dir / name} already exists; outputs are never overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    a = write_new(out_dir / "secret.b64", base64.b64encode(ciphertext) + b"\n")
    b = write_new(out_dir / "secret.sha256.b64",
                  base64.b64encode(hashlib.sha256(secret).digest()) + b"\n")
    return a, b


def read_secret_file(path: Path) -> bytes:
    """``--in``: 32 raw bytes, or their base64 or hex on one line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KmsError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) == 32:
        return data
    text = data.strip()
    for decode in (lambda t: bytes.fromhex(t.decode()),
                   lambda t: base64.b64decode(t, validate=True)):
        try:
            value = decode(text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(value) == 32:
            return value
    raise KmsError(f"{path} does not hold a 32-byte secret (raw, hex or base64)")
