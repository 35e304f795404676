"""M-of-N approvals: each crypto officer signs (plan digest || ceremony nonce) with their own key
(ECDSA P-256/P-384 in their token, :mod:`ceremony.officers`; Ed25519 files of older plans still
approve), before any key is touched.

The nonce is drawn fresh when the ceremony is opened and recorded in its journal, so an approval
made for another run (or another plan) cannot be replayed into this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ApprovalError
from .officers import FileSigner
from .plan import Plan

CONTEXT = b"hsm-suite ceremony approval v1\x00"


def message(digest: bytes, nonce: bytes) -> bytes:
    return CONTEXT + digest + nonce


@dataclass(frozen=True)
class Approval:
    officer: str
    plan_digest: bytes
    nonce: bytes
    signature: bytes

    def to_json(self) -> str:
        return json.dumps({"officer": self.officer, "plan_digest": self.plan_digest.hex(),
                           "nonce": self.nonce.hex(), "signature": self.signature.hex()},
                          indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Approval:
        try:
            d = json.loads(Path(path).read_text())
            if not isinstance(d, dict) or set(d) != {"officer", "plan_digest", "nonce",
                                                     "signature"} or \
                    not all(isinstance(v, str) for v in d.values()):
                raise ValueError("expected the four string fields officer, plan_digest, "
                                 "nonce, signature")
            return cls(d["officer"], bytes.fromhex(d["plan_digest"]), bytes.fromhex(d["nonce"]),
                       bytes.fromhex(d["signature"]))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ApprovalError(f"cannot read approval {path}: {exc}") from None


def sign(plan: Plan, nonce: bytes, officer: str, key_path: Path | None = None,
         password: bytes | None = None, *, signer=None) -> Approval:
    """What `ceremony approve` does on the officer's side: with the key file ``key_path`` or a
    ``signer`` (:class:`hsm.keys.officer.TokenSigner`), which must be the plan's key for them."""
    if signer is None:
        if key_path is None:
            raise ApprovalError("no approval key given")
        signer = FileSigner(Path(key_path), password)
    listed = {o.name: o for o in plan.officers}
    if officer not in listed:
        raise ApprovalError(f"{officer!r} is not an officer in the plan")
    if _spki(listed[officer].approval_key) != signer.spki.dump():
        raise ApprovalError(f"{key_path or 'the token key'} is not the approval key the plan "
                            f"lists for {officer!r}",
                            hint="use your own key; the plan's public key for you differs")
    return Approval(officer, plan.digest, nonce, signer.sign(message(plan.digest, nonce)))


def spki_of(pem_text: str) -> bytes:
    """The DER SubjectPublicKeyInfo of a plan's approval key."""
    return _spki(pem_text)


def _spki(pem_text: str) -> bytes:
    key = serialization.load_pem_public_key(pem_text.encode())
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(pem_text: str, signature: bytes, data: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` is the plan key's over ``data``."""
    key = serialization.load_pem_public_key(pem_text.encode())
    if isinstance(key, Ed25519PublicKey):
        key.verify(signature, data)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = hashes.SHA256() if key.curve.name == "secp256r1" else hashes.SHA384()
        key.verify(signature, data, ec.ECDSA(algorithm))
    else:  # the plan parser admits no other kind
        raise InvalidSignature()


def check(plan: Plan, nonce: bytes, approvals: list[Approval]) -> list[str]:
    """Return the approving crypto officers, or raise naming every reason a quorum is missing."""
    return list(check_detailed(plan, nonce, approvals))


def check_detailed(plan: Plan, nonce: bytes, approvals: list[Approval]) -> dict[str, bytes]:
    """Like :func:`check`; maps each approving officer to the signature that verified."""
    officers = {o.name: o for o in plan.officers}
    valid: dict[str, bytes] = {}
    problems: list[str] = []
    key_of: dict[bytes, str] = {}  # approval key -> the officer it already counted for
    for ap in approvals:
        officer = officers.get(ap.officer)
        if officer is None:
            problems.append(f"{ap.officer!r} is not an officer in the plan")
            continue
        if officer.role != "crypto-officer":
            problems.append(f"{ap.officer!r} is a {officer.role}, not a crypto officer")
            continue
        if ap.plan_digest != plan.digest:
            problems.append(f"{ap.officer!r} approved another plan (digest "
                            f"{ap.plan_digest.hex()[:16]}...)")
            continue
        if ap.nonce != nonce:
            problems.append(f"{ap.officer!r} approved another ceremony run (nonce "
                            f"{ap.nonce.hex()[:16]}..., this run's is {nonce.hex()[:16]}...)")
            continue
        try:
            _verify(officer.approval_key, ap.signature, message(plan.digest, nonce))
        except InvalidSignature:
            problems.append(f"{ap.officer!r}: the signature does not verify")
            continue
        # Defence in depth behind the plan parser: one key holder never counts twice.
        raw_key = _spki(officer.approval_key)
        if key_of.setdefault(raw_key, ap.officer) != ap.officer:
            problems.append(f"{ap.officer!r} has the same approval key as "
                            f"{key_of[raw_key]!r}; it counts once")
            continue
        valid.setdefault(ap.officer, ap.signature)
    if len(valid) < plan.quorum:
        detail = "; ".join(problems) if problems else "no other approvals were given"
        raise ApprovalError(f"{len(valid)} valid approval(s) of the {plan.quorum} required "
                            f"({', '.join(valid) or 'none'}): {detail}",
                            hint="each crypto officer runs `ceremony approve` over this run's "
                                 "digest and nonce")
    return valid


def new_key(path: Path) -> str:
    """Generate an officer's ECDSA P-256 key file (0600, rehearsals); return the public PEM."""
    from .officers import new_key_file, public_pem
    return public_pem(new_key_file(path))


def new_legacy_key(path: Path) -> str:
    """An Ed25519 approval key file, as plans made before countersignatures had: for tests
    of those plans only."""
    from suite.files import write_new
    key = Ed25519PrivateKey.generate()
    write_new(path, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), mode=0o600)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
