"""Each org's state, sealed in the regional HSM under a per-org key-encryption key (KEK) that is
replaced, and the old one destroyed, at every change of that state.

Why: the database writer can edit, delete and restore older copies of rows; a checksum they can
recompute. So the HSM holds, for each org, one AES-256 KEK (:mod:`hsm.keys.orgkek`: a token object
no
PIN holder can read, copy or re-purpose) and the store holds:

* every live tenant secret wrapped twice: inside, as before, AES-GCM under the release's tenant
  wrapping key (so DEKs do not change); outside, AES-GCM under the org's KEK;
* ``orgs.sealed_state``: the org's whole state as canonical JSON (every version's columns and the
  SHA-256 of its blob, the customer key registrations with the CA bundle's *bytes*, the BYOK
  upload records) and ``orgs.seal``, an AES-GCM tag over it made in the HSM with the KEK.

Every change (create, rotate, upload, destroy, a registration, an import) makes KEK ``g+1`` in
the token, re-wraps the surviving versions under it, seals the new state, commits with a
compare-and-swap on ``g``, then destroys KEK ``g``. A copy of any row or of the whole database
made before then names KEK ``g``, which the token no longer has: it yields nothing, and the org
is refused (:class:`RolledBack`). An edit to the current rows fails the comparison with the
sealed state, naming the org, the version and the column (:class:`CorruptRecord`).

A node keeps each org's verified state (:class:`OrgView`) and per request reads only the org's
``(generation, seal)``; the view is re-checked in the token at least every :data:`RECHECK_S`
seconds, which is the bound within which a node notices a KEK another node destroyed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from hsm.keys import orgkek
from hsm.core.errors import DecryptionFailed
from hsm.core.token import Token

from kms.errors import CorruptRecord, RolledBack, UnknownVersion
from kms.store.records import OrgRows, Resealed, SecretRow

STATE_FORMAT = "hsm-suite org state v1"
SEAL_AAD = b"hsm-suite org seal v1"
WRAP_AAD = b"hsm-suite org kek wrap v1"
LABEL_PREFIX = "kms-kek"
RECHECK_S = 1.0
FIND_RETRY_PAUSES_S = (0.02, 0.05, 0.1, 0.3, None)
# The columns of a version the sealed state records (the blob is recorded by its SHA-256).
SEALED_COLUMNS = ("state", "source", "derivation", "release", "iterations", "created_at",
                  "usable_from", "destroyed_at")


def kek_label(store_id: str, org_id: str, generation: int) -> str:
    # The org id goes last: it may hold spaces, and the label is split on the first three.
    return f"{LABEL_PREFIX} {store_id} {generation} {org_id}"


def parse_label(label: str) -> tuple[str, int, str] | None:
    parts = label.split(" ", 3)
    if len(parts) != 4 or parts[0] != LABEL_PREFIX or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


def _lp(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _key(row: SecretRow) -> str:
    return f"{row.key_type} v{row.version}"


def canonical(state: dict) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def state_of(rows: OrgRows, generation: int, wrapped: dict[tuple[str, int], bytes]) -> dict:
    """The sealed state: what decides whether, how and where each of the org's keys is used."""
    secrets = {}
    for row in rows.secrets:
        blob = wrapped.get((row.key_type, row.version))
        secrets[_key(row)] = {**{c: getattr(row, c) for c in SEALED_COLUMNS},
                              "wrapped_sha256": hashlib.sha256(blob).hexdigest()
                              if blob is not None else None}
    return {"format": STATE_FORMAT, "org": rows.org_id, "generation": generation,
            "org_type": rows.org_type, "created_at": rows.created_at, "secrets": secrets,
            "customer_keys": {kind: {"spec": spec, "created_at": at}
                              for kind, (spec, at) in rows.customer_keys.items()},
            "uploads": dict(rows.uploads)}


# ----------------------------------------------------------------------------- KEK handles
class Keks:
    """The KEKs in the token, found with one search at start and kept as handles (never a
    search per request: SoftHSM2 walks every object on each one). A KEK another node made is
    found by its label once, when this node first meets its generation."""

    def __init__(self, token: Token, store_id: str):
        self.token = token
        self.store_id = store_id
        self._lock = threading.Lock()
        self._handles: dict[tuple[str, int], int] = {}    # this store's: (org, gen) -> handle
        self._elsewhere: set[str] = set()                 # orgs with a KEK of another store id
        # The search before each write (below). Only a single-process bulk load (the scale
        # benchmark's setup) may switch it off.
        self.refresh_before_write = True

    def load(self) -> None:
        handles, elsewhere, twice = {}, set(), set()
        for handle, label in orgkek.find_all(self.token).items():
            parsed = parse_label(label)
            if parsed is None:
                continue
            store, gen, org = parsed
            if store == self.store_id:
                if (org, gen) in handles:
                    twice.add((org, gen))
                handles[(org, gen)] = handle
            else:
                elsewhere.add(org)
        # Two objects under one KEK's label: one was planted (a user-PIN holder can create any
        # object). Neither is taken on trust here: a lookup by label (orgkek.find) refuses the
        # pair, and a lone object only with the KEK policy.
        for key in twice:
            del handles[key]
        with self._lock:
            self._handles, self._elsewhere = handles, elsewhere

    def label(self, org_id: str, generation: int) -> str:
        return kek_label(self.store_id, org_id, generation)

    def handle(self, org_id: str, generation: int) -> int | None:
        with self._lock:
            handle = self._handles.get((org_id, generation))
        if handle is None:
            handle = self._find(self.label(org_id, generation))
            if handle is not None:
                with self._lock:
                    self._handles[(org_id, generation)] = handle
        return handle

    def _find(self, label: str) -> int | None:
        """One search; if it finds nothing, a few more over about half a second. SoftHSM2 2.6.1
        keeps one view of the token per process and refreshes it when the token's generation
        counter moves; when two processes write the token at once, one of them can miss the
        other's new object until a later write (measured: found again within 50 ms)."""
        for pause in FIND_RETRY_PAUSES_S:
            handle = orgkek.find(self.token, label)
            if handle is not None or pause is None:
                return handle
            time.sleep(pause)
        return None

    def use(self, org_id: str, generation: int, fn: Callable[[int, str], bytes]) -> bytes:
        """``fn(handle, label)`` with the KEK; :class:`orgkek.KekGone` if the token no longer
        holds it. A handle that stopped working is looked up by label once: every session
        closed (C_CloseAllSessions) invalidates handles of objects that still exist."""
        label = self.label(org_id, generation)
        handle = self.handle(org_id, generation)
        if handle is None:
            raise orgkek.KekGone(f"no org key-encryption key {label!r} in the token",
                                 object_label=label)
        try:
            return fn(handle, label)
        except orgkek.KekGone:
            self.forget(org_id, generation)
            again = self.handle(org_id, generation)
            if again is None:
                raise
            return fn(again, label)

    def generations(self, org_id: str) -> list[int]:
        with self._lock:
            return sorted(g for org, g in self._handles if org == org_id)

    def all(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._handles)

    def sealed_anywhere(self, org_id: str) -> bool:
        """Does the token hold any KEK for this org id, of any store? (An org sealed once is
        never sealed again as if it were new: see :meth:`Sealing.seal_unsealed`.)"""
        with self._lock:
            return org_id in self._elsewhere or any(org == org_id for org, _ in self._handles)

    def create(self, org_id: str, generation: int) -> int:
        """Under the store's token lock (every node's KEK writes take turns): one search
        first, so this process's view of the token takes in every other node's writes before
        its own write moves the token's change counter past them (SoftHSM2 2.6.1 would
        otherwise never show it those objects)."""
        if self.refresh_before_write:
            orgkek.find(self.token, self.label(org_id, generation))
        handle = orgkek.generate(self.token, self.label(org_id, generation))
        with self._lock:
            self._handles[(org_id, generation)] = handle
        return handle

    def forget(self, org_id: str, generation: int) -> None:
        with self._lock:
            self._handles.pop((org_id, generation), None)

    def destroy(self, org_id: str, generation: int) -> bool:
        """Destroy the KEK (if this node knows or can find it); False if it was gone. Under
        the store's token lock, like :meth:`create`; the search refreshes this process's view."""
        label = self.label(org_id, generation)
        self.forget(org_id, generation)
        handle = orgkek.find(self.token, label)
        if handle is None:
            return False
        return orgkek.destroy(self.token, handle, label)


# ----------------------------------------------------------------------------- a verified org
@dataclass
class OrgView:
    """An org's state as verified in the HSM: what a node decides from."""

    org_id: str
    org_type: str
    generation: int
    seal: bytes = field(repr=False)
    digest: bytes
    secrets: dict[tuple[str, int], SecretRow] = field(repr=False)
    customer_keys: dict[str, dict]
    checked: float = 0.0
    # key type -> its rows, newest version first (a view's secrets never change once verified;
    # sorting them on every DEK fetch was measurable)
    _newest_first: dict[str, list[SecretRow]] = field(default_factory=dict, repr=False,
                                                       compare=False)

    def get(self, key_type: str, version: int) -> SecretRow:
        row = self.secrets.get((key_type, version))
        if row is None:
            raise UnknownVersion(f"org {self.org_id!r} has no {key_type} secret v{version}")
        return row

    def active(self, key_type: str, now: float) -> SecretRow | None:
        """The newest usable version for new DEKs (as ``Store.active``): a destroyed newest one
        means none (never a quiet fall-back to an older key)."""
        rows = self._newest_first.get(key_type)
        if rows is None:
            rows = self._newest_first[key_type] = [
                row for (kt, _v), row in sorted(self.secrets.items(), key=lambda kv: -kv[0][1])
                if kt == key_type]
        for row in rows:
            if row.state == "DESTROYED":
                return None
            if row.usable_from <= now:
                return row
        return None

    def rows(self) -> list[SecretRow]:
        return [self.secrets[k] for k in sorted(self.secrets)]


# ----------------------------------------------------------------------------- sealing
class Sealing:
    """Wrap, unwrap, seal and verify one store's orgs with their KEKs."""

    def __init__(self, token: Token, keks: Keks, checkpoint: Callable[[str], None],
                 under_token_lock: Callable[[Callable[[], object]], object]):
        self.token = token
        self.keks = keks
        self.checkpoint = checkpoint
        self.under_token_lock = under_token_lock

    # --------------------------------------------------------------- blobs
    def _aad(self, org_id: str, row: SecretRow, generation: int) -> bytes:
        return _lp(WRAP_AAD, org_id.encode(), row.key_type.encode(), str(row.version).encode(),
                   str(generation).encode())

    def wrap(self, org_id: str, generation: int, row: SecretRow, inner: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.keks.use(org_id, generation, lambda h, label: orgkek.encrypt(
            self.token, h, label, nonce, inner, self._aad(org_id, row, generation)))

    def unwrap(self, org_id: str, generation: int, row: SecretRow) -> bytes:
        """The release-wrapped tenant secret inside a row's blob (under KEK ``generation``)."""
        blob = row.wrapped
        if blob is None:
            raise CorruptRecord(f"org {org_id!r}: {_key(row)} has no wrapped blob")
        try:
            return self.keks.use(org_id, generation, lambda h, label: orgkek.decrypt(
                self.token, h, label, blob[:12], blob[12:], self._aad(org_id, row, generation)))
        except orgkek.KekGone:
            raise self._rolled_back(org_id, generation) from None
        except DecryptionFailed:
            raise CorruptRecord(
                f"org {org_id!r}: {_key(row)}: its wrapped blob failed its authentication in "
                f"the HSM under the org's key-encryption key (generation {generation})",
                hint="the blob was altered or copied from another version; restore the store "
                     "from its newest backup",
                records=[("tenant_secrets", org_id, row.key_type, row.version)]) from None

    def _rolled_back(self, org_id: str, generation: int) -> RolledBack:
        held = self.keks.generations(org_id)
        return RolledBack(
            f"org {org_id!r}: the store holds its state of generation {generation}, whose "
            "key-encryption key the HSM no longer holds"
            + (f" (it holds generation {held[-1]})" if held else "")
            + ": the org's rows or the database were restored from an older copy; nothing of "
              "the org is served",
            hint="restore the store from a copy made after the org's last change (see "
                 "docs/store.md, \"Backups\"); a destroyed key cannot come back",
            records=[("orgs", org_id)])

    # --------------------------------------------------------------- seals
    def _seal_aad(self, org_id: str, generation: int, digest: bytes) -> bytes:
        return _lp(SEAL_AAD, org_id.encode(), str(generation).encode(), digest)

    def seal(self, org_id: str, generation: int, text: str) -> bytes:
        nonce = os.urandom(12)
        digest = hashlib.sha256(text.encode()).digest()
        return nonce + self.keks.use(org_id, generation, lambda h, label: orgkek.encrypt(
            self.token, h, label, nonce, b"", self._seal_aad(org_id, generation, digest)))

    def _check_seal(self, org_id: str, generation: int, seal: bytes, digest: bytes) -> None:
        try:
            self.keks.use(org_id, generation, lambda h, label: orgkek.decrypt(
                self.token, h, label, seal[:12], seal[12:],
                self._seal_aad(org_id, generation, digest)))
        except orgkek.KekGone:
            raise self._rolled_back(org_id, generation) from None
        except DecryptionFailed:
            raise CorruptRecord(
                f"org {org_id!r}: its sealed state (generation {generation}) failed "
                "authentication in the HSM: orgs.sealed_state or orgs.seal was altered",
                hint="restore the store from its newest backup; do not edit rows by hand",
                records=[("orgs", org_id)]) from None

    def sealed(self, rows: OrgRows) -> dict:
        """The org's sealed state, its seal checked in the HSM (the rows are not compared)."""
        return self._sealed(rows)[0]

    def _sealed(self, rows: OrgRows) -> tuple[dict, bytes]:
        org_id = rows.org_id
        if rows.generation is None or rows.sealed_state is None or rows.seal is None:
            raise CorruptRecord(
                f"org {org_id!r} is not sealed in the HSM (a store made before per-org keys, "
                "or its generation, state or seal column was cleared)",
                hint="a store made by an earlier version is sealed at the KMS's first start; "
                     "an org sealed once is never sealed again", records=[("orgs", org_id)])
        digest = hashlib.sha256(rows.sealed_state.encode()).digest()
        self._check_seal(org_id, rows.generation, rows.seal, digest)
        sealed = json.loads(rows.sealed_state)
        if sealed.get("org") != org_id or sealed.get("generation") != rows.generation:
            raise CorruptRecord(f"org {org_id!r}: the sealed state is of org "
                                f"{sealed.get('org')!r}, generation {sealed.get('generation')}",
                                records=[("orgs", org_id)])
        return sealed, digest

    def verify(self, rows: OrgRows, *, missing_ok: frozenset[str] = frozenset()) -> OrgView:
        """The org's rows checked against the state sealed in the HSM: a view to serve from, or
        :class:`RolledBack` / :class:`CorruptRecord` naming the org, the version and what
        differs. ``missing_ok``: versions ("field v1") whose rows a backup is restoring."""
        org_id = rows.org_id
        sealed, digest = self._sealed(rows)
        assert rows.generation is not None and rows.seal is not None
        wrapped = {(r.key_type, r.version): r.wrapped for r in rows.secrets
                   if r.wrapped is not None}
        found = state_of(rows, rows.generation, wrapped)
        problems = [(k, what) for k, what in _differences(sealed, found)
                    if not (k in missing_ok and k not in found["secrets"])]
        if problems:
            records = [("tenant_secrets", org_id, k.rsplit(" v", 1)[0], int(k.rsplit(" v", 1)[1]))
                       for k, _ in problems if k]
            raise CorruptRecord(
                f"org {org_id!r}: the store does not match the state sealed in the HSM "
                f"(generation {rows.generation}): " + "; ".join(
                    f"{k}: {what}" if k else what for k, what in problems),
                hint="the rows were edited, deleted or restored outside the KMS; restore the "
                     "store from its newest backup", records=records or [("orgs", org_id)])
        return OrgView(org_id, rows.org_type, rows.generation, rows.seal, digest,
                       {(r.key_type, r.version): r for r in rows.secrets},
                       {kind: json.loads(spec) for kind, (spec, _) in
                        rows.customer_keys.items()}, time.monotonic())

    def recheck(self, view: OrgView) -> None:
        """The view's seal once more in the token: fails (RolledBack) once its KEK is gone."""
        self._check_seal(view.org_id, view.generation, view.seal, view.digest)
        view.checked = time.monotonic()


def _differences(sealed: dict, found: dict) -> list[tuple[str, str]]:
    """(version or "", what differs) for every way the rows differ from the sealed state."""
    out: list[tuple[str, str]] = []
    for name in ("org_type", "created_at"):
        if sealed.get(name) != found[name]:
            out.append(("", f"the org's {name} is {found[name]!r} in the store, "
                            f"{sealed.get(name)!r} in the sealed state"))
    s_rows, f_rows = sealed.get("secrets", {}), found["secrets"]
    for key in sorted(set(s_rows) | set(f_rows)):
        if key not in f_rows:
            out.append((key, f"its row is missing from the store (the sealed state has it "
                             f"{s_rows[key]['state']})"))
        elif key not in s_rows:
            out.append((key, "a row the sealed state does not hold"))
        else:
            for col in (*SEALED_COLUMNS, "wrapped_sha256"):
                if s_rows[key].get(col) != f_rows[key][col]:
                    what = "the wrapped blob" if col == "wrapped_sha256" else col
                    out.append((key, f"{what} is {_show(col, f_rows[key][col])} in the store, "
                                     f"{_show(col, s_rows[key].get(col))} in the sealed state"))
    s_keys, f_keys = sealed.get("customer_keys", {}), found["customer_keys"]
    for kind in sorted(set(s_keys) | set(f_keys)):
        if s_keys.get(kind) == f_keys.get(kind):
            continue
        if kind not in f_keys or kind not in s_keys:
            out.append(("", f"the {kind} registration is "
                            f"{'missing from' if kind not in f_keys else 'not sealed but in'} "
                            "the store"))
            continue
        a, b = json.loads(s_keys[kind]["spec"]), json.loads(f_keys[kind]["spec"])
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if s_keys[kind]["created_at"] != f_keys[kind]["created_at"]:
            changed.append("created_at")
        out.append(("", f"the {kind} registration's {', '.join(changed)} differ(s) from the "
                        "sealed state"))
    s_up, f_up = sealed.get("uploads", {}), found["uploads"]
    for sha in sorted(set(s_up) | set(f_up)):
        if s_up.get(sha) != f_up.get(sha):
            where = "missing from the store" if sha not in f_up else \
                "not sealed" if sha not in s_up else "altered"
            out.append(("", f"the BYOK upload record {sha[:16]}... is {where}"))
    return out


def _show(col: str, value) -> str:
    if col == "wrapped_sha256":
        return "absent" if value is None else f"sha256 {str(value)[:12]}..."
    return repr(value)


# ----------------------------------------------------------------------------- one change
class Sealer:
    """Seals one change of one org (the store calls ``verify`` and ``reseal`` inside its write
    transaction). After the store returns, :meth:`committed` destroys the KEKs the new state no
    longer names; if it failed, :meth:`failed` destroys the KEK made for a state that was never
    committed - unless the commit's outcome is unknown, which the start-up sweep settles."""

    def __init__(self, sealing: Sealing, org_id: str,
                 transform: Callable[[SecretRow, bytes], bytes] | None = None,
                 restoring: frozenset[str] = frozenset()):
        self.sealing = sealing
        self.org_id = org_id
        self.transform = transform
        self.restoring = restoring
        self.old: int | None = None
        self.new: int | None = None
        self._made: dict[int, int] = {}      # generation -> handle of KEKs this change made

    def verify(self, rows: OrgRows) -> None:
        self.sealing.verify(rows, missing_ok=self.restoring)

    def reseal(self, rows: OrgRows, fresh: frozenset[tuple[str, int]]) -> Resealed:
        keks, org_id = self.sealing.keks, self.org_id
        self.old = rows.generation
        # An org created anew after its rows were deleted, or after a crash left a KEK
        # behind, starts above every generation the token still holds for it.
        new = max([rows.generation or 0, *keks.generations(org_id)]) + 1
        self.new = new
        if new not in self._made:     # a retried transaction (PostgreSQL) reuses its KEK
            self._made[new] = keks.create(org_id, new)
        self.sealing.checkpoint("seal:new-kek")
        wrapped: dict[tuple[str, int], bytes] = {}
        for row in rows.secrets:
            if row.state == "DESTROYED":
                continue
            key = (row.key_type, row.version)
            if key in fresh:
                assert row.wrapped is not None
                inner = row.wrapped
            else:
                assert rows.generation is not None
                inner = self.sealing.unwrap(org_id, rows.generation, row)
            if self.transform is not None:
                inner = self.transform(row, inner)
            wrapped[key] = self.sealing.wrap(org_id, new, row, inner)
        text = canonical(state_of(rows, new, wrapped))
        return Resealed(new, text, self.sealing.seal(org_id, new, text), wrapped)

    def committed(self) -> list[int]:
        """Destroy every older KEK of the org; the generations destroyed."""
        keks = self.sealing.keks
        gone = [g for g in keks.generations(self.org_id) if self.new is not None and g < self.new]
        if gone:
            self.sealing.under_token_lock(lambda: [keks.destroy(self.org_id, g) for g in gone])
        self.sealing.checkpoint("seal:old-kek-destroyed")
        return gone

    def failed(self, committed_generation: int | None) -> None:
        """After the store raised: ``committed_generation`` is what the store holds now (None
        if it could not be read, which leaves everything to the start-up sweep)."""
        if committed_generation is None:
            return
        if self.new is not None and committed_generation == self.new:
            self.committed()           # COMMIT went through after all
            return
        made = list(self._made)
        if made:
            self.sealing.under_token_lock(
                lambda: [self.sealing.keks.destroy(self.org_id, g) for g in made])


def sweep(keks: Keks, committed: dict[str, int | None],
          under_lock: Callable[[str, Callable[[int | None], list[str]]], list[str]]
          ) -> list[str]:
    """At start: destroy every KEK of this store the committed state no longer names. A KEK
    older than the org's generation was superseded (a crash after COMMIT); a newer one belongs
    to a change that never committed - but only while the committed generation's KEK is still
    there: if it is not, the store was rolled back, and nothing is destroyed. Each org is
    settled under its store lock (``under_lock(org, fn)`` calls ``fn(committed generation)``),
    so a change another node is making right now (its new KEK made, not committed yet) is
    waited for, never swept from under it."""
    lines = []
    by_org: dict[str, list[int]] = {}
    for org, g in keks.all():
        by_org.setdefault(org, []).append(g)
    for org, gens in sorted(by_org.items()):
        if org not in committed:
            lines.append(f"org {org!r}: the HSM holds its key-encryption key(s) "
                         f"{gens} but this store has no such org: left in place")
        elif gens != [committed[org]] and committed[org] is not None:
            lines += under_lock(org, functools.partial(_settle, keks, org, gens))
    return lines


def _settle(keks: Keks, org: str, gens: list[int], current: int | None) -> list[str]:
    if current is None:
        return []
    if current not in gens and keks.handle(org, current) is None:
        return [f"org {org!r}: the store names generation {current}, the HSM holds {gens}: "
                "the store was rolled back; the org is refused"] if max(gens) > current else []
    lines = []
    for g in gens:
        if g != current and keks.destroy(org, g):
            lines.append(f"org {org!r}: destroyed key-encryption key generation {g} (the "
                         f"committed state is generation {current})")
    return lines
