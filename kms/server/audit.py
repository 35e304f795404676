"""The audit log's writer: group commit, one HSM-signed checkpoint per batch, no key material.

Format and offline verification are in :mod:`kms.server.auditchain`. Here:

- **Fields by name.** Callers pass only names in ``FIELDS``: there is no field a DEK, secret or
  PIN could go into by accident.
- **Durable before the answer.** ``append`` queues a record and returns the future of the batch
  it joins; everything queued is chained, one checkpoint signed in the HSM, and one writer
  thread writes it with one ``write`` on a file opened ``O_DSYNC`` (the write returns once the
  data and the file's size are on disk, ``fdatasync``'s promise), then resolves the future.
  While it writes, the next batch gathers (group commit: no timer, a burst costs one
  synchronous write).
  ``await commit(...)`` is what the DEK and admin routes use: the answer goes out only once its
  record is on disk under a signed checkpoint.
- **Cheap per record** (it is on every DEK fetch): a record is encoded with orjson (format 3,
  :func:`chained_line`); a request waits on its own loop's future; the event loop only queues
  records and, once per turn, wakes the writer thread, which chains the batch, signs its
  checkpoint (python-pkcs11 releases the GIL for the token's work, so the signature runs beside
  the loop, not on it) and writes it, waking each loop once per batch, not once per request.
- **Unwritable log.** A write that fails (disk full, file-size limit, I/O error), or a
  checkpoint the token cannot sign, truncates the file back to its last good length, keeps the
  batch queued and marks the log unavailable: ``commit`` then raises :class:`AuditUnavailable`
  at once (the routes answer 503 ``audit_unavailable``), one log line says so, and the writer
  retries every ``retry_ms``. The first write that succeeds starts with an ``audit.outage``
  record (when, why, how many requests were refused, how many refusal records were dropped)
  followed by the queued records, so nothing acknowledged is lost and the gap is on record.
- **Damage never stops a start.** :func:`_open` truncates an unfinished last line of the
  current segment (it was never acknowledged) and continues its chain if the segment ends with a
  checkpoint of the same key in this format; anything else (a segment of an earlier format, a
  garbage or foreign last line, another key) leaves that file as found and starts a new segment
  whose ``segment.start`` record says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from .auditchain import (CHECKPOINT_OP, FORMAT, GENESIS, SEGMENT_OP, canonical,
                         checkpoint_message, digest, public_key, segment_format, segment_name,
                         segment_order, signature_holds, writable)

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


class _Batch:
    """Records made durable together (one write, one checkpoint), and who waits for them:
    threads on ``done`` (``append``), requests on asyncio futures (``commit``)."""

    __slots__ = ("records", "done", "waiters")

    def __init__(self):
        self.records: list[dict] = []
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self.waiters: dict = {}   # event loop -> [asyncio future of each commit() waiting]


class _Prepared:
    """A batch chained, encoded and signed: the bytes to write and the chain head after them."""

    __slots__ = ("batch", "count", "data", "seq", "prev")

    def __init__(self, batch: _Batch, count: int, data: bytes, seq: int, prev: str):
        self.batch, self.count, self.data, self.seq, self.prev = batch, count, data, seq, prev


class AuditLog:
    def __init__(self, directory: Path, worker: int, signer=None, *, retry_ms: int = 50,
                 max_pending: int = 100_000):
        """``signer`` (a :class:`TokenSigner`) signs a checkpoint per batch; without one the
        segments are chained but unsigned (the XKS proxy's log, whose token may be any)."""
        self.dir, self.worker, self.signer = Path(directory), worker, signer
        self.dir.mkdir(parents=True, exist_ok=True)
        self._retry = retry_ms / 1000.0
        self._max_pending = max_pending
        # A plain lock (taken per record). The writer sleeps on a SimpleQueue of wake-ups:
        # put() is one C call (Condition.notify cost ~12 µs of the notifier's CPU, measured).
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue = queue.SimpleQueue()
        self._batch = _Batch()             # the batch gathering
        self._busy = False                 # the writer is preparing or writing a batch
        self._in_hand: _Batch | None = None    # ... this one
        self._flush_due = False            # an event loop hands the gathering batch over at
                                           # the end of its turn (so the whole turn joins it)
        self._due_at = 0.0                 # monotonic time the hand-over was scheduled
        self._outage: dict | None = None
        self._closed = False
        self._close_failures = 0
        self._dirty = False   # bytes past self._size may be on disk (a failed write)
        self.available = True
        self.batches = self.records = self.write_failures = self.refused = self.dropped = 0
        self.path, self._fd, self._seq, self._prev, self._size, first = _open(
            self.dir, worker, signer)
        self._batch.records.extend(first)
        self._idle = False      # the writer sleeps and no wake-up is queued (under self._lock)
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    # ----------------------------------------------------------------------- callers
    def append(self, **fields) -> concurrent.futures.Future:
        """Queue a record; the future resolves once it is durable (or fails if it is not)."""
        record = _record(fields)
        with self._lock:
            batch = self._queue(record)
            if batch is None:
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(AuditUnavailable("audit queue full"))
                return failed
            return batch.done

    async def commit(self, **fields) -> None:
        """Append and wait until the record is durable; :class:`AuditUnavailable` if the log
        cannot be written (checked first, so nothing is queued for a request refused).

        The request waits on a future of its own event loop. At the end of the loop's turn
        (:meth:`_flush`, scheduled once, so every request handled in that turn joins the batch)
        the writer thread is woken; it prepares and writes the batch and wakes the loop once per
        batch, not once per request. A request cancelled meanwhile (its timeout) cancels only
        its own future; its record is written all the same.
        """
        if not self.available:
            self.refuse()
        record = _record(fields)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._lock:
            batch = self._queue(record, wake=False)   # woken at the end of this loop's turn
            if batch is None:
                raise AuditUnavailable("audit queue full")
            waiting = batch.waiters.get(loop)
            if waiting is None:
                waiting = batch.waiters[loop] = []
            waiting.append(waiter)
            if not self._busy and not self._flush_due:
                self._flush_due = True
                self._due_at = time.monotonic()
                loop.call_soon(self._flush)
        await waiter

    def _queue(self, record: dict, wake: bool = True) -> _Batch | None:
        """Add ``record`` to the batch that is gathering (``self._lock`` held); None if the
        queue is full (only while the log is unwritable)."""
        if self._closed:
            raise ValueError("audit log is closed")
        batch = self._batch
        if len(batch.records) >= self._max_pending:
            self.dropped += 1
            return None
        batch.records.append(record)
        if wake:
            self._notify()
        return batch

    def _notify(self) -> None:
        """Wake the writer if it sleeps (``self._lock`` held); one wake-up per sleep."""
        if self._idle:
            self._idle = False
            self._wake.put(None)

    def refuse(self):
        """Count a request refused because the log is unwritable, and raise."""
        with self._lock:
            self.refused += 1
            if self._outage is not None:
                self._outage["refused"] += 1
        raise AuditUnavailable("the audit log cannot be written")

    def flush(self, timeout: float = 10) -> None:
        """Wait until everything appended so far is durable (tests, shutdown)."""
        with self._lock:
            # the batch the writer has in hand too (flush once returned while it was written)
            waits = [b.done for b in (self._in_hand, self._batch) if b is not None and b.records]
            self._notify()     # a batch left to a loop that stopped: the writer takes it
        for done in waits:
            done.result(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._notify()
        self._writer.join(timeout=10)
        if self._batch.records or self._outage is not None:
            log.error("worker %d: audit log %s still cannot be written at shutdown: %d "
                      "record(s) lost", self.worker, self.path, len(self._batch.records))
        os.close(self._fd)

    # ----------------------------------------------------------------------- event loop
    def _flush(self) -> None:
        """On the event loop, at the end of the turn its first waiting request was handled in:
        hand the gathering batch to the writer thread.

        The writer, not the loop, chains and signs it. Signing on the loop was measured
        (``benchmarks/service_breakdown.py``, 2026-12-05): SoftHSM2's ``C_Sign`` took ~160 µs
        of the loop's CPU per batch beside a busy event loop (~45 µs alone), a third of the
        audit's cost per DEK fetch; on the writer thread python-pkcs11 releases the GIL for it
        and the loop serves on (DEK fetches 1.5-1.6x the floor instead of 1.7-1.8x,
        ``test_kms_service.py``). A slow token (a network HSM) therefore never stalls the loop.
        """
        with self._lock:
            self._flush_due = False
            self._notify()

    def _settle(self, waiters: list, why: str | None) -> None:
        """On the event loop: answer the requests of a batch."""
        for waiter in waiters:
            if not waiter.done():      # a request that timed out cancelled its own future
                if why is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(AuditUnavailable(why))

    # ----------------------------------------------------------------------- writer
    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    # The batch is the writer's once the loop whose requests wait for it has
                    # handed it over (the end of its turn), or at once when no loop will
                    # (appends from threads, an outage, closing), or when a loop has not come
                    # to it within retry_ms.
                    mine = self._batch.records and not self._busy and (
                        not self._flush_due or self._closed or self._outage is not None)
                    if mine or (self._outage is not None and not self._busy):
                        batch, self._batch = self._batch, _Batch()
                        self._busy, self._in_hand = True, batch
                        break
                    if self._closed and not self._busy:
                        return
                    # Never without a timeout: a hand-over scheduled while the writer sleeps
                    # does not wake it (commit queues without a wake-up), so a loop that then
                    # never runs its _flush would leave the batch waiting for ever.
                    wait = self._retry if not self._flush_due else max(
                        0.0, self._due_at + self._retry - time.monotonic())
                    self._idle = True
                    self._lock.release()
                    try:
                        self._wake.get(timeout=wait)
                    except queue.Empty:
                        pass
                    finally:
                        self._lock.acquire()
                    self._idle = False
                    if self._flush_due and not self._busy and \
                            time.monotonic() - self._due_at >= self._retry:
                        self._flush_due = False     # that loop is gone or stuck: take it
            try:
                prepared = self._prepare(batch)
            except Exception as exc:   # the token did not sign (HsmError): nothing written
                self._failed(batch, exc)
            else:
                if self._write(prepared):
                    continue
            if self._closed:       # at close a failing log gets three tries; close() says so
                self._close_failures += 1
                if self._close_failures >= 3:
                    return
            time.sleep(self._retry)

    def _prepare(self, batch: _Batch) -> _Prepared:
        """Chain the batch's records after the durable head, encode them and sign one
        checkpoint (on the writer thread; one batch is in hand at a time)."""
        records = batch.records
        if self._outage is not None:
            records = [_outage_record(self._outage, self.worker), *records]
        seq, prev, lines = self._seq, self._prev, []
        for rec in records:
            seq += 1
            rec["seq"], rec["prev"] = seq, prev
            prev, line = chained_line(rec)
            lines.append(line)
        if self.signer is not None:
            seq += 1
            cp = {"seq": seq, "ts": round(time.time(), 6), "prev": prev, "op": CHECKPOINT_OP,
                  "worker": self.worker,
                  "sig": self.signer.sign(checkpoint_message(seq, prev)).hex()}
            prev, line = chained_line(cp)
            lines.append(line)
        return _Prepared(batch, len(records), b"".join(lines), seq, prev)

    def _write(self, prepared: _Prepared) -> bool:
        batch = prepared.batch
        try:
            if self._dirty:                      # a failed write left bytes: cut them first
                os.ftruncate(self._fd, self._size)
                self._dirty = False
            self._dirty = True
            # The segment is open with O_DSYNC: each write returns once its data and the
            # file's new size are on disk (fdatasync's promise, in the same system call).
            _write_all(self._fd, prepared.data)
            self._dirty = False
        except Exception as exc:   # OSError (ENOSPC, EFBIG, EIO)
            self._failed(batch, exc)
            return False
        self._size += len(prepared.data)
        self._seq, self._prev = prepared.seq, prepared.prev
        self.batches += 1
        self.records += prepared.count
        since = self._outage["since"] if self._outage is not None else None
        recovered = since is not None
        with self._lock:
            if recovered:
                self._outage = None
                self.available = True
            self._busy, self._in_hand = False, None   # the next batch is the writer's at once
        if since is not None:
            log.warning("worker %d: audit log %s writable again after %.1f s; serving key "
                        "material", self.worker, self.path, time.time() - since)
        batch.done.set_result(None)
        self._release(batch, None)
        return True

    def _release(self, batch: _Batch, why: str | None) -> None:
        """Wake the requests waiting for ``batch``, one callback per event loop."""
        for loop, waiters in batch.waiters.items():
            try:
                loop.call_soon_threadsafe(self._settle, waiters, why)
            except RuntimeError:       # that loop is closed: nobody waits there any more
                pass

    def _failed(self, batch: _Batch, exc: BaseException) -> None:
        try:
            if self._dirty:
                os.ftruncate(self._fd, self._size)
                self._dirty = False
        except OSError:
            pass          # retried before the next write
        why = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
        for rec in batch.records:   # a waiting request was answered 503: say so when written
            rec["late"] = True
        with self._lock:
            kept = self._batch
            kept.records[:0] = batch.records      # kept, in order, for the next try
            self.write_failures += 1
            self._busy, self._in_hand = False, None
            first = self._outage is None
            if first:
                self._outage = {"since": time.time(), "error": why, "refused": 0}
                self.available = False
        if first:
            log.error("worker %d: audit log %s cannot be written (%s): refusing key material "
                      "(503 audit_unavailable) until it can", self.worker, self.path, why)
        batch.done.set_exception(AuditUnavailable(why))
        self._release(batch, why)


_FIELDS = frozenset(FIELDS)


def _record(fields: dict) -> dict:
    """A record of the named ``fields`` (None left out), stamped with the time."""
    if not fields.keys() <= _FIELDS:
        raise ValueError(f"audit: unknown field(s) {sorted(set(fields) - _FIELDS)}")
    record = {"ts": round(time.time(), 6)}
    for k, v in fields.items():
        if v is not None:
            record[k] = v
    return record


def _outage_record(outage: dict, worker: int) -> dict:
    return {"ts": round(time.time(), 6), "op": "audit.outage", "worker": worker,
            "result": "recovered",
            "detail": f"audit log unwritable from {outage['since']:.3f} ({outage['error']}); "
                      f"{outage['refused']} request(s) refused meanwhile with 503 "
                      "audit_unavailable; records marked late were queued during the outage (a "
                      "request that waited for one was answered 503)"}


def chained_line(record: dict) -> tuple[str, bytes]:
    """(hash, line) of ``record``: its hash is SHA-256 of its canonical form without ``hash``
    (``auditchain.digest``), set into ``record``; the line is the canonical form with it. Two
    orjson encodings (about 1.3 µs together, measured; ``json`` took 9 µs for the same line).
    A string orjson cannot encode (a lone surrogate) is written as its escape text instead."""
    record.pop("hash", None)      # a record kept from a failed write is chained anew
    try:
        body = canonical(record)
    except TypeError:
        record.update(writable(record))
        body = canonical(record)
    record["hash"] = digest_ = hashlib.sha256(body).hexdigest()
    return digest_, canonical(record) + b"\n"


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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_DSYNC)
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
    fmt = segment_format(first)
    try:
        last = json.loads(last_line)
        if fmt is None or not isinstance(last, dict) or last.get("hash") != digest(last, fmt):
            raise ValueError
        info.update(seq=int(last["seq"]), hash=str(last["hash"]))
    except (ValueError, KeyError, TypeError, OverflowError):
        return "new", "ends with a line that is not a chained record (damaged)", info
    if first.get("op") != SEGMENT_OP:
        return "new", "is a legacy segment (unsigned, written by an earlier version)", info
    if fmt != FORMAT:     # never appended to: one segment, one canonical form
        return "new", f"is in audit format {fmt} (written by an earlier version)", info
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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_DSYNC | os.O_CREAT | os.O_EXCL,
                 0o600)
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
