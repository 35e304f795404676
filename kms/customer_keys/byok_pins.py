"""The customer's pins of their orgs' BYOK keys: trust on first use, then only that key.

A regional user-PIN holder can make ``byok-issuer-REGION`` sign a certificate with any org's
subject for a key of their own: the issuer's signature says "made on this node", not "this is
the org's key". So ``kms byok wrap`` checks the key itself: the first certificate it wraps to
for an org (and purpose) pins the SHA-256 of the certificate's SubjectPublicKeyInfo - the value
``kms byok certificate`` prints, read from the token - and any later certificate for that org
and purpose must carry the same key, unless the customer names the new key's fingerprint
exactly (``--accept-new-key``) after comparing it out of band.

The pins live in a per-user file, never in the KMS store (whoever writes the store is one of
the people the pin protects against): ``--pin-file``, else ``$HSM_SUITE_BYOK_PINS``, else
``$XDG_CONFIG_HOME/hsm-suite/byok-pins.json`` (``~/.config/...`` without XDG_CONFIG_HOME). It is
read, checked and rewritten under an exclusive lock (two wraps at once lose no pin), replaced
atomically, mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kms.errors import KmsError

ENV = "HSM_SUITE_BYOK_PINS"
FORMAT = "hsm-suite-byok-pins"
_SUBJECT = re.compile(r"BYOK (seed|dek) key of org (\S+)$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PinMismatch(KmsError):
    """The certificate carries another key than the one pinned for its org."""


def default_path() -> Path:
    """Where the pins are: $HSM_SUITE_BYOK_PINS, else the user's XDG configuration."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hsm-suite" / "byok-pins.json"


def subject_org(common_name: str) -> tuple[str, str] | None:
    """(purpose, org) from a BYOK certificate's common name, or None."""
    m = _SUBJECT.search(common_name)
    return (m.group(1), m.group(2)) if m else None


def parse_fingerprint(text: str) -> str:
    """An exact SHA-256 fingerprint: 64 hex digits (colons and spaces allowed), lower-cased."""
    cleaned = re.sub(r"[\s:]", "", text).lower()
    if not _HEX64.fullmatch(cleaned):
        raise KmsError(f"--accept-new-key {text!r} is not a SHA-256 fingerprint (64 hex digits)",
                       hint="give the exact fingerprint `kms byok certificate` printed")
    return cleaned


@dataclass(frozen=True)
class PinResult:
    status: str                  # "pinned" (first use), "matched", "replaced"
    org: str
    purpose: str
    fingerprint: str
    path: Path
    previous: str | None = None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict]:
    """The pin table, read under an exclusive lock held until the block ends; what the block
    leaves in it is written back atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _read(path)
        before = json.dumps(table, sort_keys=True)
        yield table
        if json.dumps(table, sort_keys=True) != before:
            _write(path, table)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": FORMAT, "version": 1, "pins": {}}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KmsError(f"cannot read the BYOK pin file {path}: {exc}",
                       hint=f"fix or move it (it is yours; --pin-file or ${ENV} names another)"
                       ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not isinstance(data.get("pins"), dict):
        raise KmsError(f"{path} is not a BYOK pin file", hint=f"--pin-file or ${ENV} names "
                       "the pin file; move this one away if it is something else")
    return data


def _write(path: Path, table: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)          # mkstemp made it 0600
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def checked(path: Path, org: str, purpose: str, fingerprint: str, *,
            accept: str | None = None) -> Iterator[PinResult]:
    """Check ``fingerprint`` (hex SHA-256 of the certificate's SPKI) against the pin for
    ``org``/``purpose``, refuse a different key unless ``accept`` names it exactly, and record
    the pin when the block (the wrap) completes without an error."""
    wanted = parse_fingerprint(accept) if accept is not None else None
    if wanted is not None and wanted != fingerprint:
        raise PinMismatch(f"--accept-new-key {wanted} is not the key of this certificate "
                          f"({fingerprint}); nothing was written",
                          hint="accept only the fingerprint the KMS operator read to you")
    with _locked(path) as table:
        entry = table["pins"].get(org, {}).get(purpose)
        previous = entry["spki_sha256"] if entry else None
        if previous is None:
            status = "pinned"
        elif previous == fingerprint:
            status = "matched"
        elif wanted == fingerprint:
            status = "replaced"
        else:
            raise PinMismatch(
                f"the BYOK {purpose} certificate for org {org} carries key {fingerprint}, not "
                f"the key pinned for that org on {entry['pinned']} ({previous}) in {path}; "
                "nothing was written",
                hint="if the KMS operator confirms the new key out of band, run again with "
                     f"--accept-new-key {fingerprint}")
        yield PinResult(status, org, purpose, fingerprint, path, previous)
        if status != "matched":
            table["pins"].setdefault(org, {})[purpose] = {
                "spki_sha256": fingerprint,
                "pinned": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
