"""The audit log's writer: group commit, one HSM-signed checkpoint per batch, no key material.

Format and offline verification are in :mod:`kms.server.auditchain`. Here:

- **Fields by name.** Callers pass only names in ``FIELDS``: there is no field a DEK, secret or
  PIN could go into by accident.
- **Durable before the answer.** ``append`` queues a record and returns the future of the batch
  it joins; one writer thread takes everything queued, chains it, signs one checkpoint in the
  HSM, writes it with one ``write`` and one ``fsync``, then resolves the future. While it
  writes, the next batch gathers (group commit: no timer, a burst costs one fsync).
  ``await commit(...)`` is what the DEK and admin routes use: the answer goes out only once its
  record is on disk under a signed checkpoint.
- **Unwritable log.** A write or fsync that fails (disk full, file-size limit, I/O error), or a
  checkpoint the token cannot sign, truncates the file back to its last good length, keeps the
  batch queued and marks the log unavailable: ``commit`` then raises :class:`AuditUnavailable`
  at once (the routes answer 503 ``audit_unavailable``), one log line says so, and the writer
  retries every ``retry_ms``. The first write that succeeds starts with an ``audit.outage``
  record (when, why, how many requests were refused, how many refusal records were dropped)
  followed by the queued records, so nothing acknowledged is lost and the gap is on record.
- **Damage never stops a start.** :func:`_open` truncates an unfinished last line of the
  current segment (it was never acknowledged) and continues its chain if the segment ends with a
  checkpoint of the same key; anything else (a legacy segment of the previous version, a
  garbage or foreign last line, another key) leaves that file as found and starts a new segment
  whose ``segment.start`` record says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from .auditchain import (CHECKPOINT_OP, FORMAT, GENESIS, SEGMENT_OP, canonical,
                         checkpoint_message, digest, public_key, segment_name, segment_order,
                         signature_holds)

log = logging.getLogger("kms.server")

FIELDS = ("client", "op", "org", "key_type", "version", "result", "status", "request_id",
          "worker", "detail")
_TAIL_BYTES = 1 << 16


class AuditUnavailable(Exception):
    """The audit log cannot be written now: nothing that needs a record may be answered."""


class TokenSigner:
    """Signs checkpoints with the region's audit key (``<token>-audit``, made if absent)."""

    def __init__(self, token):
        from hsm import provision
        outcome, spki = provision.init_audit_key(token)
        self.token, self.label, self.status = token, outcome.label, outcome.status
        self.spki = spki.dump()
        self.fingerprint = outcome.fingerprint.hex()

    def sign(self, message: bytes) -> bytes:
        from hsm import ops
        return ops.sign(self.token, ops.private(self.label), "ecdsa-sha256", message)


class AuditLog:
    def __init__(self, directory: Path, worker: int, signer=None, *, retry_ms: int = 50,
                 max_pending: int = 100_000):
        """``signer`` (a :class:`TokenSigner`) signs a checkpoint per batch; without one the
        segments are chained but unsigned (the XKS proxy's log, whose token may be any)."""
        self.dir, self.worker, self.signer = Path(directory), worker, signer
        self.dir.mkdir(parents=True, exist_ok=True)
        self._retry = retry_ms / 1000.0
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._outage: dict | None = None
        self._closed = False
        self._close_failures = 0
        self._dirty = False   # bytes past self._size may be on disk (a failed write)
        self.available = True
        self.batches = self.records = self.write_failures = self.refused = self.dropped = 0
        self.path, self._fd, self._seq, self._prev, self._size, first = _open(
            self.dir, worker, signer)
        self._pending.extend(first)
        self._idle = False      # the writer waits for records (under self._cond)
        self._waiters: dict = {}   # (batch future, loop) -> its asyncio future (commit)
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    # ----------------------------------------------------------------------- callers
    def append(self, **fields) -> concurrent.futures.Future:
        """Queue a record; the future resolves once it is durable (or fails if it is not)."""
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"audit: unknown field(s) {sorted(unknown)}")
        record = {"ts": round(time.time(), 6), **{k: v for k, v in fields.items()
                                                   if v is not None}}
        with self._cond:
            if self._closed:
                raise ValueError("audit log is closed")
            if len(self._pending) >= self._max_pending:   # only while the log is unwritable
                self.dropped += 1
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(AuditUnavailable("audit queue full"))
                return failed
            self._pending.append(record)
            if self._idle:     # only a writer asleep needs waking (notify costs ~µs each)
                self._cond.notify()
            return self._done

    async def commit(self, **fields) -> None:
        """Append and wait until the record is durable; :class:`AuditUnavailable` if the log
        cannot be written (checked first, so nothing is queued for a request refused).

        Every request of a batch waits on one asyncio future per event loop (made from the
        batch's future the first time), so a batch of N costs one wake-up of the loop, not N;
        ``shield`` keeps a request's timeout from cancelling the batch's future for the others.
        """
        if not self.available:
            self.refuse()
        done = self.append(**fields)
        loop = asyncio.get_running_loop()
        key = (done, loop)
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = self._waiters[key] = asyncio.wrap_future(done, loop=loop)
            waiter.add_done_callback(functools.partial(self._forget, key))
        await asyncio.shield(waiter)

    def _forget(self, key, _future) -> None:
        self._waiters.pop(key, None)

    def refuse(self):
        """Count a request refused because the log is unwritable, and raise."""
        with self._cond:
            self.refused += 1
            if self._outage is not None:
                self._outage["refused"] += 1
        raise AuditUnavailable("the audit log cannot be written")

    def flush(self, timeout: float = 10) -> None:
        """Wait until everything appended so far is durable (tests, shutdown)."""
        with self._cond:
            done = self._done if self._pending else None
        if done is not None:
            done.result(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._writer.join(timeout=10)
        if self._pending or self._outage is not None:
            log.error("worker %d: audit log %s still cannot be written at shutdown: %d "
                      "record(s) lost", self.worker, self.path, len(self._pending))
        os.close(self._fd)

    # ----------------------------------------------------------------------- writer
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and self._outage is None and not self._closed:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if not self._pending and (self._outage is None or self._closed):
                    return
                batch, self._pending = self._pending, []
                done, self._done = self._done, concurrent.futures.Future()
            if self._write(batch, done):
                continue
            if self._closed:       # at close a failing log gets three tries; close() says so
                self._close_failures += 1
                if self._close_failures >= 3:
                    return
            time.sleep(self._retry)

    def _write(self, batch: list[dict], done: concurrent.futures.Future) -> bool:
        records = list(batch)
        if self._outage is not None:
            records.insert(0, _outage_record(self._outage, self.worker))
        seq, prev, lines = self._seq, self._prev, []
        for rec in records:
            seq += 1
            prev, line = chained_line({**rec, "seq": seq, "prev": prev})
            lines.append(line)
        try:
            if self.signer is not None:
                seq += 1
                cp = {"seq": seq, "ts": round(time.time(), 6), "prev": prev,
                      "op": CHECKPOINT_OP, "worker": self.worker,
                      "sig": self.signer.sign(checkpoint_message(seq, prev)).hex()}
                cp["hash"] = prev = digest(cp)
                lines.append(canonical(cp) + b"\n")
            if self._dirty:                      # a failed write left bytes: cut them first
                os.ftruncate(self._fd, self._size)
                self._dirty = False
            self._dirty = True
            _write_all(self._fd, b"".join(lines))
            os.fsync(self._fd)
            self._dirty = False
        except Exception as exc:   # OSError (ENOSPC, EFBIG, EIO) or the token (HsmError)
            self._failed(batch, done, exc)
            return False
        self._size += sum(map(len, lines))
        self._seq, self._prev = seq, prev
        self.batches += 1
        self.records += len(records)
        if self._outage is not None:
            log.warning("worker %d: audit log %s writable again after %.1f s; serving key "
                        "material", self.worker, self.path, time.time() - self._outage["since"])
            with self._cond:
                self._outage = None
                self.available = True
        done.set_result(None)
        return True

    def _failed(self, batch, done, exc: BaseException) -> None:
        try:
            if self._dirty:
                os.ftruncate(self._fd, self._size)
                self._dirty = False
        except OSError:
            pass          # retried before the next write
        why = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
        for rec in batch:       # a waiting request was answered 503: say so when written
            rec["late"] = True
        with self._cond:
            self._pending[:0] = batch      # kept, in order, for the next try
            self.write_failures += 1
            first = self._outage is None
            if first:
                self._outage = {"since": time.time(), "error": why, "refused": 0}
                self.available = False
        if first:
            log.error("worker %d: audit log %s cannot be written (%s): refusing key material "
                      "(503 audit_unavailable) until it can", self.worker, self.path, why)
        done.set_exception(AuditUnavailable(why))


def _outage_record(outage: dict, worker: int) -> dict:
    return {"ts": round(time.time(), 6), "op": "audit.outage", "worker": worker,
            "result": "recovered",
            "detail": f"audit log unwritable from {outage['since']:.3f} ({outage['error']}); "
                      f"{outage['refused']} request(s) refused meanwhile with 503 "
                      "audit_unavailable; records marked late were queued during the outage (a "
                      "request that waited for one was answered 503)"}


def chained_line(record: dict) -> tuple[str, bytes]:
    """(hash, line) of a record without ``hash``: the line is ``canonical`` of the record with
    its hash, made with one encoding of the record instead of two. Sorted keys put ``hash``
    between the keys before it and those after it, so the line is the canonical JSON of the
    keys before it, ``"hash":...``, then that of the keys after it; the hash is SHA-256 of the
    two halves joined (``canonical`` of the record without ``hash``, as ``digest`` computes)."""
    before = canonical({k: v for k, v in record.items() if k < "hash"})
    after = canonical({k: v for k, v in record.items() if k > "hash"})
    head = before[:-1] + b"," if len(before) > 2 else b"{"
    tail = b"," + after[1:] if len(after) > 2 else b"}"
    digest_ = hashlib.sha256(head[:-1] + tail if len(before) > 2 else
                             (after if len(after) > 2 else b"{}")).hexdigest()
    return digest_, head + b'"hash":"' + digest_.encode() + b'"' + tail + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --------------------------------------------------------------------------- opening
def _open(directory: Path, worker: int, signer):
    """(path, fd, seq, prev, size, first records) of the segment to write: the current one
    continued, or a new one whose ``segment.start`` says why."""
    existing = sorted((order[1], f) for f in directory.iterdir()
                      if (order := segment_order(f)) is not None and order[0] == worker)
    if not existing:
        return _new_segment(directory, worker, 0, signer, "new audit log", None)
    k, path = existing[-1]
    size = path.stat().st_size
    if size == 0:   # a segment whose first write never happened: start it again
        path.unlink()
        return _new_segment(directory, worker, k, signer, "new segment (the previous "
                            "attempt wrote nothing)", None)
    state, why, last = _inspect(path, signer)
    if state == "continue":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        first = []
        cut = last["partial"]
        if cut:
            os.ftruncate(fd, size - cut)
            os.fsync(fd)
            first.append({"ts": round(time.time(), 6), "op": "audit.recovered",
                          "worker": worker, "result": "truncated",
                          "detail": f"{cut} bytes of an unfinished last write removed (never "
                                    "acknowledged)"})
            log.warning("worker %d: audit log %s: removed %d bytes of an unfinished last "
                        "write", worker, path, cut)
        return path, fd, last["seq"], last["hash"], size - cut, first
    log.warning("worker %d: audit log %s %s; left as found, starting segment %d", worker,
                path, why, k + 1)
    link = {"file": path.name, "size": size, "last_hash": last.get("hash")}
    return _new_segment(directory, worker, k + 1, signer, f"previous segment {path.name} {why}; "
                        "left as found", link)


def _inspect(path: Path, signer) -> tuple[str, str, dict]:
    """("continue" | "new", why, {seq, hash, partial}) from the segment's first and last lines."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.readline(_TAIL_BYTES)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    body, _, partial = tail.rpartition(b"\n")
    last_line = body.rsplit(b"\n", 1)[-1] if body else b""
    info: dict = {"partial": len(partial)}
    try:
        first = json.loads(head)
        if not isinstance(first, dict):
            raise ValueError
    except ValueError:
        return "new", "does not start with a JSON record (damaged)", info
    try:
        last = json.loads(last_line)
        if not isinstance(last, dict) or last.get("hash") != digest(last):
            raise ValueError
        info.update(seq=int(last["seq"]), hash=str(last["hash"]))
    except (ValueError, KeyError, TypeError):
        return "new", "ends with a line that is not a chained record (damaged)", info
    if first.get("op") != SEGMENT_OP or first.get("format") != FORMAT:
        return "new", "is a legacy segment (unsigned, written by an earlier version)", info
    if first.get("key") != (signer.fingerprint if signer is not None else None):
        return "new", f"is signed by another key ({first.get('key')})", info
    if signer is None:      # an unsigned log (no audit key): the chain alone
        return "continue", "", info
    if last.get("op") != CHECKPOINT_OP:
        return "new", "does not end with a checkpoint (damaged, or a write was cut short)", info
    # A forged last checkpoint (right hash, no signature) must not become the base of the
    # records to come: they would all follow a break. Checked with the public key, no token.
    if not signature_holds(public_key(signer.spki),
                            checkpoint_message(info["seq"], str(last.get("prev"))),
                            last.get("sig")):
        return "new", "ends with a checkpoint whose signature does not verify (damaged)", info
    return "continue", "", info


def _new_segment(directory: Path, worker: int, k: int, signer, detail: str, link):
    path = directory / segment_name(worker, k)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)      # the new file's name is durable before anything is acknowledged
    finally:
        os.close(dfd)
    start = {"ts": round(time.time(), 6), "op": SEGMENT_OP, "format": FORMAT, "worker": worker,
             "key": None, "detail": detail, "pid": os.getpid()}
    if signer is not None:
        start.update(key=signer.fingerprint, spki=signer.spki.hex())
    if link is not None:
        start["previous"] = link
    return path, fd, 0, GENESIS, 0, [start]


def verify(path: Path) -> tuple[int, str | None]:
    """(records, None) if the segment at ``path`` verifies, else (line of the first break,
    why): the earlier API, kept for callers that check one file (kms.server.auditchain has the
    full verdict, pinned keys and directories)."""
    from .auditchain import verify as verify_segment
    v = verify_segment(Path(path))
    return (v.records, None) if v.intact else (v.broken_at or 0, v.why)


class AuditCollector:
    """The audit log's state for ``/metrics``, read at scrape time."""

    def __init__(self, audit: AuditLog):
        self.audit = audit

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        a = self.audit
        g = GaugeMetricFamily("kms_audit_available", "1 if the audit log can be written, "
                              "else 0 (key material is refused with 503 audit_unavailable)")
        g.add_metric([], 1 if a.available else 0)
        yield g
        for name, value, text in (
                ("kms_audit_write_failures", a.write_failures, "audit writes or fsyncs failed"),
                ("kms_audit_refused", a.refused, "requests refused: audit log unwritable"),
                ("kms_audit_batches", a.batches, "signed checkpoints written (one per batch)"),
                ("kms_audit_records", a.records, "audit records written"),
                ("kms_audit_dropped", a.dropped, "records dropped: queue full during an outage")):
            c = CounterMetricFamily(name, text)
            c.add_metric([], value)
            yield c
