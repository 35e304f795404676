"""An officer's key where the ceremony meets it: in a PKCS#11 token of their own
(``--token URI``, :mod:`hsm.keys.officer`) or, for rehearsals and tests, in a PEM file (``--key``).

Either way the key is ECDSA P-256 (or P-384) and signs two things: the approval of a run (plan
digest || nonce) before any key is touched, and each bundle's manifest afterwards
(:func:`release.bundle.countersign`). Approval keys of plans made before (Ed25519 files) still
sign approvals, but cannot countersign: OpenSSL 3.0 cannot verify an Ed25519 CMS signer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from asn1crypto import keys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hsm.core.errors import UsageError
from release import signers
from suite import fingerprint as fp
from suite.files import write_new

from .errors import ApprovalError

_CURVES = {"p256": ec.SECP256R1, "p384": ec.SECP384R1}


class FileSigner:
    """An officer key in a PEM file: for rehearsals and tests, never for a production release
    (a file can be copied; a token key cannot)."""

    def __init__(self, path: Path, password: bytes | None = None):
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password)
        except (OSError, ValueError, TypeError) as exc:
            raise ApprovalError(f"cannot load officer key {path}: {exc}") from None
        self.path = Path(path)
        self.legacy = isinstance(key, Ed25519PrivateKey)
        if not self.legacy and not (isinstance(key, ec.EllipticCurvePrivateKey)
                                    and key.curve.name in signers.CURVES):
            raise ApprovalError(f"{path} is not an ECDSA P-256/P-384 (or, for approvals only, "
                                "Ed25519) private key")
        self._key = key
        self.spki = keys.PublicKeyInfo.load(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(data)
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        algorithm = hashes.SHA256() if signers.digest_name(self.spki) == "sha256" \
            else hashes.SHA384()
        return self._key.sign(data, ec.ECDSA(algorithm))


def new_key_file(path: Path, curve: str = "p256") -> keys.PublicKeyInfo:
    """An officer's ECDSA key in a new 0600 PEM file (rehearsals); its SPKI."""
    key = ec.generate_private_key(_CURVES[curve]())
    write_new(path, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), mode=0o600)
    return keys.PublicKeyInfo.load(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def public_pem(spki: keys.PublicKeyInfo) -> str:
    return serialization.load_der_public_key(spki.dump()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def describe(spki: keys.PublicKeyInfo) -> str:
    """What `ceremony keygen` prints: the public key for the plan, the fingerprint for the
    regions' pins."""
    return public_pem(spki) + "\n".join(fp.display(signers.fingerprint(spki), indent="# ")) + "\n"


@contextlib.contextmanager
def signer_of(args) -> Iterator:
    """The signer ``--key FILE`` or ``--token URI`` names (exactly one); a token is logged in
    with the officer's PIN and closed afterwards."""
    if bool(getattr(args, "key", None)) == bool(getattr(args, "token", None)):
        raise UsageError("give exactly one of --key FILE (rehearsals) or --token URI (the "
                         "officer's own token)")
    if args.key:
        yield FileSigner(Path(args.key))
        return
    from hsm.commands import options
    from hsm.keys import officer as token_officer
    token = options.open_token(args, pin_prompt="Officer token PIN: ")
    try:
        parsed = options.token_target(args)[3]
        label = parsed.object if parsed is not None and parsed.object else \
            token_officer.DEFAULT_LABEL
        yield token_officer.TokenSigner(token, label)
    finally:
        token.close()
