"""M-of-N approvals: each crypto officer signs (plan digest || ceremony nonce) with their own
Ed25519 key, before any key is touched.

The nonce is drawn fresh when the ceremony is opened and recorded in its journal, so an approval
made for another run (or another plan) cannot be replayed into this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ApprovalError
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


def sign(plan: Plan, nonce: bytes, officer: str, key_path: Path, password: bytes | None = None
         ) -> Approval:
    """What `ceremony approve` does on the officer's side."""
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password)
    except (OSError, ValueError, TypeError) as exc:
        raise ApprovalError(f"cannot load approval key {key_path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ApprovalError(f"{key_path} is not an Ed25519 private key")
    listed = {o.name: o for o in plan.officers}
    if officer not in listed:
        raise ApprovalError(f"{officer!r} is not an officer in the plan")
    if _load_pub(listed[officer].approval_key).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw) != \
            key.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw):
        raise ApprovalError(f"{key_path} is not the approval key the plan lists for {officer!r}",
                            hint="use your own key file; the plan's public key for you differs")
    return Approval(officer, plan.digest, nonce, key.sign(message(plan.digest, nonce)))


def _load_pub(pem_text: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem_text.encode())
    assert isinstance(key, Ed25519PublicKey)
    return key


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
            _load_pub(officer.approval_key).verify(ap.signature, message(plan.digest, nonce))
        except InvalidSignature:
            problems.append(f"{ap.officer!r}: the signature does not verify")
            continue
        # Defence in depth behind the plan parser: one key holder never counts twice.
        raw_key = _load_pub(officer.approval_key).public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)
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
    """Generate an officer's Ed25519 approval key file (0600); return the public PEM."""
    from hsm.files import write_new
    key = Ed25519PrivateKey.generate()
    write_new(path, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), mode=0o600)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
