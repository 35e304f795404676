"""Offline checks of the certificates a ceremony relies on, before any key is touched."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from suite import fingerprint as fp

from release.errors import CertificateError


def load(path: Path, what: str) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {what} certificate {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data \
            else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path} is not a certificate ({exc})") from None


def as_asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))


def spki_fingerprint(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def _in_validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                               hint="re-certify the key (hsm certify-regional) and update the "
                                    "plan's pinned fingerprint only if the key changed")


def check_primary(path: Path, now: dt.datetime | None = None) -> x509.Certificate:
    """The primary signing certificate: self-issued CA, valid now, signature verifies."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cert = load(path, "primary signing")
    _in_validity(cert, path, now)
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise CertificateError(f"{path} is not a self-signed primary certificate "
                               f"({type(exc).__name__})") from None
    return cert


def check_recipient(path: Path, primary: x509.Certificate, pinned: bytes | None, name: str,
                    now: dt.datetime | None = None) -> x509.Certificate:
    """A regional (or escrow) encryption certificate: issued by the primary signing key, valid
    now, keyEncipherment, RSA >= 3072, and its key is the one the plan pinned."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cert = load(path, f"{name} encryption")
    if cert.issuer != primary.subject:
        raise CertificateError(f"{path} ({name}) was not issued by the primary signing "
                               f"certificate (issuer {cert.issuer.rfc4514_string()})",
                               hint="only regional keys certified by the primary can receive "
                                    "release secrets")
    try:
        cert.verify_directly_issued_by(primary)
    except Exception:
        raise CertificateError(f"{path} ({name}): the primary's signature on it does not "
                               "verify") from None
    _in_validity(cert, path, now)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError(f"{path} ({name}) has no key usage extension") from None
    if not usage.key_encipherment:
        raise CertificateError(f"{path} ({name}) is not certified for keyEncipherment")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 3072:
        raise CertificateError(f"{path} ({name}) must hold an RSA key of at least 3072 bits")
    actual = spki_fingerprint(cert)
    if pinned is not None and actual != pinned:
        raise CertificateError(
            f"{path} ({name}): key fingerprint mismatch: the plan pins "
            f"{fp.to_hex(pinned)}, the certificate holds {fp.to_hex(actual)}",
            hint="stop: the certificate is not the one reviewed; compare the words read on the "
                 "regional console")
    return cert


def pem_of(cert: x509.Certificate) -> bytes:
    return pem.armor("CERTIFICATE", cert.public_bytes(Encoding.DER))
