"""Officers' signing keys as the bundle format sees them: ECDSA P-256 or P-384, wherever the key
lives (a PEM file for rehearsals, a PKCS#11 token in production: ``hsm.keys.officer``).

ECDSA because OpenSSL 3.0 cannot verify an Ed25519 signer in CMS (measured), and the bundles must
stay verifiable by ``openssl cms -verify``. The curve fixes the hash (P-256 with SHA-256, P-384
with SHA-384, RFC 5480): a token with only raw CKM_ECDSA gets the digest, hashed on the host.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Protocol

from asn1crypto import keys, x509

# curve -> (digest algorithm, CMS/X.509 signature algorithm)
CURVES = {"secp256r1": ("sha256", "sha256_ecdsa"), "secp384r1": ("sha384", "sha384_ecdsa")}
# The officer certificate only carries the key to `openssl cms -verify`: the region trusts the
# key's pinned fingerprint, never this certificate. Fixed validity (RFC 5280 4.1.2.5: 99991231
# for "no well-defined expiration"), so it never expires under an old release.
_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)


class OfficerSigner(Protocol):
    """What countersigning needs from an officer's key."""

    spki: keys.PublicKeyInfo

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature over ``data`` with the curve's hash."""
        ...


def curve(spki: keys.PublicKeyInfo) -> str:
    """The named curve of an officer key, or ValueError naming what it is instead."""
    if spki.algorithm != "ec":
        raise ValueError(f"officer keys are ECDSA P-256 or P-384, not {spki.algorithm}")
    params = spki["algorithm"]["parameters"]
    name = params.chosen.native if params.name == "named" else None
    if name not in CURVES:
        raise ValueError(f"officer keys are ECDSA P-256 or P-384, not curve {name}")
    return name


def digest_name(spki: keys.PublicKeyInfo) -> str:
    return CURVES[curve(spki)][0]


def signature_algorithm(spki: keys.PublicKeyInfo) -> str:
    return CURVES[curve(spki)][1]


def fingerprint(spki: keys.PublicKeyInfo) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: what a region pins."""
    return hashlib.sha256(spki.dump()).digest()


def certificate(signer: OfficerSigner, name: str) -> x509.Certificate:
    """A self-signed certificate for the officer's key, made by the key itself."""
    spki = signer.spki
    algorithm = {"algorithm": signature_algorithm(spki)}
    subject = x509.Name.build({"organization_name": "hsm-suite",
                               "common_name": f"ceremony officer {name}"}, use_printable=False)
    key_id = hashlib.sha256(spki["public_key"].contents[1:]).digest()[:20]
    tbs = x509.TbsCertificate({
        "version": "v3",
        # The key's fingerprint: one serial per key, so (issuer, serial) names the key.
        "serial_number": int.from_bytes(fingerprint(spki)[:16], "big") >> 1,
        "signature": algorithm,
        "issuer": subject,
        "validity": {"not_before": x509.Time({"utc_time": _NOT_BEFORE}),
                     "not_after": x509.Time({"general_time": _NOT_AFTER})},
        "subject": subject,
        "subject_public_key_info": spki,
        # An end entity, and no key usage extension: OpenSSL takes a self-signed certificate
        # as its own trust anchor (`-CAfile`) only if its key usage admits keyCertSign or is
        # absent, and refuses one without basicConstraints (measured, OpenSSL 3.0).
        "extensions": [
            {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            {"extn_id": "key_identifier", "critical": False, "extn_value": key_id},
        ],
    })
    return x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": algorithm,
                             "signature_value": signer.sign(tbs.dump())})
