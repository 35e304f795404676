"""The repository: orgs, their wrapped tenant secrets, customer keys and imported releases, each
state change in one transaction (:mod:`kms.store.database`), every row checked on read
(:mod:`kms.store.records`), every argument checked at the door (:mod:`kms.store.checks`).

Operations that would have to trust or rewrite a corrupt row refuse, and only those: ``active``
when a row newer than the one it would return is corrupt (it never falls back to an older key),
``add_secret`` when the key type's newest version (the rate-limit basis) or its ACTIVE row is
corrupt, ``destroy_secret`` of the corrupt row, and any write for an org whose ``orgs`` row is
corrupt. A corrupt row is never re-checksummed; other versions, key types and orgs keep working.

``wrap`` runs inside the write transaction and must not call the store (it would wait for the
lock its own transaction holds); doing so raises :class:`KmsError` at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from kms import key_rules
from kms.errors import (
    ArgumentError,
    ArgumentTypeError,
    Conflict,
    CorruptRecord,
    ImportRefused,
    PolicyViolation,
    RateLimited,
    StoreUnavailable,
    UnknownTenant,
    UnknownVersion,
)

from . import checks
from .backends import backend_for
from .database import DEFAULT_POOL_SIZE, Database
from .migrations import MIGRATIONS_DIR, Migration, load_migrations, migrate
from .records import (
    ORG_COLUMNS,
    OrgRows,
    Resealed,
    RELEASE_COLUMNS,
    SECRET_COLUMNS,
    SECRET_FIELDS,
    SecretRow,
    bytes_or_none,
    checked_listing,
    checksum,
    corrupt,
    org_type_from_db,
    release_from_db,
    secret_checksum,
    secret_from_db,
    utc_iso,
)


class Sealer(Protocol):
    """What seals an org's state in the HSM (:class:`kms.node.sealing.Sealer`). A sealed write runs
    ``verify`` on the org's rows right after taking its lock (a write never builds on rows the
    HSM did not seal) and ``reseal`` after its change, in the same transaction; ``fresh`` names
    the versions whose ``wrapped`` is not under the org's KEK yet (just added or imported)."""

    def verify(self, rows: OrgRows) -> None: ...

    def reseal(self, rows: OrgRows, fresh: frozenset[tuple[str, int]]) -> Resealed: ...


class Store:
    """See :mod:`kms.store`. Thread-safe; open one per process (after fork it reconnects)."""

    def __init__(self, db: Database):
        self.db = db
        self.kind = db.backend.kind
        self._x = db.execute

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, url: str | os.PathLike, *, pool_size: int = DEFAULT_POOL_SIZE,
             migrations_dir: Path | None = None) -> Store:
        """``sqlite:///abs/path.db``, a plain file path, or ``postgresql://...``; creates or
        migrates the schema."""
        store = cls(Database(backend_for(url), pool_size=pool_size))
        try:
            store.migrate(load_migrations(migrations_dir or MIGRATIONS_DIR))
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def migrate(self, migrations: list[Migration]) -> int:
        """Apply the pending migrations (:mod:`kms.store.migrations`); the schema version."""
        return migrate(self.db, migrations)

    def schema_version(self) -> int:
        rows = self.db.read("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    # ------------------------------------------------------------------ orgs
    def create_org(self, org_id: str, org_type: str, *, sealer: Sealer | None = None) -> None:
        checks.text("org id", org_id)
        checks.choice("org type", org_type, key_rules.ORG_TYPES)
        created = time.time()
        row_sum = checksum("orgs", (org_id, org_type, created))

        def body(conn):
            row = self._x(conn, "SELECT org_type FROM orgs WHERE org_id = ?", (org_id,)).fetchone()
            if row is not None:
                raise Conflict(f"org {org_id!r} already exists ({row[0]})")
            try:
                self._x(conn, "INSERT INTO orgs (org_id, org_type, created_at, checksum) "
                              "VALUES (?, ?, ?, ?)", (org_id, org_type, created, row_sum))
            except Exception as exc:
                # PostgreSQL: another node created it between our SELECT and INSERT.
                if self.db.backend.unique_violation(exc):
                    raise Conflict(f"org {org_id!r} already exists") from None
                raise
            self.db.checkpoint("create_org:inserted")
            self._reseal(conn, org_id, sealer)
        self.db.write("create org", body)

    def _org_row(self, org_id: str) -> Sequence[Any]:
        rows = self.db.read(f"SELECT {ORG_COLUMNS} FROM orgs WHERE org_id = ?", (org_id,))
        if not rows:
            raise _unknown(org_id)
        return rows[0]

    def org_created(self, org_id: str) -> float:
        """When this store created the org: what binds a backup to the store it came from (an
        org recreated elsewhere, or in a new store, has another creation time)."""
        row = self._org_row(org_id)
        org_type_from_db(org_id, row, key_rules.ORG_TYPES)
        return float(row[1])

    def org_type(self, org_id: str) -> str:
        return org_type_from_db(org_id, self._org_row(org_id), key_rules.ORG_TYPES)

    def orgs(self) -> list[tuple[str, str]]:
        return checked_listing(
            "listing orgs",
            self.db.read(f"SELECT org_id, {ORG_COLUMNS} FROM orgs ORDER BY org_id"),
            lambda raw: (raw[0], org_type_from_db(raw[0], raw[1:], key_rules.ORG_TYPES)))

    def _lock_org(self, conn, org_id: str) -> str:
        """Inside a write transaction: the org's type, after taking its lock (PostgreSQL row lock;
        SQLite already holds the database write lock)."""
        row = self._x(conn, f"SELECT {ORG_COLUMNS} FROM orgs WHERE org_id = ?"
                      + self.db.backend.for_update, (org_id,)).fetchone()
        if row is None:
            raise _unknown(org_id)
        return org_type_from_db(org_id, row, key_rules.ORG_TYPES)

    # ------------------------------------------------------------------ secrets: writes
    def add_secret(self, org_id: str, key_type: str, *, source: str, derivation: str,
                   release: str | None, iterations: int, now: float,
                   wrap: Callable[[int], bytes], upload_sha256: str | None = None,
                   sealer: Sealer | None = None) -> SecretRow:
        """A new ACTIVE secret (version = max + 1) whose blob is ``wrap(version)``; the previous
        ACTIVE one becomes ARCHIVED. All in one transaction, rate limit included. With
        ``upload_sha256`` (a BYOK ciphertext's SHA-256) a ciphertext seen before is refused as a
        replay and the new one recorded, in the same transaction."""
        checks.text("org id", org_id)
        checks.secret_fields("", key_type=key_type, source=source, derivation=derivation,
                             release=release, iterations=iterations)
        now = checks.timestamp("now", now)
        if upload_sha256 is not None:
            checks.sha256_hex("upload digest", upload_sha256)
        if not callable(wrap):
            raise ArgumentTypeError("wrap must be a callable taking the new version")
        usable_from = key_rules.usable_from(key_type, now)

        def body(conn):
            org_type = self._lock_org(conn, org_id)
            self._verify_sealed(conn, org_id, sealer)
            newest = self._x(conn, f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                                   "WHERE org_id = ? AND key_type = ? ORDER BY version DESC "
                                   "LIMIT 1", (org_id, key_type)).fetchone()
            newest = secret_from_db(newest) if newest is not None else None
            if newest is not None:
                interval = key_rules.NEW_SECRET_INTERVAL[org_type]
                next_allowed = newest.created_at + interval
                if now < next_allowed:
                    raise RateLimited(
                        f"org {org_id!r}: one new {key_type} secret per {interval / 3600:g} h "
                        f"for {org_type} orgs; v{newest.version} was created "
                        f"{utc_iso(newest.created_at)}; next allowed at {utc_iso(next_allowed)}",
                        next_allowed=next_allowed)
            if upload_sha256 is not None:
                self._record_upload(conn, org_id, upload_sha256, now)
            version = newest.version + 1 if newest is not None else 1
            blob = wrap(version)
            if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
                raise ArgumentError(f"wrap({version}) must return the wrapped secret as non-empty "
                                    f"bytes, not {type(blob).__name__}")
            blob = bytes(blob)
            current = self._x(conn, f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                                    "WHERE org_id = ? AND key_type = ? AND state = 'ACTIVE'",
                              (org_id, key_type)).fetchone()
            if current is not None:
                old = secret_from_db(current)
                self._update_secret(conn, old, dataclasses.replace(old, state="ARCHIVED"))
                self.db.checkpoint("add_secret:archived")
            row = SecretRow(org_id, key_type, version, "ACTIVE", source, derivation, release,
                            blob, iterations, now, usable_from, None)
            self._insert_secret(conn, row)
            self.db.checkpoint("add_secret:inserted")
            resealed = self._reseal(conn, org_id, sealer, {(key_type, version)})
            if resealed is not None:
                row = dataclasses.replace(row, wrapped=resealed.wrapped[(key_type, version)])
            return row
        return self.db.write("add secret", body)

    def destroy_secret(self, org_id: str, key_type: str, version: int, *,
                       now: float, sealer: Sealer | None = None) -> SecretRow:
        """Crypto-shred: the wrapped blob becomes NULL, the state DESTROYED. Destroying a
        destroyed secret returns it unchanged. Database secrets live at least
        key_rules.DATABASE_MIN_LIFESPAN."""
        checks.text("org id", org_id)
        checks.choice("key type", key_type, key_rules.KEY_TYPES)
        checks.integer("version", version, 1)
        now = checks.timestamp("now", now)

        def body(conn):
            self._lock_org(conn, org_id)
            self._verify_sealed(conn, org_id, sealer)
            raw = self._x(conn, f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                                "WHERE org_id = ? AND key_type = ? AND version = ?",
                          (org_id, key_type, version)).fetchone()
            if raw is None:
                raise _no_version(org_id, key_type, version)
            old = secret_from_db(raw)
            if old.state == "DESTROYED":
                return old, False
            if key_type == "database":
                earliest = old.created_at + key_rules.DATABASE_MIN_LIFESPAN
                if now < earliest:
                    raise PolicyViolation(
                        f"org {org_id!r}: database secret v{version} may not be destroyed before "
                        f"{utc_iso(earliest)} (minimum lifespan "
                        f"{key_rules.DATABASE_MIN_LIFESPAN / key_rules.DAY:g} days from its "
                        "creation "
                        f"at {utc_iso(old.created_at)})")
            new = dataclasses.replace(old, state="DESTROYED", wrapped=None, destroyed_at=now)
            self._update_secret(conn, old, new)
            self.db.checkpoint("destroy_secret:updated")
            self._reseal(conn, org_id, sealer)
            return new, True

        def shred(conn, result) -> None:
            if result[1]:       # destroyed now, not before: clear the old page images too
                self.db.backend.after_destroy(conn)

        row, _changed = self.db.write("destroy secret", body, after_commit=shred)
        return row

    def _record_upload(self, conn, org_id: str, sha256_hex: str, now: float) -> None:
        seen = self._x(conn, "SELECT uploaded_at FROM byok_uploads WHERE org_id = ? AND "
                             "ciphertext_sha256 = ?", (org_id, sha256_hex)).fetchone()
        if seen is not None:
            raise Conflict(f"org {org_id!r}: this encrypted secret was already uploaded at "
                           f"{utc_iso(seen[0])}; a replayed upload is refused",
                           hint="wrap a freshly generated secret (`kms byok wrap --generate`)")
        values = (org_id, sha256_hex, now)
        self._x(conn, "INSERT INTO byok_uploads (org_id, ciphertext_sha256, uploaded_at, "
                      "checksum) VALUES (?, ?, ?, ?)", (*values, checksum("byok_uploads", values)))

    def _insert_secret(self, conn, row: SecretRow) -> None:
        try:
            self._x(conn, f"INSERT INTO tenant_secrets ({SECRET_COLUMNS}) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row.values(), secret_checksum(row)))
        except Exception as exc:
            if self.db.backend.unique_violation(exc):
                raise Conflict(f"org {row.org_id!r}: {row.key_type} secret v{row.version} "
                               "already exists, or a second ACTIVE one would") from None
            raise

    def _update_secret(self, conn, old: SecretRow, new: SecretRow) -> None:
        """Rewrite one verified row; the WHERE on the old checksum makes it a compare-and-set."""
        cur = self._x(conn, "UPDATE tenant_secrets SET state = ?, wrapped = ?, destroyed_at = ?, "
                            "checksum = ? WHERE org_id = ? AND key_type = ? AND version = ? "
                            "AND checksum = ?",
                      (new.state, new.wrapped, new.destroyed_at, secret_checksum(new),
                       old.org_id, old.key_type, old.version, secret_checksum(old)))
        if cur.rowcount != 1:
            raise Conflict(f"org {old.org_id!r}: {old.key_type} secret v{old.version} changed "
                           "during the transaction")

    # ------------------------------------------------------------------ sealed org state
    def store_id(self) -> str:
        """This store's random id (made on first use): it names the store's KEKs in a token
        that several stores may share (tests do; a region's token serves one store)."""
        rows = self.db.read("SELECT value FROM store_meta WHERE name = 'store_id'")
        if rows:
            return str(rows[0][0])
        new = os.urandom(8).hex()

        def body(conn):
            self._x(conn, "INSERT INTO store_meta (name, value) VALUES ('store_id', ?) "
                          "ON CONFLICT (name) DO NOTHING", (new,))
            return str(self._x(conn, "SELECT value FROM store_meta "
                                     "WHERE name = 'store_id'").fetchone()[0])
        return self.db.write("name the store", body)

    def org_head(self, org_id: str) -> tuple[int | None, bytes | None]:
        """The org's generation and seal: one indexed read, what a node compares with the state
        it verified last (the hot path)."""
        rows = self.db.read("SELECT generation, seal FROM orgs WHERE org_id = ?", (org_id,))
        if not rows:
            raise _unknown(org_id)
        generation, seal = rows[0]
        return (None if generation is None else int(generation)), bytes_or_none(seal)

    def org_generations(self) -> dict[str, int | None]:
        """Every org's committed generation (None: not sealed yet), for the start-up sweep."""
        return {str(org): (None if g is None else int(g))
                for org, g in self.db.read("SELECT org_id, generation FROM orgs")}

    def org_rows(self, org_id: str) -> OrgRows:
        """All of the org's rows, consistent: every write to an org changes its generation, so
        rows read between two equal reads of (generation, seal) belong to that generation."""
        for _attempt in range(8):
            head = self.org_head(org_id)
            rows = self._org_rows(None, org_id)
            if (rows.generation, rows.seal) == head == self.org_head(org_id):
                return rows
        raise StoreUnavailable(f"org {org_id!r} kept changing while its rows were read",
                               hint="retry; the org is being changed by another node")

    def _org_rows(self, conn, org_id: str) -> OrgRows:
        def q(sql: str) -> list:
            if conn is None:
                return self.db.read(sql, (org_id,))
            return self._x(conn, sql, (org_id,)).fetchall()
        org = q("SELECT org_type, created_at, checksum, generation, sealed_state, seal "
                "FROM orgs WHERE org_id = ?")
        if not org:
            raise _unknown(org_id)
        org_type = org_type_from_db(org_id, org[0][:3], key_rules.ORG_TYPES)
        secrets = checked_listing(f"reading the rows of org {org_id!r}",
                                  q(f"SELECT {SECRET_COLUMNS} FROM tenant_secrets WHERE "
                                    "org_id = ? ORDER BY key_type, version"), secret_from_db)
        keys = {}
        for kind, spec, created, stored in q("SELECT kind, spec, created_at, checksum FROM "
                                             "customer_keys WHERE org_id = ?"):
            if checksum("customer_keys", (org_id, kind, spec, created)) != stored:
                raise corrupt(("customer_keys", org_id),
                              f"store row of org {org_id!r} ({kind} registration) failed its "
                              "integrity check", "register the key again")
            keys[str(kind)] = (str(spec), float(created))
        uploads = {}
        for sha, at, stored in q("SELECT ciphertext_sha256, uploaded_at, checksum FROM "
                                 "byok_uploads WHERE org_id = ?"):
            if checksum("byok_uploads", (org_id, sha, at)) != stored:
                raise corrupt(("byok_uploads", org_id),
                              f"store row of org {org_id!r} (BYOK upload {sha[:16]}...) failed "
                              "its integrity check", "restore it from a backup")
            uploads[str(sha)] = float(at)
        _, created, _, generation, state, seal = org[0]
        return OrgRows(org_id, org_type, float(created),
                       None if generation is None else int(generation), state,
                       bytes_or_none(seal), tuple(secrets), keys, uploads)

    def _verify_sealed(self, conn, org_id: str, sealer: Sealer | None) -> None:
        if sealer is not None:
            sealer.verify(self._org_rows(conn, org_id))

    def _reseal(self, conn, org_id: str, sealer: Sealer | None,
                fresh: set[tuple[str, int]] | None = None) -> Resealed | None:
        """Inside a write: the org's next generation, every surviving blob re-wrapped and the
        state sealed; the generation is compare-and-swapped, so two writers never both win."""
        if sealer is None:
            return None
        self._token_lock(conn)
        rows = self._org_rows(conn, org_id)
        out = sealer.reseal(rows, frozenset(fresh or ()))
        for row in rows.secrets:
            if row.state != "DESTROYED":
                self._update_secret(conn, row, dataclasses.replace(
                    row, wrapped=out.wrapped[(row.key_type, row.version)]))
        where, params = ("generation IS NULL", ()) if rows.generation is None else \
            ("generation = ?", (rows.generation,))
        cur = self._x(conn, "UPDATE orgs SET generation = ?, sealed_state = ?, seal = ? "
                            f"WHERE org_id = ? AND {where}",
                      (out.generation, out.sealed_state, out.seal, org_id, *params))
        if cur.rowcount != 1:
            raise Conflict(f"org {org_id!r}: its state changed during the transaction "
                           f"(generation {rows.generation} is no longer current)")
        self.db.checkpoint("reseal:updated")
        return out

    def _token_lock(self, conn) -> None:
        if self.db.backend.token_lock:
            self._x(conn, self.db.backend.token_lock)

    def under_token_lock(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` while no other node writes an org KEK (kms.node.sealing: the token's writers
        take turns, so each sees the others' objects)."""
        def body(conn):
            self._token_lock(conn)
            return fn()
        return self.db.write("write org keys", body)

    def under_org_lock(self, org_id: str, fn: Callable[[int | None], Any]) -> Any:
        """``fn(the org's committed generation)`` while holding the org's write lock (the
        start-up sweep: a change in flight on another node is waited for)."""
        def body(conn):
            self._lock_org(conn, org_id)
            self._token_lock(conn)
            g = self._x(conn, "SELECT generation FROM orgs WHERE org_id = ?",
                        (org_id,)).fetchone()[0]
            return fn(None if g is None else int(g))
        return self.db.write("settle org keys", body)

    def seal_unsealed(self, org_id: str, sealer: Sealer) -> bool:
        """Seal an org of a store made before sealing (its blobs are all fresh); False if it
        was sealed already (by another node)."""
        def body(conn):
            self._lock_org(conn, org_id)
            rows = self._org_rows(conn, org_id)
            if rows.generation is not None:
                return False
            self._reseal(conn, org_id, sealer, {(r.key_type, r.version) for r in rows.secrets
                                                 if r.state != "DESTROYED"})
            return True
        return bool(self.db.write("seal org", body))

    # ------------------------------------------------------------------ customer keys
    def put_customer_key(self, org_id: str, kind: str, spec: dict, *, now: float,
                         sealer: Sealer | None = None) -> None:
        """Register (or replace) the org's EKM root key or BYOK certificate: public parameters
        only, as JSON."""
        checks.text("org id", org_id)
        checks.choice("customer key kind", kind, ("ekm", "byok"))
        now = checks.timestamp("now", now)
        text = json.dumps(spec, sort_keys=True)

        def body(conn):
            self._lock_org(conn, org_id)
            self._verify_sealed(conn, org_id, sealer)
            self._x(conn, "DELETE FROM customer_keys WHERE org_id = ? AND kind = ?",
                    (org_id, kind))
            values = (org_id, kind, text, now)
            self._x(conn, "INSERT INTO customer_keys (org_id, kind, spec, created_at, checksum) "
                          "VALUES (?, ?, ?, ?, ?)", (*values, checksum("customer_keys", values)))
            self._reseal(conn, org_id, sealer)
        self.db.write("register customer key", body)

    def customer_key(self, org_id: str, kind: str) -> dict | None:
        rows = self.db.read("SELECT org_id, kind, spec, created_at, checksum FROM customer_keys "
                            "WHERE org_id = ? AND kind = ?", (org_id, kind))
        if not rows:
            self.org_type(org_id)      # UnknownTenant first
            return None
        *values, stored = rows[0]
        if checksum("customer_keys", values) != stored:
            raise corrupt(("customer_keys", org_id),
                          f"store row of org {org_id!r} ({kind} registration) failed its "
                          "integrity check", "register the key again")
        return json.loads(values[2])

    # ------------------------------------------------------------------ secrets: reads
    def get(self, org_id: str, key_type: str, version: int) -> SecretRow:
        rows = self.db.read(f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                            "WHERE org_id = ? AND key_type = ? AND version = ?",
                            (org_id, key_type, version))
        if not rows:
            self.org_type(org_id)     # UnknownTenant first
            raise _no_version(org_id, key_type, version)
        return secret_from_db(rows[0])

    def active(self, org_id: str, key_type: str, *, now: float) -> SecretRow | None:
        """The secret for NEW DEKs: the newest ACTIVE or ARCHIVED, not destroyed, usable
        (usable_from <= now) one. A database secret inside its activation delay is skipped, so
        the previous one keeps serving. None if there is none. Rows are checked newest first and
        a corrupt one stops the search (CorruptRecord) instead of falling back past it."""
        now = checks.timestamp("now", now)
        rows = self.db.read(f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                            "WHERE org_id = ? AND key_type = ? ORDER BY version DESC",
                            (org_id, key_type))
        if not rows:
            self.org_type(org_id)     # UnknownTenant, or CorruptRecord for the org row
            return None
        for raw in rows:
            row = secret_from_db(raw)
            if row.state == "DESTROYED":
                # Destroying the newest secret must not quietly revive an older (perhaps
                # rotated-out-for-compromise) one: the org needs a new secret.
                return None
            if row.usable_from <= now:
                return row
            # else: a secret inside its activation delay - the previous one keeps serving
        return None

    def secrets(self, org_id: str) -> list[SecretRow]:
        """All of an org's secrets, by key type then version. If any row fails its check, raises
        one CorruptRecord naming every failing row (``.records``) with the rest in ``.intact``."""
        self.org_type(org_id)
        return checked_listing(
            f"listing the secrets of org {org_id!r}",
            self.db.read(f"SELECT {SECRET_COLUMNS} FROM tenant_secrets WHERE org_id = ? "
                         "ORDER BY key_type, version", (org_id,)),
            secret_from_db)

    def verify(self) -> list[tuple]:
        """Every row of the store that fails its integrity check, without raising:
        ``("orgs", org)``, ``("tenant_secrets", org, key_type, version)``, ``("releases", rel)``."""
        bad: list[tuple] = []
        for listing in (self.orgs, self._all_secrets, self._release_rows):
            try:
                listing()
            except CorruptRecord as exc:
                bad.extend(exc.records)
        return bad

    def _all_secrets(self) -> list[SecretRow]:
        return checked_listing(
            "listing all secrets",
            self.db.read(f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                         "ORDER BY org_id, key_type, version"),
            secret_from_db)

    # ------------------------------------------------------------------ releases
    def _release_rows(self, conn=None, release: str | None = None,
                      lock: bool = False) -> list[tuple[str, tuple[str, str]]]:
        """The one releases query: all of them (ordered), or one, in a transaction (``conn``)
        with its row lock (``lock``) or not. Every row checked."""
        sql = f"SELECT {RELEASE_COLUMNS} FROM releases"
        params: tuple = ()
        if release is not None:
            sql, params = sql + " WHERE release_id = ?", (release,)
        else:
            sql += " ORDER BY release_id"
        if lock:
            sql += self.db.backend.for_update
        raws = self._x(conn, sql, params).fetchall() if conn is not None \
            else self.db.read(sql, params)
        if release is not None:
            return [release_from_db(raw) for raw in raws]     # one row: its own CorruptRecord
        return checked_listing("listing releases", raws, release_from_db)

    def record_release(self, release: str, ceremony_id: str, bundle_sha256: str,
                       now: float) -> None:
        """Remember an imported release. Recording the same one again is a no-op; the same
        release from another ceremony or bundle is refused (ImportRefused)."""
        checks.text("release", release)
        checks.text("ceremony id", ceremony_id)
        checks.sha256_hex("bundle SHA-256", bundle_sha256)
        now = checks.timestamp("now", now)

        def body(conn):
            found = self._release_rows(conn, release, lock=True)
            if not found:
                self._x(conn, "INSERT INTO releases (release_id, ceremony_id, bundle_sha256, "
                              "recorded_at, checksum) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (release_id) DO NOTHING",
                        (release, ceremony_id, bundle_sha256, now,
                         checksum("releases", (release, ceremony_id, bundle_sha256, now))))
                found = self._release_rows(conn, release)
            _, (had_ceremony, had_sha) = found[0]
            if (had_ceremony, had_sha) != (ceremony_id, bundle_sha256):
                raise ImportRefused(
                    f"release {release!r} is already recorded from ceremony {had_ceremony!r} "
                    f"(bundle {had_sha[:16]}...); refusing ceremony {ceremony_id!r} "
                    f"(bundle {bundle_sha256[:16]}...)",
                    hint="a release is imported from exactly one ceremony's bundle")
        self.db.write("record release", body)

    def releases(self) -> dict[str, tuple[str, str]]:
        """Each imported release: ``{release: (ceremony id, bundle SHA-256)}``; a corrupt row
        raises CorruptRecord with the intact ones as such a dict."""
        try:
            return dict(self._release_rows())
        except CorruptRecord as exc:
            exc.intact = dict(exc.intact or [])
            raise

    # ------------------------------------------------------------------ backup rows
    def export_rows(self, org_id: str) -> list[dict]:
        """The org's secret rows as plain dicts (SECRET_FIELDS + ``checksum``; ``wrapped`` is the
        wrapped blob or None), for a backup encrypted elsewhere. Corrupt rows: CorruptRecord."""
        return [{**row.as_dict(), "checksum": secret_checksum(row)}
                for row in self.secrets(org_id)]

    def import_rows(self, org_id: str, rows: list[dict], *,
                    sealer: Sealer | None = None) -> None:
        """Insert exported rows into an existing org, all in one transaction or none. Refuses a
        version that already exists, a row of another org, a row failing its checksum, an
        inconsistent row, or a second ACTIVE secret for a key type."""
        checks.text("org id", org_id)
        if not isinstance(rows, (list, tuple)):
            raise ArgumentTypeError("rows must be a list of dicts from export_rows")
        parsed = [_row_from_export(org_id, i, r) for i, r in enumerate(rows)]
        keys = [(r.key_type, r.version) for r in parsed]
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)
        if dup:
            raise ArgumentError(f"import into org {org_id!r} refused: the rows repeat "
                                + ", ".join(f"{kt} v{v}" for kt, v in dup))
        for kt in key_rules.KEY_TYPES:
            act = [r.version for r in parsed if r.key_type == kt and r.state == "ACTIVE"]
            if len(act) > 1:
                raise ArgumentError(f"import into org {org_id!r} refused: the rows hold "
                                    f"{len(act)} ACTIVE {kt} secrets ({act})")

        def body(conn):
            self._lock_org(conn, org_id)
            self._verify_sealed(conn, org_id, sealer)
            existing = self._x(conn, "SELECT key_type, version, state FROM tenant_secrets "
                                     "WHERE org_id = ?", (org_id,)).fetchall()
            have = {(kt, int(v)) for kt, v, _ in existing}
            clash = sorted(set(keys) & have)
            if clash:
                raise Conflict(f"import into org {org_id!r} refused (nothing imported): the store "
                               "already holds " + ", ".join(f"{kt} v{v}" for kt, v in clash),
                               hint="import only into an org that lacks these versions")
            for r in parsed:
                if r.state == "ACTIVE":
                    live = [int(v) for kt, v, st in existing
                            if kt == r.key_type and st == "ACTIVE"]
                    if live:
                        raise Conflict(f"import into org {org_id!r} refused (nothing imported): "
                                       f"the rows' ACTIVE {r.key_type} v{r.version} would be a "
                                       f"second ACTIVE one beside v{live[0]}")
            for r in parsed:
                self._insert_secret(conn, r)
            self.db.checkpoint("import_rows:inserted")
            self._reseal(conn, org_id, sealer,
                         {(r.key_type, r.version) for r in parsed if r.state != "DESTROYED"})
        self.db.write("import rows", body)


def _unknown(org_id: str) -> UnknownTenant:
    return UnknownTenant(f"unknown tenant: no org {org_id!r} in this KMS's store",
                         hint="create it with `kms tenant create`")


def _no_version(org_id: str, key_type: str, version: int) -> UnknownVersion:
    return UnknownVersion(f"org {org_id!r} has no {key_type} secret v{version}")


def _row_from_export(org_id: str, i: int, r) -> SecretRow:
    where = f"import row {i}"
    if not isinstance(r, dict):
        raise ArgumentTypeError(f"{where}: not a dict")
    extra = set(r) - set(SECRET_FIELDS) - {"checksum"}
    missing = set(SECRET_FIELDS) - set(r)
    if extra or missing:
        raise ArgumentError(f"{where}: " + "; ".join(
            p for p in (f"unknown fields {sorted(extra)}" if extra else "",
                        f"missing fields {sorted(missing)}" if missing else "") if p))
    if r["org_id"] != org_id:
        raise ArgumentError(f"{where} belongs to org {r['org_id']!r}, not {org_id!r}",
                            hint="a tenant's wrapped secrets are bound to that tenant")
    checks.secret_fields(f"{where}: ", key_type=r["key_type"], source=r["source"],
                         derivation=r["derivation"], release=r["release"],
                         iterations=r["iterations"])
    version = checks.integer(f"{where}: version", r["version"], 1)
    state = checks.choice(f"{where}: state", r["state"], key_rules.STATES)
    wrapped = bytes_or_none(r["wrapped"])
    destroyed_at = r["destroyed_at"]
    if state == "DESTROYED":
        if wrapped is not None or destroyed_at is None:
            raise ArgumentError(f"{where}: a DESTROYED row has no wrapped blob and a "
                                "destroyed_at")
        destroyed_at = checks.timestamp(f"{where}: destroyed_at", destroyed_at)
    elif not isinstance(wrapped, bytes) or not wrapped or destroyed_at is not None:
        raise ArgumentError(f"{where}: a {state} row has a wrapped blob and no destroyed_at")
    row = SecretRow(org_id, r["key_type"], version, state, r["source"], r["derivation"],
                    r["release"], wrapped, r["iterations"],
                    checks.timestamp(f"{where}: created_at", r["created_at"]),
                    checks.timestamp(f"{where}: usable_from", r["usable_from"]), destroyed_at)
    if "checksum" in r and r["checksum"] != secret_checksum(row):
        raise CorruptRecord(f"{where} ({r['key_type']} v{version}) fails its checksum: the "
                            "backup was altered or damaged; nothing imported")
    return row
