"""The audit log: one JSON object per line, hash-chained, fsynced in batches, no key material.

Each record carries ``seq`` (from 1 in a file), ``prev`` (the previous record's ``hash``, 64
zeros for the first) and ``hash`` = SHA-256 of the record's canonical JSON *without* ``hash``
(sorted keys, no spaces). Changing, removing, reordering or inserting a line breaks the chain at
that line; ``verify(path)`` finds the first break offline. Truncating the tail is only visible
against a head hash kept elsewhere (the last ``hash`` is what to record).

Callers pass fields by name, and only names in ``FIELDS`` are accepted: there is no field a DEK,
secret or PIN could go into by accident. ``append`` is cheap (an in-memory line under a lock); a
writer thread writes and fsyncs whatever accumulated every ``batch_ms`` (and at ``close``), so a
burst of requests costs one fsync. One file per worker process (``audit-w<N>.jsonl``): a chain
has one writer, and a restarted worker continues its file's chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

FIELDS = ("client", "op", "org", "key_type", "version", "result", "status", "request_id",
          "worker", "detail")
GENESIS = "0" * 64


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(record: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


class AuditLog:
    def __init__(self, path: Path, *, batch_ms: int = 50):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = _tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._wake = threading.Event()
        self._closed = False
        self._interval = batch_ms / 1000.0
        self.fsyncs = 0
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    def append(self, **fields) -> str:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"audit: unknown field(s) {sorted(unknown)}")
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            self._seq += 1
            record = {"seq": self._seq, "ts": round(time.time(), 6), "prev": self._prev,
                      **{k: v for k, v in fields.items() if v is not None}}
            record["hash"] = self._prev = _digest(record)
            self._pending.append(_canonical(record) + b"\n")
        return record["hash"]

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            if lines:
                os.write(self._fd, b"".join(lines))
                os.fsync(self._fd)
                self.fsyncs += 1

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            try:
                self.flush()
            except OSError:
                pass  # retried next round; close() raises if it still fails

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._writer.join(timeout=5)
        self.flush()
        os.close(self._fd)


def _tail(path: Path) -> tuple[int, str]:
    """(last seq, last hash) of an existing chain, so a restarted writer continues it."""
    if not path.exists() or path.stat().st_size == 0:
        return 0, GENESIS
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        rec = json.loads(last)
        return int(rec["seq"]), str(rec["hash"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"audit log {path}: its last line is not a chained record; "
                         "run `kms audit verify` on it and move it aside") from None


def verify(path: Path) -> tuple[int, str | None]:
    """(records checked, None) if the chain holds, else (line number of the first break, why)."""
    prev, seq = GENESIS, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                return n, f"line {n}: not a JSON record ({exc})"
            if rec.get("prev") != prev:
                return n, f"line {n}: prev does not match the hash of line {n - 1}"
            if rec.get("seq") != seq + 1:
                return n, f"line {n}: seq {rec.get('seq')} where {seq + 1} was expected"
            if rec.get("hash") != _digest(rec):
                return n, f"line {n}: its hash does not match its content"
            prev, seq = rec["hash"], rec["seq"]
    return seq, None
