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

from release import signers
from release.canonical import canonical
from release.errors import VerificationError
from suite.signatures import SIGNATURE_ALGORITHMS

FORMAT = "hsm-suite-release-bundle"
# Version 2 adds what the officers approved: the plan digest and the run's nonce. Version 1
# manifests (made before officers countersigned) are still read: officers countersign them in
# place (`ceremony countersign`), which cannot change a manifest the primary signed.
VERSION = 2
VERSIONS = (1, 2)
# The signature AlgorithmIdentifiers are the ones certificates use (hsm.core.ops).
_SIG_ALGOS = SIGNATURE_ALGORITHMS
MANIFEST_KEYS_V1 = {"format", "version", "ceremony_id", "release", "region", "recipient",
                    "created", "practice", "kdf_salt", "secrets"}
MANIFEST_KEYS = MANIFEST_KEYS_V1 | {"plan_digest", "run_nonce"}
_MANIFEST_KEYS = {1: MANIFEST_KEYS_V1, 2: MANIFEST_KEYS}
_SIGNED_ATTRS = {"content_type", "signing_time", "message_digest"}
_HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384}
SECRET_KEYS = {"name", "type", "key_type", "bits", "wrap", "wrapped", "check_value"}


def build(manifest: dict, signer_cert: x509.Certificate, signature: str,
          sign: Callable[[bytes], bytes], signing_time: dt.datetime | None = None) -> bytes:
    """DER ContentInfo(SignedData) over the canonical manifest; ``sign`` runs in the token."""
    content = canonical(manifest)
    signer = _signer_info(content, signer_cert, "sha384", _SIG_ALGOS[signature], sign,
                          signing_time)
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": "sha384"}],
        "encap_content_info": {"content_type": "data", "content": content},
        "certificates": [signer_cert],
        "signer_infos": [signer],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def _signer_info(content: bytes, cert: x509.Certificate, digest: str, algorithm: object,
                 sign: Callable[[bytes], bytes], signing_time: dt.datetime | None
                 ) -> cms.SignerInfo:
    when = (signing_time or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [cms.Time({"utc_time": when})]}),
        cms.CMSAttribute({"type": "message_digest",
                          "values": [_HASHES[digest](content).digest()]}),
    ])
    # The signature covers the DER SET OF the signed attributes (RFC 5652 5.4), not [0].
    return cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": {"algorithm": digest},
        "signed_attrs": attrs,
        "signature_algorithm": algorithm,
        "signature": sign(attrs.dump()),
    })


@dataclass(frozen=True)
class OfficerSignature:
    """One officer SignerInfo of a bundle: the SHA-256 of its key's SPKI (what a region pins)
    and, when it does not count, why (``problem``, a predicate: "does not verify")."""

    spki_sha256: bytes
    problem: str | None = None


def countersign(der: bytes, primary_cert: x509.Certificate, signer: signers.OfficerSigner,
                certificate: x509.Certificate, *, signing_time: dt.datetime | None = None,
                where: str = "bundle") -> bytes:
    """The bundle with one more SignerInfo: ``signer``'s signature over the same manifest.

    The bundle is verified first (the primary's signature and every officer's), so an officer
    never adds a signature to a bundle that does not hold. ``certificate`` carries the officer's
    key for ``openssl cms -verify``; its key must be the signer's.
    """
    verified = verify(der, primary_cert, where=where)
    own = signers.fingerprint(signer.spki)
    if certificate.public_key.dump() != signer.spki.dump():
        raise VerificationError(f"{where}: the officer certificate is not of the signing key")
    if any(o.spki_sha256 == own for o in verified.officers):
        raise VerificationError(f"{where}: already countersigned by this officer key",
                                hint="each officer signs a bundle once")
    broken = [o for o in verified.officers if o.problem]
    if broken:
        raise VerificationError(f"{where}: an officer signature in it "
                                f"{broken[0].problem}; refusing to add to it",
                                hint="restore the bundle the ceremony wrote")
    info = cms.ContentInfo.load(der)
    signed = info["content"]
    digest = signers.digest_name(signer.spki)
    officer = _signer_info(verified.content, certificate, digest,
                           {"algorithm": signers.signature_algorithm(signer.spki)},
                           signer.sign, signing_time)
    algos = [a["algorithm"].native for a in signed["digest_algorithms"]]
    if digest not in algos:
        algos.append(digest)
    grown = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": a} for a in algos],
        "encap_content_info": signed["encap_content_info"],
        "certificates": list(signed["certificates"]) + [certificate],
        "signer_infos": list(signed["signer_infos"]) + [officer],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": grown}).dump()


class _NotPrimary(Exception):
    pass


def _sid_key(si: cms.SignerInfo) -> tuple[bytes, int] | None:
    sid = si["sid"]
    if sid.name != "issuer_and_serial_number":
        return None
    return sid.chosen["issuer"].dump(), sid.chosen["serial_number"].native


def strip_officers(der: bytes, primary_cert: x509.Certificate) -> bytes:
    """The bundle as the primary alone signed it (its signer and certificate): the identity a
    region records, unchanged by countersignatures. ``der`` must have verified."""
    signed = cms.ContentInfo.load(der)["content"]
    primary_sid = (primary_cert.issuer.dump(), primary_cert.serial_number)
    signer = next(s for s in signed["signer_infos"] if _sid_key(s) == primary_sid)
    return _core(signed["encap_content_info"], primary_cert, signer)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else \
        bytes([0x80 | (n.bit_length() + 7) // 8]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


_SIGNED_DATA_OID = cms.ContentType("signed_data").dump()
_V1 = cms.CMSVersion("v1").dump()
_SHA384_SET = _der(0x31, cms.DigestAlgorithm({"algorithm": "sha384"}).dump())


def _core(encap: cms.EncapsulatedContentInfo, cert: x509.Certificate,
          signer: cms.SignerInfo) -> bytes:
    """What :func:`build` wrote, from its parts' original encodings (the same DER that
    asn1crypto writes, in microseconds rather than milliseconds: the KMS does it per bundle
    at every start)."""
    signed = _der(0x30, _V1 + _SHA384_SET + encap.dump() + _der(0xA0, cert.dump())
                  + _der(0x31, signer.dump()))
    return _der(0x30, _SIGNED_DATA_OID + _der(0xA0, signed))


@dataclass(frozen=True)
class Verified:
    manifest: dict
    content: bytes
    signing_time: dt.datetime | None
    core_sha256: str = ""        # hex SHA-256 of the primary-only bundle (strip_officers)
    officers: tuple[OfficerSignature, ...] = ()

    @property
    def manifest_sha256(self) -> bytes:
        """What the ceremony shows the officers before they sign (hex and PGP words)."""
        return hashlib.sha256(self.content).digest()


def verify(der: bytes, primary_cert: x509.Certificate, *, where: str = "bundle") -> Verified:
    """Check the CMS structure, the primary's signature against the pinned certificate, the
    manifest, and each officer signature against the key its certificate carries (whether
    that key counts is the quorum check's question, :func:`release.quorum.check`)."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise ValueError("not SignedData")
        signed = info["content"]
        encap = signed["encap_content_info"]
        if encap["content_type"].native != "data":
            raise ValueError("encapsulated content is not id-data")
        content = encap["content"].native
        signers_ = list(signed["signer_infos"])
        certificates = [c.chosen for c in signed["certificates"]]
        # SignerInfos and certificates are DER SETs (sorted by encoding): the primary's signer
        # is the one naming the pinned certificate, wherever it sorts.
        primary_sid = (primary_cert.issuer.dump(), primary_cert.serial_number)
        sids = [_sid_key(s) for s in signers_]
        if sids.count(primary_sid) != 1:
            raise _NotPrimary()
        si = signers_[sids.index(primary_sid)]
        attrs = si["signed_attrs"]
        values = {a["type"].native: a["values"] for a in attrs}
        algo = si["signature_algorithm"]
        signature = si["signature"].native
        digest_algo = si["digest_algorithm"]["algorithm"].native
        # No full `.native` parse (2 ms a bundle, mostly the embedded certificates): every
        # element is either compared byte for byte below or parsed by the check that uses it.
        # The unsigned envelope must be exactly what `build` and `countersign` write (one
        # certificate per signer, each named by exactly one SignerInfo), so a bundle's bytes
        # are its identity and an embedded certificate cannot name another signer.
        by_sid = {(c.issuer.dump(), c.serial_number): c for c in certificates}
        digest_algos = [a.native for a in signed["digest_algorithms"]]
        envelope_ok = (
            signed["version"].native == "v1"
            and all(c.name == "certificate" for c in signed["certificates"])
            and len(certificates) == len(signers_) == len(by_sid) == len(set(sids))
            and set(by_sid) == set(sids)
            and not signed["crls"]
            and all(s["version"].native == "v1" and not s["unsigned_attrs"]
                    and s["digest_algorithm"]["parameters"].native is None for s in signers_)
            and len({a["algorithm"] for a in digest_algos}) == len(digest_algos)
            and {a["algorithm"] for a in digest_algos} == {
                s["digest_algorithm"]["algorithm"].native for s in signers_}
            and all(a["parameters"] is None for a in digest_algos))
        if not envelope_ok:
            raise ValueError("the CMS envelope differs from the format (version, digest "
                             "algorithms, certificates or unsigned attributes)")
        embedded = by_sid[primary_sid].dump()
        core = der if len(signers_) == 1 else _core(encap, primary_cert, si)
        officer_pairs = [(s, by_sid[k]) for s, k in zip(signers_, sids)
                         if k is not None and k != primary_sid]
        content_type = values["content_type"][0].native if "content_type" in values else None
        message_digest = values["message_digest"][0].native if "message_digest" in values \
            else None
        signing_time = values["signing_time"][0].native if "signing_time" in values else None
        signed_attrs_der = attrs.untag().dump()
        _ = algo.native
    except _NotPrimary:
        raise VerificationError(f"{where}: not signed by the pinned primary signing "
                                "certificate", hint="a bundle from another (or a practice) "
                                "primary HSM; check the pinned certificate") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(f"{where}: not a well-formed CMS SignedData ({exc})") from None
    if not isinstance(content, bytes):
        raise VerificationError(f"{where}: no encapsulated manifest")
    if embedded != primary_cert.dump():
        raise VerificationError(f"{where}: signed under another primary certificate than the "
                                "pinned one", hint="a bundle from another (or a practice) "
                                "primary HSM; check the pinned certificate")
    if digest_algo != "sha384" or set(values) != _SIGNED_ATTRS:
        raise VerificationError(f"{where}: unexpected digest algorithm or signed attributes")
    if content_type != "data" or message_digest != hashlib.sha384(content).digest():
        raise VerificationError(f"{where}: the manifest does not match its signed digest")
    check_signature(primary_cert.public_key, algo, signature, signed_attrs_der, where)
    manifest = _parse_manifest(content, where)
    officers = tuple(_officer(s, c, content) for s, c in officer_pairs)
    return Verified(manifest, content, signing_time, hashlib.sha256(core).hexdigest(), officers)


def _officer(si: cms.SignerInfo, cert: x509.Certificate, content: bytes) -> OfficerSignature:
    """One officer SignerInfo, checked against the key of the certificate it names. Never
    raises: a signature that does not hold is reported (and does not count), so a refusal can
    say which officer's signature failed and why."""
    try:
        spki = cert.public_key
        fpr = signers.fingerprint(spki)
    except (ValueError, TypeError, KeyError):
        return OfficerSignature(b"", "has a certificate that does not parse")
    try:
        sid = si["sid"]
        if sid.name != "issuer_and_serial_number" or \
                sid.chosen["serial_number"].native != cert.serial_number or \
                sid.chosen["issuer"].dump() != cert.issuer.dump():
            return OfficerSignature(fpr, "names another signer than the certificate beside it")
        digest = signers.digest_name(spki)
        if si["digest_algorithm"]["algorithm"].native != digest or \
                si["signature_algorithm"].dump() != cms.SignedDigestAlgorithm(
                    {"algorithm": signers.signature_algorithm(spki)}).dump():
            return OfficerSignature(fpr, "uses an algorithm that does not match its key's curve")
        values = {a["type"].native: a["values"] for a in si["signed_attrs"]}
        if set(values) != _SIGNED_ATTRS or values["content_type"][0].native != "data":
            return OfficerSignature(fpr, "has unexpected signed attributes")
        if values["message_digest"][0].native != _HASHES[digest](content).digest():
            return OfficerSignature(fpr, "is over another manifest")
        key = load_der_public_key(spki.dump())
        assert isinstance(key, ec.EllipticCurvePublicKey)
        ecdsa = ec.ECDSA(hashes.SHA256() if digest == "sha256" else hashes.SHA384())
        key.verify(si["signature"].native, si["signed_attrs"].untag().dump(), ecdsa)
    except InvalidSignature:
        return OfficerSignature(fpr, "does not verify")
    except (ValueError, TypeError, KeyError) as exc:
        return OfficerSignature(fpr, f"is not well-formed ({exc})")
    # The certificate only carries the key, but it is the officer's own (self-signed by that
    # key): a bundle's every byte is then either signed or checked, so no byte can change
    # unnoticed (what `ceremony verify`'s bit-flip tests hold it to).
    try:
        if cert["signature_algorithm"].dump() != si["signature_algorithm"].dump() or \
                cert.issuer.dump() != cert.subject.dump() or \
                cert["signature_value"].contents[:1] != b"\x00":  # no unused bits
            return OfficerSignature(fpr, "carries a certificate that is not self-signed")
        key.verify(cert["signature_value"].native, cert["tbs_certificate"].dump(), ecdsa)
    except InvalidSignature:
        return OfficerSignature(fpr, "carries a certificate its key did not sign")
    except (ValueError, TypeError, KeyError) as exc:
        return OfficerSignature(fpr, f"is not well-formed ({exc})")
    return OfficerSignature(fpr)


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
    if not isinstance(manifest, dict):
        raise VerificationError(f"{where}: the manifest is not a JSON object")
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or type(version) is not int or version not in VERSIONS:
        raise VerificationError(f"{where}: unknown bundle format {manifest.get('format')!r} "
                                f"v{version}")
    if set(manifest) != _MANIFEST_KEYS[manifest["version"]]:
        raise VerificationError(f"{where}: the manifest does not have the version-"
                                f"{manifest['version']} fields")
    if canonical(manifest) != content:
        raise VerificationError(f"{where}: the manifest is not in canonical form")
    for s in manifest["secrets"]:
        if not isinstance(s, dict) or set(s) != SECRET_KEYS:
            raise VerificationError(f"{where}: a secret entry has unexpected fields")
    return manifest
