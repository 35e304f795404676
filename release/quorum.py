"""The officers' quorum a reader of bundles requires: M of a pinned set of officer keys.

A region (and ``ceremony verify``) pins its officers in its own configuration, as SHA-256
fingerprints of their keys' SubjectPublicKeyInfo (hex or PGP words) or as PEM public keys, in
sets that apply from a release on::

    [[officers]]
    from_release = "1"
    m = 2
    keys = { alice = "8C1F 0A...", bob = "...", carol = "..." }

A release is checked against the set with the highest ``from_release`` at or below it, so
retiring an officer (a new set from release N) leaves older releases verifiable under the set
that signed them. Nothing about who counts comes from the bundle: its certificates only carry
keys to ``openssl``, and a key counts only if its fingerprint is pinned.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from suite import fingerprint as fp
from suite import tomlfile

from release.bundle import Verified
from release.errors import PinsError, QuorumError
from release.ids import RELEASE_ID, release_key

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
GUIDE = "docs/ceremony-quorum.md"
HOW_TO_PIN = (f"add [[officers]] sets (from_release, m, keys = {{ NAME = \"SHA-256 of the "
              f"officer key\" }}) to the configuration; `ceremony keygen` prints each officer's "
              f"fingerprint (see {GUIDE})")
MIGRATE = (f"each officer adds their signature with `ceremony countersign CEREMONY_DIR "
           f"--officer NAME --key KEY|--token URI` (see {GUIDE}, Migration)")


@dataclass(frozen=True)
class OfficerSet:
    from_release: str
    m: int
    keys: dict[bytes, str]   # SHA-256(SPKI) -> officer name


@dataclass(frozen=True)
class Pins:
    sets: tuple[OfficerSet, ...]   # ascending from_release
    source: str = "configuration"

    def for_release(self, release: str, where: str) -> OfficerSet:
        applying = [s for s in self.sets
                    if release_key(s.from_release) <= release_key(release)]
        if not applying:
            raise QuorumError(f"{where}: no pinned officer set applies to release {release} "
                              f"(the {self.source} pins sets from release "
                              + ", ".join(s.from_release for s in self.sets) + " on)",
                              hint=HOW_TO_PIN)
        return applying[-1]


def parse(entries: object, where: str) -> Pins:
    """The ``[[officers]]`` array of a TOML configuration; raises :class:`PinsError`."""
    if not isinstance(entries, list) or not entries:
        raise PinsError(f"{where}: no officers pinned", hint=HOW_TO_PIN)
    sets = []
    for i, entry in enumerate(entries):
        at = f"{where}: officers[{i}]"
        if not isinstance(entry, dict):
            raise PinsError(f"{at} must be a table")
        tomlfile.check_keys(entry, {"from_release": str, "m": int, "keys": dict}, where=at,
                            error=PinsError, required=("from_release", "m", "keys"))
        start, m, named = entry["from_release"], entry["m"], entry["keys"]
        if not RELEASE_ID.fullmatch(start):
            raise PinsError(f"{at}.from_release: a release id is dotted numbers, e.g. '7'")
        keys: dict[bytes, str] = {}
        for name, value in named.items():
            if not _NAME.fullmatch(name) or not isinstance(value, str):
                raise PinsError(f"{at}.keys.{name}: officer names are letters, digits, '.', "
                                "'_' and '-', each with a fingerprint string")
            digest = _fingerprint(value, f"{at}.keys.{name}")
            if digest in keys:
                raise PinsError(f"{at}.keys.{name}: the same key as {keys[digest]!r}; one "
                                "key holder never counts twice")
            keys[digest] = name
        if not 1 <= m <= len(keys):
            raise PinsError(f"{at}.m must be between 1 and the number of keys ({len(keys)})")
        sets.append(OfficerSet(start, m, keys))
    sets.sort(key=lambda s: release_key(s.from_release))
    starts = [s.from_release for s in sets]
    if len({release_key(s) for s in starts}) != len(starts):
        raise PinsError(f"{where}: two officer sets start at the same release")
    return Pins(tuple(sets), source=where)


def load(path: Path) -> Pins:
    """The ``[[officers]]`` sets of a TOML file (a node configuration or a pins file)."""
    data, _, _ = tomlfile.read(Path(path), what="officer pins", error=PinsError)
    return parse(data.get("officers"), str(path))


def _fingerprint(value: str, where: str) -> bytes:
    if "-----BEGIN" in value:
        from cryptography.hazmat.primitives.serialization import (Encoding, PublicFormat,
                                                                  load_pem_public_key)
        try:
            key = load_pem_public_key(value.encode())
        except ValueError:
            raise PinsError(f"{where}: not a PEM public key") from None
        return hashlib.sha256(key.public_bytes(Encoding.DER,
                                               PublicFormat.SubjectPublicKeyInfo)).digest()
    try:
        return fp.parse_fingerprint(value)
    except ValueError as exc:
        raise PinsError(f"{where}: not a SHA-256 fingerprint ({exc})") from None


def check(verified: Verified, pins: Pins, where: str) -> list[str]:
    """The officers whose valid signatures meet the pinned quorum for the bundle's release;
    otherwise :class:`QuorumError` naming how many of how many, who signed, what failed."""
    release = verified.manifest["release"]
    officer_set = pins.for_release(release, where)
    if not verified.officers:
        raise QuorumError(f"{where}: no officer signatures (0 of the {officer_set.m} the "
                          f"pinned set for release {release} needs): a bundle of the format "
                          "before the officers' quorum, or one nobody countersigned",
                          hint=MIGRATE)
    valid: list[str] = []
    problems: list[str] = []
    for sig in verified.officers:
        name = officer_set.keys.get(sig.spki_sha256)
        if name is None:
            problems.append(f"officer key {fp.to_hex(sig.spki_sha256[:8])}... is not pinned "
                            f"for release {release}")
        elif sig.problem:
            problems.append(f"{name}'s signature {sig.problem}")
        elif name not in valid:
            valid.append(name)
    if len(valid) < officer_set.m:
        raise QuorumError(
            f"{where}: {len(valid)} valid officer signature(s) of the {officer_set.m} the "
            f"pinned set for release {release} needs ({', '.join(valid) or 'none'})"
            + (": " + "; ".join(problems) if problems else ""),
            hint="officers countersign with `ceremony countersign`; only keys pinned in the "
                 f"{pins.source} count (see {GUIDE})")
    return valid
