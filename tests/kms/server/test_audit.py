"""The audit log against the file writer and a full disk, on a real SoftHSM2 token.

The writer (kms.server.audit) signs one checkpoint per batch with the token's audit key; the
verifier (``kms audit verify``, kms.server.auditchain) needs no token. The attacker here can
edit, delete, append and recompute every keyless hash; they hold neither the PIN nor the key.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, Mechanism

from hsm.core import ops
from hsm.keys import attributes
from hsm.core.errors import from_pkcs11
from kms.server import auditchain
from kms.server.audit import AuditLog, AuditUnavailable, TokenSigner
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def signer(softhsm_session_token_factory):
    tt = softhsm_session_token_factory(prefix="audit")
    return TokenSigner(tt.token)


def _write(directory: Path, signer, batches) -> AuditLog:
    """A log with ``batches`` (lists of field dicts), each made durable before the next."""
    log = AuditLog(directory, 0, signer)
    for batch in batches:
        futures = [log.append(**fields) for fields in batch]
        for f in futures:
            f.result(10)
    log.close()
    return log


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rewrite(path: Path, records: list[dict]) -> None:
    """The file writer's forgery: renumber and re-chain every record (checkpoints included)."""
    prev = auditchain.GENESIS
    for seq, rec in enumerate(records, 1):
        rec.update(seq=seq, prev=prev)
        rec["hash"] = prev = auditchain.digest(rec)
    path.write_bytes(b"".join(auditchain.canonical(r) + b"\n" for r in records))


def _verify(*args):
    return run_cli("kms", "audit", "verify", *map(str, args), timeout=60)


DEKS = [[{"op": "worker.start", "result": "ok", "worker": 0}],
        [{"op": "dek.encrypt", "org": "acme", "client": "spiffe://t/svc", "status": 200,
          "result": "ok", "version": 1, "request_id": f"r{i}"} for i in range(3)],
        [{"op": "dek.decrypt", "org": "acme", "client": "spiffe://t/svc", "status": 200,
          "result": "ok", "version": 1, "request_id": "r9"}]]


def test_a_removed_dek_line_with_recomputed_hashes_is_reported(signer, tmp_path):
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    records = _records(path)
    assert [r["op"] for r in records if r["op"] != "audit.checkpoint"] == [
        "segment.start", "worker.start", "dek.encrypt", "dek.encrypt", "dek.encrypt",
        "dek.decrypt"]
    assert records[-1]["op"] == "audit.checkpoint"
    checkpoints = sum(r["op"] == "audit.checkpoint" for r in records)
    proc = _verify(path, "--key", signer.fingerprint)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == (f"{path}: {len(records)} records, chain intact, {checkpoints} "
                           f"checkpoints signed by key {signer.fingerprint} (pinned)\n")
    gone = next(i for i, r in enumerate(records) if r.get("request_id") == "r1")
    del records[gone]                               # the second dek.encrypt
    _rewrite(path, records)
    # the chain alone holds again (all the previous version checked); a signature does not
    line = next(i for i, r in enumerate(records[gone:], gone + 1)
                if r["op"] == "audit.checkpoint")
    proc = _verify(path)
    assert proc.returncode == 1
    assert proc.stdout == (f"{path}: chain broken at line {line}: the checkpoint's signature "
                           f"does not verify with the segment's key {signer.fingerprint}: a "
                           "line before it was changed, removed or inserted\n")


def test_a_log_re_signed_with_another_key_fails_only_against_the_pinned_key(signer, tmp_path):
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    records = [r for r in _records(path) if r.get("request_id") != "r1"]
    forger = ec.generate_private_key(ec.SECP256R1())
    spki = forger.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    fpr = auditchain.fingerprint_of(spki)
    records[0].update(key=fpr, spki=spki.hex())
    prev = auditchain.GENESIS
    for seq, rec in enumerate(records, 1):          # re-chain and re-sign every checkpoint
        rec.update(seq=seq, prev=prev)
        if rec["op"] == "audit.checkpoint":
            rec["sig"] = forger.sign(auditchain.checkpoint_message(seq, prev),
                                     ec.ECDSA(hashes.SHA256())).hex()
        rec["hash"] = prev = auditchain.digest(rec)
    path.write_bytes(b"".join(auditchain.canonical(r) + b"\n" for r in records))
    proc = _verify(path)
    assert proc.returncode == 0 and "NOT pinned" in proc.stdout and fpr in proc.stdout
    proc = _verify(path, "--key", signer.fingerprint)
    assert proc.returncode == 1
    assert proc.stdout == (f"{path}: chain broken at line 1: the segment is signed by key "
                           f"{fpr}, not the pinned key {signer.fingerprint}\n")


def test_records_after_the_last_checkpoint_are_reported_unsigned(signer, tmp_path):
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    records = _records(path)
    extra = {"ts": 1.0, "op": "dek.encrypt", "org": "forged", "result": "ok"}
    _rewrite(path, records + [extra])
    proc = _verify(path)
    assert proc.returncode == 1
    assert proc.stdout == (f"{path}: chain broken at line {len(records) + 1}: 1 record(s) "
                           "after the last checkpoint are not signed (never acknowledged by "
                           "the node, or added by someone else)\n")


def test_a_garbage_line_does_not_stop_the_start_and_the_damage_is_recorded(signer, tmp_path):
    _write(tmp_path, signer, DEKS)
    first = tmp_path / "audit-w0.jsonl"
    with open(first, "a") as f:
        f.write("this is not a record\n")
    damaged = first.read_bytes()
    log = AuditLog(tmp_path, 0, signer)             # what the worker does at start
    log.append(op="worker.start", result="ok", worker=0).result(10)
    log.close()
    assert first.read_bytes() == damaged            # left as found
    second = tmp_path / "audit-w0.1.jsonl"
    start = _records(second)[0]
    assert start["op"] == "segment.start" and start["previous"]["file"] == "audit-w0.jsonl"
    assert start["detail"] == ("previous segment audit-w0.jsonl ends with a line that is not a "
                               "chained record (damaged); left as found")
    proc = _verify(tmp_path, "--key", signer.fingerprint)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    garbage_line = damaged.count(b"\n")
    assert lines[0] == (f"{first}: chain broken at line {garbage_line}: not a JSON "
                        "record (Expecting value: line 1 column 1 (char 0))")
    assert lines[1].startswith(f"{second}: ") and "chain intact" in lines[1]


def test_a_forged_last_checkpoint_is_not_continued(signer, tmp_path):
    """A line with a right hash but a made-up signature at the end: the next start does not
    build on it (its records would all follow a break) but starts a new segment."""
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    records = _records(path)
    forged = {"ts": 2.0, "op": "audit.checkpoint", "worker": 0, "sig": "30" + "00" * 8}
    _rewrite(path, records + [forged])
    AuditLog(tmp_path, 0, signer).close()
    start = _records(tmp_path / "audit-w0.1.jsonl")[0]
    assert start["detail"] == ("previous segment audit-w0.jsonl ends with a checkpoint whose "
                               "signature does not verify (damaged); left as found")


def test_a_file_cut_after_a_record_starts_a_new_segment(signer, tmp_path):
    """Cut at a line boundary inside a batch (its checkpoint gone): the records left are not
    signed, so the start does not continue that chain; verify reports them."""
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))          # the last checkpoint removed
    AuditLog(tmp_path, 0, signer).close()
    start = _records(tmp_path / "audit-w0.1.jsonl")[0]
    assert start["detail"] == ("previous segment audit-w0.jsonl does not end with a checkpoint "
                               "(damaged, or a write was cut short); left as found")
    assert "after the last checkpoint are not signed" in _verify(path).stdout


def test_a_partial_last_write_is_truncated_back_and_the_chain_continues(signer, tmp_path):
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"seq": 10, "op": "dek.enc')      # a crash in the middle of a write
    assert "unfinished last write" in _verify(path).stdout
    log = AuditLog(tmp_path, 0, signer)
    log.append(op="worker.start", result="ok", worker=0).result(10)
    log.close()
    before = len(records := _records(path))
    recovered = next(r for r in records if r["op"] == "audit.recovered")
    assert recovered["detail"] == \
        "26 bytes of an unfinished last write removed (never acknowledged)"
    assert records.index(recovered) > 8 and before > 10
    proc = _verify(tmp_path, "--key", signer.fingerprint)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{path}: {before} records, chain "
                                                           "intact")
    assert not (tmp_path / "audit-w0.1.jsonl").exists()


def test_a_legacy_log_of_the_previous_version_stays_verifiable_and_is_followed(signer,
                                                                               tmp_path):
    """The previous main wrote unsigned chains; they verify as legacy and a new signed
    segment follows, linked to the legacy one's last hash."""
    legacy = tmp_path / "audit-w0.jsonl"
    prev, lines = auditchain.GENESIS, []
    for seq, op in enumerate(("worker.start", "dek.encrypt", "worker.stop"), 1):
        rec = {"seq": seq, "ts": 1.0 + seq, "prev": prev, "op": op, "result": "ok",
               "worker": 0}
        rec["hash"] = prev = auditchain.digest(rec, 2)      # the json form of that version
        lines.append(auditchain.canonical_v2(rec).decode() + "\n")
    legacy.write_text("".join(lines))
    _write(tmp_path, signer, DEKS[:1])
    new = tmp_path / "audit-w0.1.jsonl"
    assert _records(new)[0]["previous"] == {"file": "audit-w0.jsonl", "size": legacy.stat()
                                            .st_size, "last_hash": prev}
    proc = _verify(tmp_path, "--key", signer.fingerprint)
    assert proc.returncode == 0
    n = len(_records(new))
    assert proc.stdout.splitlines() == [
        f"{legacy}: 3 records, chain intact (legacy segment: unsigned, an edit with recomputed "
        "hashes would not show)",
        f"{new}: {n} records, chain intact, {n - 2} checkpoints signed by key "
        f"{signer.fingerprint} (pinned)"]
    # the unsigned legacy chain cannot show a cut tail itself; the segment after it does
    legacy.write_text("".join(lines[:-1]))
    proc = _verify(tmp_path, "--key", signer.fingerprint)
    assert proc.returncode == 1 and proc.stdout.splitlines()[1] == (
        f"{new}: chain broken at line 1: the previous segment audit-w0.jsonl is "
        f"{len(''.join(lines[:-1]))} bytes, not the {len(''.join(lines))} recorded when this "
        "segment began (truncated or rewritten since)")


def _format2_segment(path: Path, signer, batches) -> None:
    """A segment as the previous version's writer made it (format 2): the same records and
    checkpoints, hashed and written in Python's ``json`` canonical form (ASCII, ``\\u``
    escapes), one signed checkpoint per batch."""
    prev, seq, lines = auditchain.GENESIS, 0, []

    def put(rec):
        nonlocal prev, seq
        seq += 1
        rec.update(seq=seq, prev=prev)
        rec["hash"] = prev = auditchain.digest(rec, 2)
        lines.append(auditchain.canonical_v2(rec) + b"\n")
    put({"ts": 1.0, "op": "segment.start", "format": 2, "worker": 0, "key": signer.fingerprint,
         "spki": signer.spki.hex(), "detail": "new audit log", "pid": 1})
    for batch in batches:
        for fields in batch:
            put({"ts": 2.0, **fields})
        put({"ts": 3.0, "op": "audit.checkpoint", "worker": 0,
             "sig": signer.sign(auditchain.checkpoint_message(seq + 1, prev)).hex()})
    path.write_bytes(b"".join(lines))


def test_a_format_2_log_of_the_previous_version_verifies_and_is_followed_in_format_3(
        signer, tmp_path):
    """Upgrade: segments the previous version wrote (format 2, ``json``'s canonical form) still
    verify against the pinned key, an edit in one with hashes recomputed in that form is still
    reported, and a worker starting on the directory begins a format-3 segment linked to it."""
    old = tmp_path / "audit-w0.jsonl"
    batches = [[{**r, "org": "zürich\u2028"} for r in batch] for batch in DEKS]
    _format2_segment(old, signer, batches)
    assert b"z\\u00fcrich\\u2028" in old.read_bytes()    # the two forms differ here
    n_old = len(_records(old))
    log = AuditLog(tmp_path, 0, signer)                      # what the worker does at start
    log.append(op="worker.start", result="ok", worker=0, org="zürich").result(10)
    log.close()
    new = tmp_path / "audit-w0.1.jsonl"
    start = _records(new)[0]
    assert (start["format"], start["detail"]) == (3, "previous segment audit-w0.jsonl is in "
                                                  "audit format 2 (written by an earlier "
                                                  "version); left as found")
    assert "zürich".encode() in new.read_bytes()            # format 3 writes UTF-8
    ops_ = [r["op"] for r in _records(new)]
    proc = _verify(tmp_path, "--key", signer.fingerprint)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines() == [
        f"{old}: {n_old} records, chain intact, {len(DEKS)} checkpoints signed by key "
        f"{signer.fingerprint} (pinned)",
        f"{new}: {len(ops_)} records, chain intact, {ops_.count('audit.checkpoint')} "
        f"checkpoints signed by key {signer.fingerprint} (pinned)"]
    records = _records(old)
    gone = next(i for i, r in enumerate(records) if r.get("request_id") == "r1")
    del records[gone]
    prev = auditchain.GENESIS                  # the file writer re-chains in format 2's form
    for seq, rec in enumerate(records, 1):
        rec.update(seq=seq, prev=prev)
        rec["hash"] = prev = auditchain.digest(rec, 2)
    old.write_bytes(b"".join(auditchain.canonical_v2(r) + b"\n" for r in records))
    line = next(i for i, r in enumerate(records[gone:], gone + 1)
                if r["op"] == "audit.checkpoint")
    assert _verify(old).stdout == (
        f"{old}: chain broken at line {line}: the checkpoint's signature does not verify with "
        f"the segment's key {signer.fingerprint}: a line before it was changed, removed or "
        "inserted\n")
    records[0]["format"] = 9                   # a format this version does not know
    old.write_bytes(b"".join(auditchain.canonical_v2(r) + b"\n" for r in records))
    assert _verify(old).stdout == (f"{old}: chain broken at line 1: written in audit format 9, "
                                   "which this version does not know\n")


def test_the_writer_thread_signs_while_the_event_loop_serves_on(signer, tmp_path):
    """Every batch's checkpoint is signed on the writer thread, never on the event loop: while a
    signature is in the token the loop runs on. Here the token's answer waits until the loop
    has run another task; had the loop been signing it would never have run it, the signature
    would have failed and the request been refused (AuditUnavailable). Every record is durable
    and verifies with the key."""
    import threading
    where: list[str] = []
    loop_ran = threading.Event()

    class Gated:
        fingerprint, spki = signer.fingerprint, signer.spki

        def sign(self, message):
            where.append(threading.current_thread().name)
            if not loop_ran.wait(10):
                raise RuntimeError("the event loop did not run while the checkpoint was signed")
            return signer.sign(message)
    log = AuditLog(tmp_path, 0, Gated())
    loop_ran.set()
    log.flush()                        # the segment's first records (worker.start)

    async def requests(n):
        loop_ran.clear()
        waiting = [asyncio.create_task(log.commit(op="dek.encrypt", org="acme",
                                                  request_id=f"q{n}-{i}")) for i in range(n)]
        await asyncio.sleep(0.05)      # the loop runs on while the batch is being signed
        loop_ran.set()
        await asyncio.gather(*waiting)
    where.clear()
    asyncio.run(requests(3))
    asyncio.run(requests(5))
    assert where and set(where) == {"audit-writer"}
    log.close()
    assert _verify(log.path, "--key", signer.fingerprint).returncode == 0
    dek_ids = [r["request_id"] for r in _records(log.path) if r["op"] == "dek.encrypt"]
    assert len(dek_ids) == 8


def _commit_on_a_loop_that_never_hands_over(log, wait: float) -> float:
    """One commit on an event loop that never runs the audit's hand-over (stopped, stuck);
    the seconds it took to be answered."""
    loop = asyncio.new_event_loop()
    real = loop.call_soon

    def call_soon(callback, *args, **kw):   # the loop never runs the audit's flush
        if getattr(callback, "__func__", None) is AuditLog._flush:
            return None
        return real(callback, *args, **kw)
    loop.call_soon = call_soon               # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        loop.run_until_complete(asyncio.wait_for(
            log.commit(op="dek.encrypt", org="acme", request_id="orphan"), wait))
        return time.monotonic() - t0
    finally:
        loop.close()


def test_a_batch_its_event_loop_never_hands_over_is_written_by_the_writer(signer, tmp_path):
    """A request's batch is handed to the writer at the end of its event loop's turn; a loop
    that never comes to it (stopped, stuck) does not lose it: within retry_ms the writer thread
    takes and writes it, and the request is answered."""
    log = AuditLog(tmp_path, 0, signer, retry_ms=20)
    log.flush()
    assert _commit_on_a_loop_that_never_hands_over(log, 10) < 5
    log.close()
    assert any(r.get("request_id") == "orphan" for r in _records(log.path))
    assert _verify(log.path, "--key", signer.fingerprint).returncode == 0


def test_a_batch_is_taken_from_a_stuck_loop_also_when_the_writer_was_asleep(signer, tmp_path):
    """The writer asleep with nothing due when a loop schedules its hand-over (commit queues
    without waking it) and that loop never runs it: the writer still takes the batch within
    retry_ms (it once slept without a timeout then, and the request waited for ever)."""
    log = AuditLog(tmp_path, 0, signer, retry_ms=20)
    log.flush()
    time.sleep(0.2)                          # the writer sleeps, no hand-over due
    assert _commit_on_a_loop_that_never_hands_over(log, 3) < 1
    log.close()
    assert any(r.get("request_id") == "orphan" for r in _records(log.path))


def test_an_unwritable_log_refuses_commits_and_writes_everything_once_it_can(signer,
                                                                             tmp_path):
    """In-process: a write that fails (here the fd is swapped for a read-only one, as EBADF
    stands for any OSError) keeps the batch, makes commit refuse at once, and the first good
    write starts with the outage record and then the kept records."""
    import os
    log = AuditLog(tmp_path, 0, signer, retry_ms=20)
    log.append(op="worker.start", result="ok", worker=0).result(10)
    good = log._fd
    log._fd = os.open(log.path, os.O_RDONLY)
    kept = log.append(op="tenant.destroy", org="acme", result="ok", status=200)
    with pytest.raises(AuditUnavailable):
        kept.result(10)
    assert not log.available
    with pytest.raises(AuditUnavailable):
        asyncio.run(log.commit(op="dek.encrypt", org="acme"))
    os.close(log._fd)
    log._fd = good
    deadline = time.monotonic() + 10
    while not log.available:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    log.close()
    ops_ = [r["op"] for r in _records(log.path)]
    assert ops_[-3:] == ["audit.outage", "tenant.destroy", "audit.checkpoint"]
    assert _records(log.path)[-2]["late"] is True
    outage = _records(log.path)[-3]
    assert "1 request(s) refused meanwhile with 503 audit_unavailable" in outage["detail"]
    assert (log.write_failures >= 1, log.refused) == (True, 1)
    assert _verify(log.path, "--key", signer.fingerprint).returncode == 0


def test_a_checkpoint_the_token_refuses_to_sign_answers_no_request_until_it_signs(signer,
                                                                                   tmp_path):
    """The writer thread's signature refused by the token (here a key label it does not hold:
    a real refusal, CKR from SoftHSM2): the request waiting for that batch is refused
    (AuditUnavailable, so 503), nothing unsigned is written, commit refuses at once; once the
    token signs again the kept record is written (late) after the outage record and the log
    verifies against the key."""
    from hsm.core.errors import HsmError

    class Refusing:
        fingerprint, spki, broken = signer.fingerprint, signer.spki, False

        def sign(self, message):
            label = "no-such-audit-key" if self.broken else signer.label
            return ops.sign(signer.token, ops.private(label), "ecdsa-sha256", message)
    refusing = Refusing()
    log = AuditLog(tmp_path, 0, refusing, retry_ms=20)
    log.flush()
    size = log.path.stat().st_size
    refusing.broken = True
    with pytest.raises(HsmError):
        refusing.sign(b"x")
    with pytest.raises(AuditUnavailable):
        asyncio.run(log.commit(op="dek.encrypt", org="acme", request_id="during"))
    assert not log.available and log.path.stat().st_size == size
    with pytest.raises(AuditUnavailable):
        asyncio.run(log.commit(op="dek.encrypt", org="acme", request_id="refused"))
    refusing.broken = False
    deadline = time.monotonic() + 10
    while not log.available:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    asyncio.run(log.commit(op="dek.encrypt", org="acme", request_id="after"))
    log.close()
    records = _records(log.path)
    ids = [r.get("request_id") for r in records if r["op"] == "dek.encrypt"]
    assert ids == ["during", "after"]
    assert next(r for r in records if r.get("request_id") == "during")["late"] is True
    assert any(r["op"] == "audit.outage" for r in records)
    assert _verify(log.path, "--key", signer.fingerprint).returncode == 0


def test_the_audit_key_cannot_be_read_widened_or_used_for_anything_but_raw_ecdsa(signer):
    """The user-PIN holder against the audit key: the token refuses with its CKR code."""
    token = signer.token
    raw = token.module.raw
    found = attributes.check(token, ops.private(signer.label), attributes.AUDIT_SIGNING)
    assert found == []

    with token.lease() as lease:
        key = lease.key(ops.private(signer.label))
        h = lease.session.handle
        with pytest.raises(pkcs11.PKCS11Error) as info:
            key[Attribute.VALUE]
        assert from_pkcs11(info.value, operation="attack").ckr == "CKR_ATTRIBUTE_SENSITIVE"
        with pytest.raises(pkcs11.PKCS11Error) as info:
            key.sign(b"x" * 32, mechanism=Mechanism.ECDSA_SHA1)
        assert from_pkcs11(info.value, operation="attack").ckr == "CKR_MECHANISM_INVALID"
        assert _ckr(raw.set_attributes(h, key.handle, {Attribute.DERIVE: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert _ckr(raw.set_attributes(h, key.handle, {Attribute.ALLOWED_MECHANISMS: [
            Mechanism.ECDSA_SHA1]})) == "CKR_ACTION_PROHIBITED"
        assert _ckr(raw.copy_object(h, key.handle, {Attribute.TOKEN: False})[0]) == \
            "CKR_ACTION_PROHIBITED"


def _ckr(rv: int) -> str:
    from hsm.core.errors import CKR_BY_VALUE
    return CKR_BY_VALUE.get(rv, f"CKR 0x{rv:x}")


# ----------------------------------------------------------------------------- a real node
def _dek(node, org):
    return node.call("POST", "/v1/dek", {"org": org, "purpose": "encrypt"})


def test_a_damaged_log_does_not_stop_the_node_and_a_full_disk_means_503_then_recovery(
        service_kit):
    """A garbage line appended to the audit file: the node starts, in a new segment that says
    why. Then the worker's file-size limit (RLIMIT_FSIZE, as a full disk) is lowered to the
    segment's size: DEK fetches get 503 audit_unavailable (a metric says 0, one log line says
    why), none is answered 200 unaudited; the limit raised, the node serves again, and every
    DEK it answered 200 has its record under a checkpoint that verifies against the key."""
    import resource
    cfg = service_kit.config(store=str(service_kit.root / "audit-full.db"))
    audit_dir = cfg.parent / "audit"
    n = service_kit.start(cfg)
    try:
        assert n.call("POST", "/v1/tenants", {"org": "full"}, who="admin")[0] == 201
        assert _dek(n, "full")[0] == 200
    finally:
        assert n.stop() == 0
    first = audit_dir / "audit-w0.jsonl"
    with open(first, "a") as f:
        f.write("garbage appended by someone\n")
    n = service_kit.start(cfg)
    try:
        second = audit_dir / "audit-w0.1.jsonl"
        start = _records(second)[0]
        assert "ends with a line that is not a chained record (damaged)" in start["detail"]
        worker = start["pid"]
        ok_ids = []
        for _ in range(200):   # the segment outgrows the node's stderr file (also size-limited)
            status, body = _dek(n, "full")
            assert status == 200
            ok_ids.append(n.last_headers["X-Request-Id"])
            if second.stat().st_size > n.log.stat().st_size + 4096:
                break
        limit = second.stat().st_size
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            refused = [_dek(n, "full") for _ in range(5)]
            assert {(s, b["error"]) for s, b in refused} == {(503, "audit_unavailable")}
            assert n.last_headers["Retry-After"] == "1"
            status, text = n.call("GET", "/metrics", who="status")
            assert "kms_audit_available 0.0" in text
            assert second.stat().st_size == limit       # the failed batch was cut back
        finally:
            resource.prlimit(worker, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 20
        while (answer := _dek(n, "full"))[0] != 200:
            assert answer[1]["error"] == "audit_unavailable"
            assert time.monotonic() < deadline, "the node never served again"
            time.sleep(0.05)
        ok_ids.append(n.last_headers["X-Request-Id"])
        assert "kms_audit_available 1.0" in n.call("GET", "/metrics", who="status")[1]
    finally:
        assert n.stop() == 0
    errors = [line for line in n.stderr().splitlines() if "cannot be written" in line]
    assert len(errors) == 1 and "503 audit_unavailable" in errors[0]
    key = start["key"]
    proc = _verify(second, "--key", key)
    assert proc.returncode == 0, proc.stdout
    records = _records(second)
    written = {r.get("request_id") for r in records if r["op"] == "dek.encrypt"}
    assert set(ok_ids) <= written                   # nothing answered 200 went unrecorded
    outage = next(r for r in records if r["op"] == "audit.outage")
    assert "OSError: File too large" in outage["detail"]
    assert _verify(audit_dir).returncode == 1       # the damaged first segment still shows


def test_a_log_without_an_audit_key_is_chained_unsigned_and_reported_so(tmp_path):
    """The XKS proxy's log (its token may be any): same segments and durability, no
    checkpoints; verify says it is unsigned, and a restart continues the chain."""
    for _ in range(2):
        log = AuditLog(tmp_path, 0)
        log.append(op="worker.start", result="ok", worker=0).result(10)
        log.close()
    path = tmp_path / "audit-w0.jsonl"
    records = _records(path)
    assert [r["op"] for r in records] == ["segment.start", "worker.start", "worker.start"]
    assert records[0]["key"] is None and not (tmp_path / "audit-w0.1.jsonl").exists()
    proc = _verify(path)
    assert proc.returncode == 0 and proc.stdout == (
        f"{path}: 3 records, chain intact (unsigned: written without an audit key)\n")


def test_a_respelled_line_that_keeps_its_hash_is_reported(signer, tmp_path):
    """The file writer respells a record without changing what it parses to (a JSON escape)
    or so that another reader sees something else (a repeated key: many readers take the
    first): the hash of the parsed record still matches, the bytes are not its canonical form."""
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    original = path.read_bytes()
    lines = original.split(b"\n")
    n = next(i for i, line in enumerate(lines) if b'"request_id":"r9"' in line)
    assert b'"op":"dek.decrypt"' in lines[n]
    for respelled in (lines[n].replace(b'"org":"acme"', b'"org":"\\u0061cme"'),
                      lines[n].replace(b'"op":"dek.decrypt"',
                                       b'"op":"tenant.destroy","op":"dek.decrypt"')):
        assert json.loads(respelled) == json.loads(lines[n])     # the same record, parsed
        path.write_bytes(b"\n".join(lines[:n] + [respelled] + lines[n + 1:]))
        proc = _verify(path, "--key", signer.fingerprint)
        assert proc.returncode == 1
        assert proc.stdout == (f"{path}: chain broken at line {n + 1}: it is not written in its "
                               "canonical form (escapes, spacing or a repeated key): the node "
                               "never writes such a line\n")
    path.write_bytes(original)
    assert _verify(path, "--key", signer.fingerprint).returncode == 0


@pytest.mark.parametrize("downgrade", ["keyless", "legacy"])
def test_the_newest_segment_replaced_by_an_unsigned_chain_fails_against_the_pin(
        signer, tmp_path, downgrade):
    """The file writer drops a record and every checkpoint from the newest segment, re-chains
    it, and makes it unsigned: `key` null in its segment.start, or no segment.start at all (a
    legacy segment). The chain holds; against the pinned key it must not pass."""
    _write(tmp_path, signer, DEKS)
    path = tmp_path / "audit-w0.jsonl"
    records = [r for r in _records(path)
               if r["op"] != "audit.checkpoint" and r.get("request_id") != "r1"]
    if downgrade == "keyless":
        records[0].update(key=None)
        records[0].pop("spki")
    else:
        records = records[1:]
    _rewrite(path, records)
    proc = _verify(path)
    assert proc.returncode == 0 and "chain intact" in proc.stdout      # without a pin: unsigned
    proc = _verify(path, "--key", signer.fingerprint)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == (
        f"{path}: the newest segment of its worker is not signed, so the pinned key covers "
        "none of it (an unsigned chain can be rewritten by anyone who can write the file)")
