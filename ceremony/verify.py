"""Offline verification of a closed ceremony: no HSM, only the primary signing certificate and
the officers the verifier pins (:mod:`release.quorum`).

Checks, in order: the transcript's hash chain; the signature on its head; that the signed head is
the last record (nothing appended after closing); that the approvals met the quorum recorded at
open; and every bundle the transcript lists - its primary-signed core against the hash the
transcript recorded, the CMS signatures, manifest consistency (release, region, and for
version-2 manifests the plan digest and run nonce the officers approved), and signatures of M
officers the verifier pins.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from release import bundle as bundles
from release import certificates as certs
from release import quorum
from release.canonical import canonical

from .errors import VerificationError
from .transcript import FILE, SIGNATURE_FILE, head_message, load, sha256_hex


def verify_directory(directory: Path, primary_cert_path: Path,
                     officers: quorum.Pins | None) -> dict:
    """Verify a closed ceremony; ``officers`` is the pinned quorum every bundle must meet
    (``None`` only for `ceremony countersign`, which checks everything but that quorum before
    officers add to it)."""
    directory = Path(directory)
    cert = certs.load(primary_cert_path, "primary signing")
    asn1_cert = certs.as_asn1(cert)
    path = directory / FILE
    if not path.exists():
        raise VerificationError(f"no transcript in {directory}")
    records = load(path)  # chain checked; no repair: offline verification never edits
    sig_path = directory / SIGNATURE_FILE
    try:
        sig_doc = json.loads(sig_path.read_text())
        if set(sig_doc) != {"head", "records", "algorithm", "signature", "signer_spki_sha256"}:
            raise ValueError("unexpected fields")
        head, signature = sig_doc["head"], bytes.fromhex(sig_doc["signature"])
        if sig_doc["signature"] != signature.hex():  # bytes.fromhex accepts upper case, blanks
            raise ValueError("the signature is not canonical lowercase hex")
        count = sig_doc["records"]
        signer = sig_doc["signer_spki_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VerificationError(f"{sig_path}: missing or unreadable head signature ({exc})",
                                hint="a ceremony that did not close has no signed head") from None
    if not records or records[-1]["hash"] != head or count != len(records):
        raise VerificationError(f"{sig_path}: the signed head is not the transcript's last "
                                "record (records were added or removed after closing)")
    if records[-1]["step"] != "close":
        raise VerificationError(f"{path}: the transcript does not end with 'close'")
    if signer != certs.spki_fingerprint(cert).hex():
        raise VerificationError(f"{sig_path}: the ceremony was signed by another key than the "
                                f"certificate {primary_cert_path} holds",
                                hint="give --cert the primary signing certificate of the HSM "
                                     "that ran this ceremony")
    _verify_head(cert, sig_doc.get("algorithm"), signature, head, sig_path)
    opened = records[0]
    if opened["step"] != "open":
        raise VerificationError(f"{path}: the transcript does not start with 'open'")
    approvals = [r for r in records if r["step"] == "approvals"]
    needed = opened["data"].get("quorum")
    if not approvals or needed is None or len(approvals[-1]["data"]["approved_by"]) < needed \
            or approvals[-1]["data"]["nonce"] != opened["data"]["nonce"]:
        raise VerificationError(f"{path}: the recorded approvals do not meet the quorum")
    checked: list[str] = []
    signed_by: dict[str, list[str]] = {}
    manifests: dict[str, str] = {}
    for rec in records:
        if not rec["step"].startswith("export:"):
            continue
        name = rec["data"]["bundle"]
        bpath = directory / name
        try:
            der = bpath.read_bytes()
        except OSError:
            raise VerificationError(f"bundle {name} listed in the transcript is missing") from None
        verified = bundles.verify(der, asn1_cert, where=str(bpath))
        # Officers' signatures are added after the ceremony: the transcript recorded the
        # bundle as the primary signed it, which is what stays when they are set aside.
        if verified.core_sha256 != rec["data"]["sha256"]:
            raise VerificationError(f"{bpath}: differs from the bundle the transcript recorded")
        m = verified.manifest
        if m["ceremony_id"] != opened["data"]["ceremony_id"] or \
                m["release"] != opened["data"]["release"] or \
                m["practice"] != opened["data"]["practice"] or \
                m["region"] != rec["step"].split(":", 1)[1] or \
                (m["version"] >= 2 and (m["plan_digest"] != opened["data"]["plan_digest"]
                                        or m["run_nonce"] != opened["data"]["nonce"])):
            raise VerificationError(f"{bpath}: its manifest does not match the transcript")
        if officers is not None:
            signed_by[name] = quorum.check(verified, officers, str(bpath))
        manifests[name] = verified.manifest_sha256.hex()
        checked.append(name)
    strays = sorted(p.name for p in directory.glob("bundle-*") if p.name not in checked)
    if strays:
        raise VerificationError(f"{directory}: bundle files the transcript does not list: "
                                + ", ".join(strays))
    return {"ceremony_id": opened["data"]["ceremony_id"], "records": len(records),
            "head": head, "bundles": checked,
            "resumed": sum(1 for r in records if r["step"] == "resume"),
            "practice": opened["data"]["practice"], "officers": signed_by,
            "manifests": manifests, "release_digest": release_digest(manifests).hex()}


def release_digest(manifests: dict[str, str]) -> bytes:
    """One digest over every bundle's manifest (name -> SHA-256 hex): what the ceremony shows
    the officers at close, in hex and PGP words, and what each re-reads before countersigning."""
    return hashlib.sha256(b"hsm-suite release manifests v1\x00" + canonical(manifests)).digest()


def _verify_head(cert, algorithm: str | None, signature: bytes, head: str, where: Path) -> None:
    key = cert.public_key()
    try:
        if algorithm == "ecdsa-sha384" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, head_message(head), ec.ECDSA(hashes.SHA384()))
        elif algorithm == "rsa-pss-sha384":
            key.verify(signature, head_message(head),
                       padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
        else:
            raise VerificationError(f"{where}: unexpected signature algorithm {algorithm!r}")
    except InvalidSignature:
        raise VerificationError(f"{where}: the transcript head signature does not verify with "
                                "the primary signing certificate") from None
