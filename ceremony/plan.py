"""The ceremony plan: one TOML file, parsed strictly, reviewed weeks before and run unchanged.

Strict means: an unknown key, a missing field or a wrong type is an error naming the key path and
its line, never a default. The plan holds no PIN, module path or slot number; those come from the
environment file (:mod:`ceremony.environment`), so the reviewed plan runs as-is on the day.
The plan digest is SHA-256 over the file's exact bytes: what the officers reviewed and approve.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from release.ids import RELEASE_ID, release_key
from suite import fingerprint as fp
from suite import tomlfile

from .errors import PlanError

# release-secrets: make a release's secrets and export them to regions (and escrow).
# regional-enrollment: certify a regional HSM's encryption key.
# escrow-export: restore an existing release from its escrow bundle into session objects of the
#   primary and export it to regions enrolled later; the primary keeps no copy afterwards.
T = TypeVar("T")

CEREMONY_TYPES = ("release-secrets", "regional-enrollment", "escrow-export")
ROLES = ("administrator", "crypto-officer", "witness")
SECRET_TYPES = {
    # name: (PKCS#11 key type, bits, usages in the regional token)
    "hmac-sha256-seed": ("generic-secret", 256),
    "aes-256": ("aes", 256),
}
# fullmatch and explicit ASCII classes: `$` would accept a trailing newline and `\d` any
# Unicode digit, and both would end up in token labels and file names.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Officer:
    name: str
    role: str
    approval_key: str  # ECDSA P-256/P-384 (or older plans' Ed25519) public key, PEM SPKI


@dataclass(frozen=True)
class Region:
    name: str
    certificate: Path
    fingerprint: bytes


@dataclass(frozen=True)
class Secret:
    name: str
    type: str

    @property
    def key_type(self) -> str:
        return SECRET_TYPES[self.type][0]

    @property
    def bits(self) -> int:
        return SECRET_TYPES[self.type][1]


@dataclass(frozen=True)
class Plan:
    path: Path
    digest: bytes
    id: str
    type: str
    practice: bool
    output_dir: Path
    primary_signing_certificate: Path
    primary_encryption_certificate: Path
    quorum: int
    officers: tuple[Officer, ...]
    release: str | None = None
    regions: tuple[Region, ...] = ()
    secrets: tuple[Secret, ...] = ()
    enrollment_request: Path | None = None
    enrollment_fingerprint: bytes | None = None
    escrow_bundle: Path | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def crypto_officers(self) -> tuple[Officer, ...]:
        return tuple(o for o in self.officers if o.role == "crypto-officer")

    def input_files(self) -> list[Path]:
        """Every file the plan names as an input (certificates, the enrollment request)."""
        files = [self.primary_signing_certificate]
        if self.type != "regional-enrollment":
            files.append(self.primary_encryption_certificate)
        files += [r.certificate for r in self.regions]
        if self.enrollment_request is not None:
            files.append(self.enrollment_request)
        if self.escrow_bundle is not None:
            files.append(self.escrow_bundle)
        return files

    def need(self, value: T | None, key: str) -> T:
        """A field this ceremony type requires; the parser has made sure it is set, so None
        here means a plan object built by hand for the wrong type."""
        if value is None:
            raise PlanError(f"{self.path}: a {self.type} ceremony needs {key}")
        return value

    def release_tuple(self) -> tuple[int, ...]:
        return release_key(self.release or "0")


# ------------------------------------------------------------------------------------ parsing
class _Checker:
    """Walks the parsed TOML, consuming keys; reports errors with key path and source line."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, keypath: str) -> int | None:
        """Best-effort source line of a key path like ``regions[1].fingerprint``."""
        parts = re.findall(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?", keypath)
        start = 0
        for name, index in parts:
            if index:   # the index-th [[name]] table from here
                header = re.compile(rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]")
                hits = [i for i in range(start, len(self.lines)) if header.match(self.lines[i])]
                if len(hits) <= int(index):
                    return None
                start = hits[int(index)]
                continue
            table = re.compile(rf"^\s*\[\[?\s*{re.escape(name)}\s*\]")
            keyline = re.compile(rf"^\s*{re.escape(name)}\s*=")
            found = next((i for i in range(start, len(self.lines))
                          if keyline.match(self.lines[i]) or table.match(self.lines[i])), None)
            if found is None:
                return None
            start = found
        return start + 1

    def fail(self, keypath: str, message: str) -> PlanError:
        line = self.line_of(keypath)
        where = f"{self.path}:{line}" if line else str(self.path)
        return PlanError(f"{where}: {keypath}: {message}")

    def table(self, data: object, keypath: str) -> dict:
        if not isinstance(data, dict):
            raise self.fail(keypath, f"must be a table, got {type(data).__name__}")
        return dict(data)

    def take(self, table: dict, key: str, kind: type, keypath: str, *, required: bool = True):
        full = f"{keypath}.{key}" if keypath else key
        if key not in table:
            if required:
                raise self.fail(keypath or key, f"missing required key {key!r}")
            return None
        value = table.pop(key)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(full, f"must be {kind.__name__}, got {type(value).__name__}")
        return value

    def required_table(self, top: dict, key: str) -> dict:
        if key not in top:
            raise self.fail(key, f"missing required table [{key}]")
        return self.table(top.pop(key), key)

    def entries(self, top: dict, key: str) -> list[tuple[str, dict]]:
        """The entries of a required, non-empty [[key]] array, each with its key path."""
        items = top.pop(key, None)
        if not isinstance(items, list) or not items:
            raise self.fail(key, f"at least one [[{key}]] entry is required")
        return [(f"{key}[{i}]", self.table(item, f"{key}[{i}]")) for i, item in enumerate(items)]

    def name(self, table: dict, keypath: str) -> str:
        value = self.take(table, "name", str, keypath)
        if not _ID.fullmatch(value):
            raise self.fail(f"{keypath}.name", "letters, digits, '.', '_' and '-' only")
        return value

    def unique(self, key: str, names: list[str]) -> None:
        if len(set(names)) != len(names):
            raise self.fail(key, f"{key[:-1]} names must be unique")

    def done(self, table: dict, keypath: str) -> None:
        if table:
            key = sorted(table)[0]
            raise self.fail(f"{keypath}.{key}" if keypath else key,
                            "unknown key (the plan format is strict; check the spelling)")


def load(path: str | Path) -> Plan:
    path = Path(path)
    data, raw, text = tomlfile.read(path, what="plan", error=PlanError)
    chk = _Checker(path, text)
    base = path.parent
    top = dict(data)

    cer = chk.required_table(top, "ceremony")
    cid = chk.take(cer, "id", str, "ceremony")
    if not _ID.fullmatch(cid):
        raise chk.fail("ceremony.id", "letters, digits, '.', '_' and '-' only (max 63)")
    ctype = chk.take(cer, "type", str, "ceremony")
    if ctype not in CEREMONY_TYPES:
        raise chk.fail("ceremony.type", f"must be one of {', '.join(CEREMONY_TYPES)}")
    practice = chk.take(cer, "practice", bool, "ceremony")
    output_dir = base / chk.take(cer, "output_dir", str, "ceremony")
    release = chk.take(cer, "release", str, "ceremony", required=ctype != "regional-enrollment")
    if release is not None and not RELEASE_ID.fullmatch(release):
        raise chk.fail("ceremony.release", "a release id is 1 to 4 dotted numbers of at most 9 "
                       "digits, e.g. '42' or '2026.11' (releases are ordered by these numbers "
                       "and only move up)")
    chk.done(cer, "ceremony")

    prim = chk.required_table(top, "primary")
    sign_cert = base / chk.take(prim, "signing_certificate", str, "primary")
    enc_cert = base / chk.take(prim, "encryption_certificate", str, "primary")
    chk.done(prim, "primary")

    quorum_t = chk.required_table(top, "quorum")
    m = chk.take(quorum_t, "m", int, "quorum")
    chk.done(quorum_t, "quorum")

    officers = []
    for kp, t in chk.entries(top, "officers"):
        name = chk.name(t, kp)
        role = chk.take(t, "role", str, kp)
        if role not in ROLES:
            raise chk.fail(f"{kp}.role", f"must be one of {', '.join(ROLES)}")
        key = chk.take(t, "approval_key", str, kp)
        _check_approval_key(chk, f"{kp}.approval_key", key)
        chk.done(t, kp)
        officers.append(Officer(name, role, key))
    chk.unique("officers", [o.name for o in officers])
    seen_keys: dict[bytes, int] = {}
    for i, o in enumerate(officers):
        raw_key = _raw_key(o.approval_key)
        if raw_key in seen_keys:
            # One person holding two officers' keys would meet an M-of-N quorum alone.
            raise chk.fail(f"officers[{i}].approval_key", "the same approval key as "
                           f"officers[{seen_keys[raw_key]}]; every officer needs their own")
        seen_keys[raw_key] = i
    n_crypto = sum(1 for o in officers if o.role == "crypto-officer")
    if not 1 <= m <= n_crypto:
        raise chk.fail("quorum.m", f"must be between 1 and the number of crypto officers "
                       f"({n_crypto})")

    regions: list[Region] = []
    secrets: list[Secret] = []
    enrollment_request = enrollment_fp = escrow_bundle = None
    if ctype in ("release-secrets", "escrow-export"):
        for kp, t in chk.entries(top, "regions"):
            name = chk.name(t, kp)
            if name == "escrow":
                raise chk.fail(f"{kp}.name", "'escrow' is reserved for the escrow bundle")
            cert = base / chk.take(t, "certificate", str, kp)
            fpr = _fingerprint(chk, f"{kp}.fingerprint", chk.take(t, "fingerprint", str, kp))
            chk.done(t, kp)
            regions.append(Region(name, cert, fpr))
        chk.unique("regions", [r.name for r in regions])
    if ctype == "escrow-export":
        # The secrets are the escrow bundle's: the plan names the bundle, not the secrets.
        esc = chk.required_table(top, "escrow")
        escrow_bundle = base / chk.take(esc, "bundle", str, "escrow")
        chk.done(esc, "escrow")
    elif ctype == "release-secrets":
        for kp, t in chk.entries(top, "secrets"):
            name = chk.name(t, kp)
            stype = chk.take(t, "type", str, kp)
            if stype not in SECRET_TYPES:
                raise chk.fail(f"{kp}.type", f"must be one of {', '.join(SECRET_TYPES)}")
            chk.done(t, kp)
            secrets.append(Secret(name, stype))
        chk.unique("secrets", [x.name for x in secrets])
    else:
        enr = chk.required_table(top, "enrollment")
        enrollment_request = base / chk.take(enr, "request", str, "enrollment")
        enrollment_fp = _fingerprint(chk, "enrollment.fingerprint",
                                     chk.take(enr, "fingerprint", str, "enrollment"))
        chk.done(enr, "enrollment")
    chk.done(top, "")
    return Plan(path=path, digest=hashlib.sha256(raw).digest(), id=cid, type=ctype,
                practice=practice, output_dir=output_dir, primary_signing_certificate=sign_cert,
                primary_encryption_certificate=enc_cert, quorum=m, officers=tuple(officers),
                release=release, regions=tuple(regions), secrets=tuple(secrets),
                enrollment_request=enrollment_request, enrollment_fingerprint=enrollment_fp,
                escrow_bundle=escrow_bundle, raw=data)


def _fingerprint(chk: _Checker, keypath: str, value: str) -> bytes:
    try:
        return fp.parse_fingerprint(value)
    except ValueError as exc:
        raise chk.fail(keypath, f"not a SHA-256 fingerprint: {exc}") from None


def _raw_key(pem_text: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import (Encoding, PublicFormat,
                                                              load_pem_public_key)
    return load_pem_public_key(pem_text.encode()).public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _check_approval_key(chk: _Checker, keypath: str, pem_text: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    try:
        key = load_pem_public_key(pem_text.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise chk.fail(keypath, "not a PEM public key of a known algorithm") from None
    ecdsa = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1",
                                                                            "secp384r1")
    if not ecdsa and not isinstance(key, Ed25519PublicKey):
        raise chk.fail(keypath, "approval keys are ECDSA P-256/P-384 (`ceremony keygen`); "
                       "Ed25519 keys of older plans approve but cannot countersign")
