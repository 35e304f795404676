"""The audit log's on-disk format and its offline verification (no token, no configuration).

A worker writes *segments*: ``audit-w<N>.jsonl`` then ``audit-w<N>.<k>.jsonl`` (k = 1, 2...),
one JSON object per line. Every record carries ``seq`` (from 1 in a segment), ``prev`` (the
previous record's ``hash``, 64 zeros for the first) and ``hash`` = SHA-256 of its canonical
JSON without ``hash``: sorted keys, no spaces; in ``format`` 3 (this version) UTF-8 as orjson
writes it (:func:`canonical`), in ``format`` 2 and legacy segments ASCII with ``\\u`` escapes as
Python's ``json`` writes it (:func:`canonical_v2`). Both are one deterministic encoding of the
parsed record, so the verifier recomputes every hash from the line it reads.

A signed segment (``format`` 2 or 3) starts with a ``segment.start`` record naming the key that
signs it (``key``: SHA-256 of its SubjectPublicKeyInfo, ``spki``: the DER in hex) and why the
segment began (``detail``: a new worker, the previous segment's state or damage). Every batch of
records the writer makes durable ends with an ``audit.checkpoint`` record whose ``sig`` is an
ECDSA P-256 signature, made in the region's HSM, over :func:`checkpoint_message` (its own
``seq`` and ``prev``: the hash that chains every record before it). A file writer who edits,
removes or inserts a line and recomputes every ``seq``/``prev``/``hash`` still cannot make the
next checkpoint's signature verify; one who re-signs with a key of their own is caught by the
pinned fingerprint (``kms audit verify --key``).

A segment written by the version before signing (no ``segment.start``) is a *legacy* segment:
its chain is checked, and it is reported as unsigned (an edit with recomputed hashes would not
show). Format 2 segments (the version before this one: the same records, the ``json`` encoding)
verify exactly as they did; the node never appends to them, it starts a format-3 segment.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

FORMAT = 3
GENESIS = "0" * 64
SEGMENT_OP = "segment.start"
CHECKPOINT_OP = "audit.checkpoint"
_CHECKPOINT_DOMAIN = b"hsm-suite audit checkpoint v1\n"
_SEGMENT_NAME = re.compile(r"^audit-w(\d+)(?:\.(\d+))?\.jsonl$")


def canonical(record: dict) -> bytes:
    """Format 3: sorted keys, no spaces, UTF-8 (orjson: a fifth of ``json``'s cost per record,
    measured; the writer's hot path). Raises TypeError for what orjson cannot encode (a lone
    surrogate, an integer over 64 bits): the writer never passes one (:func:`writable`)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def canonical_v2(record: dict) -> bytes:
    """Format 2 and legacy segments: Python's ``json``, sorted keys, no spaces, ASCII."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


_CANONICAL = {2: canonical_v2, 3: canonical}
LEGACY = 2      # the canonical form of a legacy segment (no segment.start) is format 2's


def digest(record: dict, fmt: int = FORMAT) -> str:
    """SHA-256 (hex) of ``record`` without ``hash`` in the canonical form of format ``fmt``."""
    return hashlib.sha256(_CANONICAL[fmt]({k: v for k, v in record.items() if k != "hash"})
                          ).hexdigest()


def writable(record: dict) -> dict:
    """``record`` with every value orjson cannot encode replaced by an object that says what it
    was: a string with a lone surrogate (no text) as ``{"utf16le_hex": ...}``, an integer
    beyond 64 bits as ``{"int": "..."}``. The writer must never fail on a record's content
    (it would keep the log unavailable), and the replacement is an object, so no string a
    client sends can be recorded as the same line (escape text could be)."""
    return {k: _writable(v) for k, v in record.items()}


def _writable(value):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return {"utf16le_hex": value.encode("utf-16-le", "surrogatepass").hex()}
    elif isinstance(value, int) and not isinstance(value, bool) \
            and not -(1 << 63) <= value < (1 << 64):
        return {"int": str(value)}
    return value


def segment_format(first: dict) -> int | None:
    """The canonical form of the segment whose first record is ``first``: its ``format`` for a
    ``segment.start`` of a known format, :data:`LEGACY` without one, None for an unknown one."""
    if first.get("op") != SEGMENT_OP:
        return LEGACY
    fmt = first.get("format")
    return fmt if fmt in _CANONICAL and not isinstance(fmt, bool) else None


def checkpoint_message(seq: int, prev: str) -> bytes:
    """What a checkpoint signs: a domain tag, its position and the chain head before it."""
    return _CHECKPOINT_DOMAIN + f"{seq}\n{prev}".encode()


def segment_name(worker: int, k: int) -> str:
    return f"audit-w{worker}.jsonl" if k == 0 else f"audit-w{worker}.{k}.jsonl"


def segment_order(path: Path) -> tuple[int, int] | None:
    """(worker, k) of a segment file name, None for other files."""
    m = _SEGMENT_NAME.match(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def fingerprint_of(spki_der: bytes) -> str:
    return hashlib.sha256(spki_der).hexdigest()


@dataclass
class Verdict:
    """What :func:`verify` found in one segment file."""

    path: Path
    records: int = 0
    signed: bool = False          # a format-2 segment (else legacy, unsigned)
    checkpoints: int = 0
    key: str | None = None        # the segment's key fingerprint (hex)
    broken_at: int | None = None  # line number of the first break
    why: str | None = None
    partial_tail: int = 0         # bytes of an unfinished last line (not a record)
    keyless: bool = False         # a format-2 segment written without an audit key

    @property
    def intact(self) -> bool:
        return self.why is None

    def line(self, pinned: str | None) -> str:
        if self.why is not None:
            return f"{self.path}: chain broken at {self.why}"
        tail = (f"; {self.partial_tail} bytes of an unfinished last write after it (not a "
                "record; the node truncates them at its next start)") if self.partial_tail else ""
        if self.keyless:
            return (f"{self.path}: {self.records} records, chain intact (unsigned: written "
                    f"without an audit key){tail}")
        if not self.signed:
            return (f"{self.path}: {self.records} records, chain intact (legacy segment: "
                    f"unsigned, an edit with recomputed hashes would not show){tail}")
        pin = "pinned" if pinned else "NOT pinned: give --key FINGERPRINT to check it is the " \
                                      "region's audit key"
        return (f"{self.path}: {self.records} records, chain intact, {self.checkpoints} "
                f"checkpoints signed by key {self.key} ({pin}){tail}")


def public_key(spki_der: bytes):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    key = load_der_public_key(spki_der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an EC public key")
    return key


def signature_holds(key, message: bytes, sig_hex) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    try:
        key.verify(bytes.fromhex(sig_hex), message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def verify(path: Path, *, key: str | None = None) -> Verdict:
    """Check one segment offline: the chain, every checkpoint's signature against the key the
    segment names, that key against ``key`` (a pinned SHA-256 fingerprint, hex) when given, and
    that no record follows the last checkpoint."""
    v = Verdict(Path(path))
    prev, seq, public, last_checkpoint, fmt = GENESIS, 0, None, 0, LEGACY
    canonical_lines = False
    with open(path, "rb") as f:
        data = f.read()
    body, _, partial = data.rpartition(b"\n")   # partial: an unfinished last line, if any
    v.partial_tail = len(partial)

    def broken(n: int, why: str) -> Verdict:
        v.broken_at, v.why = n, f"line {n}: {why}"
        return v
    lines = body.split(b"\n") if body else []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return broken(n, f"not a JSON record ({exc})")
        if n == 1:
            canonical_lines = rec.get("op") == SEGMENT_OP
            known = segment_format(rec)
            if known is None:
                return broken(1, f"written in audit format {rec.get('format')!r}, which this "
                                 "version does not know")
            fmt = known
        if n == 1 and rec.get("op") == SEGMENT_OP and rec.get("key") is None:
            v.keyless = True     # written without an audit key: the chain alone
            why = _previous_changed(Path(path).parent, rec.get("previous"))
            if why:
                return broken(1, why)
        elif n == 1 and rec.get("op") == SEGMENT_OP:
            v.signed = True
            try:
                spki = bytes.fromhex(rec["spki"])
                public = public_key(spki)
            except (KeyError, ValueError, TypeError) as exc:
                return broken(1, f"the segment's key is not an EC public key ({exc})")
            v.key = fingerprint_of(spki)
            if rec.get("key") != v.key:
                return broken(1, "the segment's key fingerprint does not match its key")
            if key is not None and v.key != key.lower():
                return broken(1, f"the segment is signed by key {v.key}, not the pinned key "
                                 f"{key.lower()}")
            why = _previous_changed(Path(path).parent, rec.get("previous"))
            if why:
                return broken(1, why)
        if rec.get("prev") != prev:
            return broken(n, f"prev does not match the hash of line {n - 1}")
        if rec.get("seq") != seq + 1:
            return broken(n, f"seq {rec.get('seq')} where {seq + 1} was expected")
        try:
            intact = rec.get("hash") == digest(rec, fmt)
        except (TypeError, ValueError, OverflowError):   # no canonical form (orjson refuses it)
            intact = False
        if not intact:
            return broken(n, "its hash does not match its content")
        # The hash covers the record as parsed, so the bytes must be the one canonical
        # encoding of it too: otherwise a file writer could respell a line (JSON escapes, a
        # repeated key that another reader takes the first of) that grep and other tools read
        # differently, and it would still verify. The node writes every line canonically;
        # legacy segments (before segment.start) are unsigned and not held to it.
        if canonical_lines and line != _CANONICAL[fmt](rec):
            return broken(n, "it is not written in its canonical form (escapes, spacing or a "
                             "repeated key): the node never writes such a line")
        if v.signed and rec.get("op") == CHECKPOINT_OP:
            if not signature_holds(public, checkpoint_message(rec["seq"], rec["prev"]),
                                    rec.get("sig")):
                return broken(n, f"the checkpoint's signature does not verify with the "
                                 f"segment's key {v.key}: a line before it was changed, "
                                 "removed or inserted")
            v.checkpoints += 1
            last_checkpoint = n
        prev, seq = rec["hash"], rec["seq"]
    v.records = seq
    if v.signed and last_checkpoint < len(lines):
        return broken(last_checkpoint + 1,
                      f"{len(lines) - last_checkpoint} record(s) after the last checkpoint are "
                      "not signed (never acknowledged by the node, or added by someone else)")
    return v


def _previous_changed(directory: Path, link) -> str | None:
    """The segment before this one is never written again once this one began: its size (and
    last hash) must still be what this segment's first record says. A truncated, extended,
    rewritten or deleted earlier segment is reported here."""
    if not isinstance(link, dict) or not isinstance(link.get("file"), str):
        return None
    name = Path(link["file"]).name
    prev = directory / name
    if not prev.exists():
        return f"the previous segment {name} it names is missing"
    size = prev.stat().st_size
    if size != link.get("size"):
        return (f"the previous segment {name} is {size} bytes, not the {link.get('size')} "
                "recorded when this segment began (truncated or rewritten since)")
    if link.get("last_hash"):
        with open(prev, "rb") as f:
            f.seek(max(0, size - 65536))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            same = json.loads(last).get("hash") == link["last_hash"]
        except (ValueError, AttributeError):
            same = False
        if not same:
            return (f"the previous segment {name} no longer ends with the record this segment "
                    "follows (rewritten since)")
    return None


def segments(paths: list[Path]) -> list[Path]:
    """The files to verify: each path as given, or a directory's segments in writing order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [(segment_order(f), f) for f in p.iterdir() if segment_order(f)]
            out += [f for _, f in sorted(found, key=lambda t: t[0] or (0, 0))]
        else:
            out.append(p)
    return out
