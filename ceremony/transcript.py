"""The ceremony transcript: an append-only, hash-chained JSON-lines journal.

Every record carries the hash of the one before it, so deleting, reordering or editing a record
breaks the chain. Each append is fsynced before the step it records is considered done: the
transcript doubles as the journal a resumed run reconciles against. At close, the primary signing
key signs the head hash; :mod:`ceremony.verify` checks all of it offline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from release.canonical import canonical

from .errors import ResumeError, VerificationError

FILE = "transcript.jsonl"
SIGNATURE_FILE = "transcript.sig.json"
HEAD_CONTEXT = b"hsm-suite transcript head v1\x00"
GENESIS = "0" * 64


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Transcript:
    def __init__(self, directory: Path):
        self.path = Path(directory) / FILE
        self.records: list[dict] = []
        if self.path.exists():
            self.records = load(self.path, repair=True)

    @property
    def head(self) -> str:
        return self.records[-1]["hash"] if self.records else GENESIS

    def steps_done(self) -> set[str]:
        return {r["step"] for r in self.records}

    def find(self, step: str) -> dict | None:
        for r in reversed(self.records):
            if r["step"] == step:
                return r
        return None

    def data(self, step: str) -> dict:
        """The data of the step's latest record; the step must have been journaled."""
        record = self.find(step)
        if record is None:
            raise ResumeError(f"{self.path}: the journal has no {step!r} record",
                              hint="the transcript is incomplete; restore the output directory "
                                   "from its copy before resuming")
        return record["data"]

    def append(self, step: str, data: dict, officer: str | None = None) -> dict:
        record = {
            "seq": len(self.records),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "step": step,
            "officer": officer,
            "data": data,
            "prev": self.head,
        }
        record["hash"] = record_hash(record)
        line = canonical(record) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        return record


def load(path: Path, *, repair: bool = False) -> list[dict]:
    """Read and check the chain. With ``repair``, a torn last line (a crash mid-append) is cut
    off; anywhere else a bad line is tampering and fails."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if repair and i == len(lines) - 1 and not raw.endswith(b"\n"):
                good = b"\n".join(lines[:-1]) + (b"\n" if i else b"")
                with open(path, "r+b") as fh:
                    fh.truncate(len(good))
                    os.fsync(fh.fileno())
                break
            raise VerificationError(f"{path}: line {i + 1} is not a JSON record") from None
        records.append(rec)
    check_chain(records, str(path))
    return records


def check_chain(records: list[dict], where: str) -> None:
    prev = GENESIS
    for i, rec in enumerate(records):
        expected_keys = {"seq", "time", "step", "officer", "data", "prev", "hash"}
        if set(rec) != expected_keys:
            raise VerificationError(f"{where}: record {i} has fields {sorted(rec)}")
        if rec["seq"] != i:
            raise VerificationError(f"{where}: record {i} has sequence number {rec['seq']}")
        if rec["prev"] != prev:
            raise VerificationError(f"{where}: record {i} does not follow record {i - 1} "
                                    "(hash chain broken)")
        if record_hash(rec) != rec["hash"]:
            raise VerificationError(f"{where}: record {i} ({rec.get('step')}) was altered "
                                    "(its hash does not match)")
        prev = rec["hash"]


def head_message(head: str) -> bytes:
    return HEAD_CONTEXT + bytes.fromhex(head)
