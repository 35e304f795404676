"""SubjectPublicKeyInfo from token public keys, and X.509 certificates signed inside the token.

Certificates are assembled with asn1crypto; only the TBSCertificate's signature is computed, by the
issuer's private key in the token (see :func:`hsm.core.ops.sign`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

from asn1crypto import core, keys, pem, x509
from pkcs11 import Attribute, KeyType

from hsm.core import ops
from hsm.core.token import KeyRef, Token


def public_key_info(token: Token, ref: KeyRef) -> keys.PublicKeyInfo:
    """The DER-ready SPKI of a public key object in the token."""
    def read(lease):
        obj = lease.key(ref)
        key_type = obj[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            return "rsa", obj.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        return "ec", obj.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
    kind, attrs = token.run("C_GetAttributeValue", read, ref.label)
    if kind == "rsa":
        return keys.PublicKeyInfo({
            "algorithm": {"algorithm": "rsa"},
            "public_key": keys.RSAPublicKey({
                "modulus": int.from_bytes(attrs[Attribute.MODULUS], "big"),
                "public_exponent": int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big")}),
        })
    point = attrs[Attribute.EC_POINT]
    # PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some tokens return the raw point.
    if point[:1] == b"\x04" and len(point) > 2 and point[1] == len(point) - 2:
        point = core.OctetString.load(point).native
    return keys.PublicKeyInfo({
        "algorithm": {"algorithm": "ec",
                      "parameters": keys.ECDomainParameters.load(attrs[Attribute.EC_PARAMS])},
        "public_key": point,
    })


def fingerprint(spki: keys.PublicKeyInfo) -> bytes:
    return hashlib.sha256(spki.dump()).digest()


def _name(common_name: str, organization: str, unit: str | None = None,
          serial: str | None = None) -> x509.Name:
    attrs = {"organization_name": organization, "common_name": common_name}
    if unit:
        attrs["organizational_unit_name"] = unit
    if serial:
        attrs["serial_number"] = serial
    return x509.Name.build(attrs, use_printable=False)


def _key_id(spki: keys.PublicKeyInfo) -> bytes:
    # RFC 7093 method 1: leftmost 160 bits of SHA-256 over the subjectPublicKey bits.
    return hashlib.sha256(spki["public_key"].contents[1:]).digest()[:20]


def _time(when: dt.datetime) -> x509.Time:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
    return x509.Time({"utc_time" if when.year < 2050 else "general_time": when})


def issue(token: Token, *, issuer_key: KeyRef, signature: str, subject: x509.Name,
          subject_spki: keys.PublicKeyInfo, issuer_name: x509.Name | None,
          issuer_spki: keys.PublicKeyInfo, ca: bool, key_usage: set[str],
          days: int, not_before: dt.datetime | None = None) -> x509.Certificate:
    """Build a TBSCertificate and have the issuer's private key in ``token`` sign it."""
    now = (not_before or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    extensions = [
        {"extn_id": "basic_constraints", "critical": True,
         "extn_value": {"ca": ca, **({"path_len_constraint": 0} if ca else {})}},
        {"extn_id": "key_usage", "critical": True, "extn_value": key_usage},
        {"extn_id": "key_identifier", "critical": False, "extn_value": _key_id(subject_spki)},
        {"extn_id": "authority_key_identifier", "critical": False,
         "extn_value": {"key_identifier": _key_id(issuer_spki)}},
    ]
    algorithm = ops.SIGNATURE_ALGORITHMS[signature]
    tbs = x509.TbsCertificate({
        "version": "v3",
        # 159 random bits: positive, unique, and unpredictable (CA/B Forum style).
        "serial_number": int.from_bytes(os.urandom(20), "big") >> 1,
        "signature": algorithm,
        "issuer": issuer_name or subject,
        "validity": {"not_before": _time(now - dt.timedelta(minutes=5)),
                     "not_after": _time(now + dt.timedelta(days=days))},
        "subject": subject,
        "subject_public_key_info": subject_spki,
        "extensions": extensions,
    })
    sig = ops.sign(token, issuer_key, signature, tbs.dump())
    return x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": algorithm,
                             "signature_value": sig})


def to_pem(cert: x509.Certificate) -> bytes:
    return pem.armor("CERTIFICATE", cert.dump())


def load_pem(data: bytes) -> x509.Certificate:
    if pem.detect(data):
        _, _, data = pem.unarmor(data)
    return x509.Certificate.load(data)


def names(*, role: str, token_label: str, organization: str, region: str | None = None,
          serial: str | None = None) -> x509.Name:
    unit = f"region {region}" if region else "primary"
    return _name(f"{token_label} {role}", organization, unit, serial)
