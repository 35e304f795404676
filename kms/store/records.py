"""Rows as the store keeps them, and their integrity: each row of ``orgs``, ``tenant_secrets``,
``releases``, ``customer_keys`` and ``byok_uploads`` carries ``checksum`` = SHA-256 over its
canonical, type-tagged fields, domain-separated per table. Every read checks it; a failing row
becomes a :class:`CorruptRecord` naming the row. A checksum is not a MAC (anyone who can write
the database can recompute it): tampering with a wrapped blob is caught by its AES-GCM binding
inside the HSM, which is not this package's job."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from kms.errors import CorruptRecord

SECRET_FIELDS = ("org_id", "key_type", "version", "state", "source", "derivation", "release",
                 "wrapped", "iterations", "created_at", "usable_from", "destroyed_at")
SECRET_COLUMNS = ("org_id, key_type, version, state, source, derivation, release_id, wrapped, "
                  "iterations, created_at, usable_from, destroyed_at, checksum")
ORG_COLUMNS = "org_type, created_at, checksum"
RELEASE_COLUMNS = "release_id, ceremony_id, bundle_sha256, recorded_at, checksum"


@dataclass(frozen=True)
class SecretRow:
    org_id: str
    key_type: str          # policy.KEY_TYPES
    version: int
    state: str             # policy.STATES
    source: str            # policy.SOURCES
    derivation: str        # policy.DERIVATIONS
    release: str | None    # release whose tenant wrapping key wrapped it
    wrapped: bytes | None = field(repr=False)   # None once DESTROYED (crypto-shredding)
    iterations: int        # PBKDF2 iterations recorded with the key
    created_at: float
    usable_from: float
    destroyed_at: float | None

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in SECRET_FIELDS}

    def values(self) -> tuple:
        """The checksummed fields, in ``SECRET_FIELDS`` order."""
        return tuple(getattr(self, name) for name in SECRET_FIELDS)


def utc_iso(t: float) -> str:
    """UTC ISO 8601 to the second, rounded up (a "not before" time is never shown early)."""
    try:
        return datetime.fromtimestamp(math.ceil(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f} s after the Unix epoch"


# ----------------------------------------------------------------------------- checksums
def checksum(table: str, values: Sequence[Any]) -> str:
    """SHA-256 over type-tagged, length-prefixed values: equal digests mean equal values *and*
    types (a version turned into text, or 1.0 into 1, fails the check)."""
    h = hashlib.sha256(f"hsm-suite/kms-store/{table}/v1".encode() + b"\x00")
    for v in values:
        if v is None:
            h.update(b"N")
        elif isinstance(v, bool):
            h.update(b"?bool")
        elif isinstance(v, int):
            raw = str(v).encode()
            h.update(b"I" + len(raw).to_bytes(4, "big") + raw)
        elif isinstance(v, float):
            h.update(b"F" + struct.pack(">d", v))
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            h.update(b"S" + len(raw).to_bytes(4, "big") + raw)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            raw = bytes(v)
            h.update(b"B" + len(raw).to_bytes(8, "big") + raw)
        else:
            h.update(b"?" + type(v).__name__.encode())
    return h.hexdigest()


def secret_checksum(row: SecretRow) -> str:
    return checksum("tenant_secrets", row.values())


def bytes_or_none(v):
    return bytes(v) if isinstance(v, (bytearray, memoryview)) else v


# ----------------------------------------------------------------------------- corrupt rows
def record_name(record: tuple) -> str:
    if record[0] == "tenant_secrets":
        return f"org {record[1]!r} {record[2]} v{record[3]}"
    if record[0] == "orgs":
        return f"org {record[1]!r} (its orgs row)"
    if record[0] == "releases":
        return f"release {record[1]!r}"
    return f"org {record[1]!r} ({record[0]} row)"


def corrupt(record: tuple, message: str, hint: str) -> CorruptRecord:
    """One failed row: ``record`` is ("tenant_secrets", org, key type, version), ("orgs", org),
    ("releases", release) or ("customer_keys", org), as ``Store.verify`` reports them."""
    return CorruptRecord(message, hint=hint, records=[record])


def corrupt_secret(org_id, key_type, version) -> CorruptRecord:
    return corrupt(("tenant_secrets", org_id, key_type, version),
                   f"store row of org {org_id!r}, {key_type} secret v{version} failed its "
                   "integrity check (checksum mismatch)",
                   "the row was altered outside the KMS or the database is damaged; restore it "
                   "from a backup (kms tenant export/import); other rows are unaffected")


def corrupt_org(org_id) -> CorruptRecord:
    return corrupt(("orgs", org_id),
                   f"store row of org {org_id!r} (orgs table) failed its integrity check",
                   "restore the org's row from a backup; other orgs are unaffected")


def corrupt_release(release) -> CorruptRecord:
    return corrupt(("releases", release),
                   f"store row of release {release!r} failed its integrity check",
                   "re-import the release's bundle after investigating")


R = TypeVar("R")


def checked_listing(what: str, raws: Iterable[Sequence[Any]],
                    parse: Callable[[Sequence[Any]], R]) -> list[R]:
    """Every row parsed, or one CorruptRecord naming *every* failing row (``.records``) and
    carrying the rows that passed (``.intact``): a listing never drops a row silently."""
    good: list[R] = []
    bad: list[tuple] = []
    for raw in raws:
        try:
            good.append(parse(raw))
        except CorruptRecord as exc:
            bad.extend(exc.records)
    if bad:
        names = "; ".join(record_name(r) for r in bad)
        raise CorruptRecord(
            f"{what}: {len(bad)} store row(s) failed their integrity check: {names}",
            hint=f"the other {len(good)} row(s) are intact (CorruptRecord.intact); restore the "
                 "damaged rows from a backup",
            records=bad, intact=good)
    return good


# ----------------------------------------------------------------------------- row parsers
def secret_from_db(raw: Sequence[Any]) -> SecretRow:
    """A verified SecretRow from a raw ``SECRET_COLUMNS`` tuple, else CorruptRecord."""
    values, stored = [bytes_or_none(v) for v in raw[:-1]], raw[-1]
    if checksum("tenant_secrets", values) != stored:
        raise corrupt_secret(raw[0], raw[1], raw[2])
    return SecretRow(*values)


def org_type_from_db(org_id: str, raw: Sequence[Any], org_types: Sequence[str]) -> str:
    """The org's type from a raw ``ORG_COLUMNS`` tuple, else CorruptRecord."""
    org_type, created, stored = raw
    if checksum("orgs", (org_id, org_type, created)) != stored or org_type not in org_types:
        raise corrupt_org(org_id)
    return org_type


def release_from_db(raw: Sequence[Any]) -> tuple[str, tuple[str, str]]:
    """``(release, (ceremony id, bundle SHA-256))`` from a raw ``RELEASE_COLUMNS`` tuple, else
    CorruptRecord."""
    release, ceremony_id, sha, recorded, stored = raw
    if checksum("releases", (release, ceremony_id, sha, recorded)) != stored:
        raise corrupt_release(release)
    return release, (ceremony_id, sha)


# ----------------------------------------------------------------------------- a whole org
@dataclass(frozen=True)
class OrgRows:
    """Everything the store holds for one org, as read in one transaction or between two
    identical reads of its generation: what :mod:`kms.node.sealing` compares with the org's sealed
    state. ``customer_keys`` maps kind -> (spec JSON text, created_at); ``uploads`` maps a BYOK
    ciphertext's SHA-256 -> uploaded_at."""

    org_id: str
    org_type: str
    created_at: float
    generation: int | None
    sealed_state: str | None
    seal: bytes | None = field(repr=False)
    secrets: tuple[SecretRow, ...]
    customer_keys: dict[str, tuple[str, float]]
    uploads: dict[str, float]


@dataclass(frozen=True)
class Resealed:
    """What a sealer returns for the org's next state: its generation, the sealed state and its
    seal, and every surviving version's blob wrapped under the new generation's KEK."""

    generation: int
    sealed_state: str
    seal: bytes = field(repr=False)
    wrapped: dict[tuple[str, int], bytes] = field(repr=False)
