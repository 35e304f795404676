"""Per-region bundles: a versioned manifest in a CMS SignedData (RFC 5652) signed by the primary.

Building needs the primary token (the signature is made inside it, through a callback);
verifying needs only the pinned primary signing certificate, so a KMS or an auditor checks a
bundle offline. ``openssl cms -verify -inform DER -binary -CAfile primary-signing.pem`` accepts it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto import cms, keys, x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from suite.signatures import SIGNATURE_ALGORITHMS

from release.canonical import canonical
from release.errors import VerificationError

FORMAT = "hsm-suite-release-bundle"
VERSION = 1
# The signature AlgorithmIdentifiers are the ones certificates use (hsm.ops).
_SIG_ALGOS = SIGNATURE_ALGORITHMS
MANIFEST_KEYS = {"format", "version", "ceremony_id", "release", "region", "recipient",
                 "created", "practice", "kdf_salt", "secrets"}
SECRET_KEYS = {"name", "type", "key_type", "bits", "wrap", "wrapped", "check_value"}


def build(manifest: dict, signer_cert: x509.Certificate, signature: str,
          sign: Callable[[bytes], bytes], signing_time: dt.datetime | None = None) -> bytes:
    """DER ContentInfo(SignedData) over the canonical manifest; ``sign`` runs in the token."""
    content = canonical(manifest)
    when = (signing_time or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [cms.Time({"utc_time": when})]}),
        cms.CMSAttribute({"type": "message_digest",
                          "values": [hashlib.sha384(content).digest()]}),
    ])
    # The signature covers the DER SET OF the signed attributes (RFC 5652 5.4), not [0].
    sig = sign(attrs.dump())
    signer = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": signer_cert.issuer, "serial_number": signer_cert.serial_number})}),
        "digest_algorithm": {"algorithm": "sha384"},
        "signed_attrs": attrs,
        "signature_algorithm": _SIG_ALGOS[signature],
        "signature": sig,
    })
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": "sha384"}],
        "encap_content_info": {"content_type": "data", "content": content},
        "certificates": [signer_cert],
        "signer_infos": [signer],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


@dataclass(frozen=True)
class Verified:
    manifest: dict
    content: bytes
    signing_time: dt.datetime | None


def verify(der: bytes, primary_cert: x509.Certificate, *, where: str = "bundle") -> Verified:
    """Check the CMS structure, the signature against the pinned certificate, the manifest."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise ValueError("not SignedData")
        signed = info["content"]
        encap = signed["encap_content_info"]
        if encap["content_type"].native != "data":
            raise ValueError("encapsulated content is not id-data")
        content = encap["content"].native
        signers = signed["signer_infos"]
        if len(signers) != 1:
            raise ValueError(f"{len(signers)} signers, expected 1")
        si = signers[0]
        sid = si["sid"]
        attrs = si["signed_attrs"]
        values = {a["type"].native: a["values"] for a in attrs}
        algo = si["signature_algorithm"]
        signature = si["signature"].native
        digest_algo = si["digest_algorithm"]["algorithm"].native
        # No full `.native` parse (2 ms a bundle, mostly the embedded certificate): every
        # element is either compared byte for byte below or parsed by the check that uses it.
        # The unsigned envelope must be exactly what `build` writes, so a bundle's bytes are
        # its identity and its embedded certificate cannot name another signer.
        envelope_ok = (
            signed["version"].native == "v1" and si["version"].native == "v1"
            and [a.native for a in signed["digest_algorithms"]] == [
                {"algorithm": "sha384", "parameters": None}]
            and len(signed["certificates"]) == 1
            and not signed["crls"] and not si["unsigned_attrs"]
            and si["digest_algorithm"]["parameters"].native is None)
        if not envelope_ok:
            raise ValueError("the CMS envelope differs from the format (version, digest "
                             "algorithms, certificates or unsigned attributes)")
        embedded = signed["certificates"][0].chosen.dump()
        sid_ok = (sid.name == "issuer_and_serial_number"
                  and sid.chosen["serial_number"].native == primary_cert.serial_number
                  and sid.chosen["issuer"].dump() == primary_cert.issuer.dump())
        content_type = values["content_type"][0].native if "content_type" in values else None
        message_digest = values["message_digest"][0].native if "message_digest" in values \
            else None
        signing_time = values["signing_time"][0].native if "signing_time" in values else None
        signed_attrs_der = attrs.untag().dump()
        _ = algo.native
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(f"{where}: not a well-formed CMS SignedData ({exc})") from None
    if not isinstance(content, bytes):
        raise VerificationError(f"{where}: no encapsulated manifest")
    if embedded != primary_cert.dump():
        raise VerificationError(f"{where}: signed under another primary certificate than the "
                                "pinned one", hint="a bundle from another (or a practice) "
                                "primary HSM; check the pinned certificate")
    if not sid_ok:
        raise VerificationError(f"{where}: not signed by the pinned primary signing certificate")
    if digest_algo != "sha384" or set(values) != {"content_type", "signing_time",
                                                  "message_digest"}:
        raise VerificationError(f"{where}: unexpected digest algorithm or signed attributes")
    if content_type != "data" or message_digest != hashlib.sha384(content).digest():
        raise VerificationError(f"{where}: the manifest does not match its signed digest")
    check_signature(primary_cert.public_key, algo, signature, signed_attrs_der, where)
    manifest = _parse_manifest(content, where)
    return Verified(manifest, content, signing_time)


def check_signature(spki: keys.PublicKeyInfo, algo, signature: bytes, data: bytes,
                    where: str) -> None:
    """The primary's signature over ``data`` (``algo``: the CMS signature algorithm), with the
    public key of its certificate; VerificationError if it does not verify."""
    key = load_der_public_key(spki.dump())
    name = algo["algorithm"].native
    try:
        if name == "sha384_ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        elif name == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey) and algo.dump() == \
                cms.SignedDigestAlgorithm(_SIG_ALGOS["rsa-pss-sha384"]).dump():
            key.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA384()), 48),
                       hashes.SHA384())
        else:
            raise VerificationError(f"{where}: signature algorithm {name} does not match the "
                                    "primary signing key")
    except InvalidSignature:
        raise VerificationError(f"{where}: the signature does not verify with the primary "
                                "signing certificate") from None


def _parse_manifest(content: bytes, where: str) -> dict:
    try:
        manifest = json.loads(content)
    except ValueError:
        raise VerificationError(f"{where}: the manifest is not JSON") from None
    if not isinstance(manifest, dict) or set(manifest) != MANIFEST_KEYS:
        raise VerificationError(f"{where}: the manifest does not have the version-{VERSION} "
                                "fields")
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        raise VerificationError(f"{where}: unknown bundle format {manifest['format']!r} "
                                f"v{manifest['version']}")
    if canonical(manifest) != content:
        raise VerificationError(f"{where}: the manifest is not in canonical form")
    for s in manifest["secrets"]:
        if not isinstance(s, dict) or set(s) != SECRET_KEYS:
            raise VerificationError(f"{where}: a secret entry has unexpected fields")
    return manifest
