"""The TenantSecret store: orgs, their wrapped tenant secrets, and the releases this KMS imported.

SQLite is the embedded default (one file, WAL, ``synchronous=FULL``, foreign keys on, a busy
timeout); PostgreSQL serves several KMS nodes. Both run the same numbered migrations
(``kms/migrations/NNNN_name.sql``, recorded in ``schema_migrations``, each in one transaction) and
the same SQL.

Guarantees
----------
* **One transaction per state change.** ``create_org``, ``add_secret`` (rate limit, version,
  wrap, archive, insert), ``destroy_secret``, ``import_rows`` and ``record_release`` each commit
  once or not at all, so a process killed at any point (tests SIGKILL it at every checkpoint
  below) leaves the old state or the new one.
* **No lost update.** Every write that touches an org's secrets first takes that org's lock:
  SQLite ``BEGIN IMMEDIATE`` (the database write lock; threads of one process also queue on an
  in-process lock, so only other processes wait in SQLite's busy handler), PostgreSQL
  ``SELECT ... FROM orgs WHERE org_id = $1 FOR UPDATE`` under READ COMMITTED (each later statement
  of the transaction sees everything committed before the lock was granted; other orgs are not
  blocked). A transaction is retried whole (``wrap`` included) only when nothing can have been
  committed: a deadlock/serialization failure (SQLSTATE 40P01/40001) or a connection lost before
  COMMIT was sent (a server restart also drops the pool's idle connections); a connection lost
  *during* COMMIT is reported as such. Connections come from a small pool (``pool_size``, default
  8), one per concurrent caller; a forked child opens its own and never touches the parent's.
* **Only wrapped material.** The store keeps the bytes the caller's ``wrap`` returns and never
  sees a plaintext secret; ``SecretRow.wrapped`` is left out of ``repr``. Destroying a secret sets
  it to NULL; SQLite runs with ``secure_delete`` and truncates its WAL after a destroy, so the
  bytes leave the database files (PostgreSQL keeps the dead tuple until VACUUM reuses its space,
  and its WAL/backups keep what they kept: the blob is useless without the HSM-held wrapping key).
* **Integrity.** Each row of ``orgs``, ``tenant_secrets`` and ``releases`` carries ``checksum`` =
  SHA-256 over its canonical, type-tagged fields (domain-separated per table). Every read checks
  it. A failing row raises :class:`CorruptRecord` naming the row (``.org_id``, ``.key_type``,
  ``.version`` for a secret); rows that pass are unaffected. Listing calls (``secrets``, ``orgs``,
  ``releases``, ``export_rows``) never drop a row silently: they raise one ``CorruptRecord``
  naming *every* failing row (``.records``) and carrying the rows that passed (``.intact``), so a
  caller that wants a partial listing can have it. ``verify()`` scans without raising. A checksum
  is not a MAC (anyone with write access can recompute it); tampering with a wrapped blob is caught
  by its AES-GCM binding to (tenant, key type, version), which is not this module's job.
  Operations that would have to trust or rewrite a corrupt row refuse, and only those: ``active``
  when a row newer than the one it would return is corrupt (it never silently falls back to an
  older key), ``add_secret`` when the key type's newest version (the rate-limit basis) or its
  ACTIVE row is corrupt, ``destroy_secret`` of the corrupt row, and any write for an org whose
  ``orgs`` row is corrupt. A corrupt row is never re-checksummed; other versions, key types and
  orgs keep working.

``wrap`` runs inside the write transaction and must not call the store (it would wait for the
lock its own transaction holds); doing so raises :class:`KmsError` at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kms import policy
from kms.errors import (
    CorruptRecord,
    ImportRefused,
    KmsError,
    PolicyViolation,
    RateLimited,
    UnknownTenant,
)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_S = 30.0
DEFAULT_POOL_SIZE = 8
WRITE_RETRIES = 5
# Test hook, named loudly: SIGKILL this process when a write reaches the named checkpoint
# ("add_secret:archived", "destroy_secret:updated", "import_rows:inserted", "commit", "committed").
KILL_ENV = "KMS_STORE_TEST_KILL_AT"

SECRET_FIELDS = ("org_id", "key_type", "version", "state", "source", "derivation", "release",
                 "wrapped", "iterations", "created_at", "usable_from", "destroyed_at")
_SECRET_COLUMNS = ("org_id, key_type, version, state, source, derivation, release_id, wrapped, "
                   "iterations, created_at, usable_from, destroyed_at, checksum")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"hsm-suite kms.store migrations").digest()[:8],
                                 "big", signed=True)


@dataclass(frozen=True)
class SecretRow:
    org_id: str
    key_type: str          # policy.KEY_TYPES
    version: int
    state: str             # policy.STATES
    source: str            # policy.SOURCES
    derivation: str        # policy.DERIVATIONS
    release: str | None    # release whose tenant wrapping key wrapped it
    wrapped: bytes | None = field(repr=False)   # None once DESTROYED (crypto-shredding)
    iterations: int        # PBKDF2 iterations recorded with the key
    created_at: float
    usable_from: float
    destroyed_at: float | None

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in SECRET_FIELDS}


def utc_iso(t: float) -> str:
    """UTC ISO 8601 to the second, rounded up (a "not before" time is never shown early)."""
    try:
        return datetime.fromtimestamp(math.ceil(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f} s after the Unix epoch"


# ----------------------------------------------------------------------------- row integrity
def _digest(table: str, values: Sequence[Any]) -> str:
    """SHA-256 over type-tagged, length-prefixed values: equal digests mean equal values *and*
    types (a version turned into text, or 1.0 into 1, fails the check)."""
    h = hashlib.sha256(f"hsm-suite/kms-store/{table}/v1".encode() + b"\x00")
    for v in values:
        if v is None:
            h.update(b"N")
        elif isinstance(v, bool):
            h.update(b"?bool")
        elif isinstance(v, int):
            raw = str(v).encode()
            h.update(b"I" + len(raw).to_bytes(4, "big") + raw)
        elif isinstance(v, float):
            h.update(b"F" + struct.pack(">d", v))
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            h.update(b"S" + len(raw).to_bytes(4, "big") + raw)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            raw = bytes(v)
            h.update(b"B" + len(raw).to_bytes(8, "big") + raw)
        else:
            h.update(b"?" + type(v).__name__.encode())
    return h.hexdigest()


def _secret_digest(values: Sequence[Any]) -> str:
    return _digest("tenant_secrets", values)


def _bytes_or_none(v):
    return bytes(v) if isinstance(v, (bytearray, memoryview)) else v


def _corrupt(record: tuple, message: str, hint: str) -> CorruptRecord:
    """One failed row: ``record`` is ("tenant_secrets", org, key type, version), ("orgs", org)
    or ("releases", release), as ``Store.verify`` reports them."""
    exc = CorruptRecord(message, hint=hint)
    table, *key = record
    key += [None] * (3 - len(key))
    exc.table = table
    exc.org_id, exc.key_type, exc.version = (None, None, None) if table == "releases" else key
    exc.records, exc.intact = [record], None
    return exc


def _corrupt_secret(org_id, key_type, version) -> CorruptRecord:
    return _corrupt(("tenant_secrets", org_id, key_type, version),
                    f"store row of org {org_id!r}, {key_type} secret v{version} failed its "
                    "integrity check (checksum mismatch)",
                    "the row was altered outside the KMS or the database is damaged; restore it "
                    "from a backup (kms tenant export/import); other rows are unaffected")


def _corrupt_many(what: str, records: list[tuple], intact: list) -> CorruptRecord:
    names = "; ".join(_record_name(r) for r in records)
    exc = CorruptRecord(
        f"{what}: {len(records)} store row(s) failed their integrity check: {names}",
        hint=f"the other {len(intact)} row(s) are intact (CorruptRecord.intact); restore the "
             "damaged rows from a backup")
    exc.records, exc.intact = records, intact
    first = records[0]
    exc.table = first[0]
    exc.org_id = first[1] if first[0] != "releases" else None
    exc.key_type = first[2] if first[0] == "tenant_secrets" else None
    exc.version = first[3] if first[0] == "tenant_secrets" else None
    return exc


def _record_name(record: tuple) -> str:
    if record[0] == "tenant_secrets":
        return f"org {record[1]!r} {record[2]} v{record[3]}"
    if record[0] == "orgs":
        return f"org {record[1]!r} (its orgs row)"
    return f"release {record[1]!r}"


def _corrupt_org(org_id) -> CorruptRecord:
    return _corrupt(("orgs", org_id),
                    f"store row of org {org_id!r} (orgs table) failed its integrity check",
                    "restore the org's row from a backup; other orgs are unaffected")


def _secret_from_db(row: Sequence[Any]) -> SecretRow:
    """A verified SecretRow from a raw ``_SECRET_COLUMNS`` tuple, else CorruptRecord."""
    values, checksum = [_bytes_or_none(v) for v in row[:-1]], row[-1]
    if _secret_digest(values) != checksum:
        raise _corrupt_secret(row[0], row[1], row[2])
    return SecretRow(*values)


def _secret_values(r: SecretRow) -> tuple:
    return tuple(getattr(r, name) for name in SECRET_FIELDS)


# ----------------------------------------------------------------------------- input checks
def _check_text(name: str, value, *, max_len: int = 255) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or _CONTROL.search(value):
        raise KmsError(f"{name} must be a non-empty string of at most {max_len} characters "
                       f"without control characters, not {value!r}")
    return value


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise KmsError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _check_time(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KmsError(f"{name} must be a finite number of seconds since the epoch, not {value!r}")
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or value >= 2 ** 63:
        raise KmsError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


# ----------------------------------------------------------------------------- backends
class _Backend:
    kind = "?"
    for_update = ""

    def connect(self): raise NotImplementedError
    def execute(self, conn, sql: str, params: Sequence = ()): raise NotImplementedError
    def begin(self, conn, *, migration: bool = False): raise NotImplementedError
    def close_quietly(self, conn) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def commit(self, conn) -> None:
        self.execute(conn, "COMMIT")

    def rollback_quietly(self, conn) -> None:
        with contextlib.suppress(Exception):
            self.execute(conn, "ROLLBACK")

    def broken(self, conn) -> bool:
        return False

    def retryable(self, exc: BaseException) -> bool:
        return False

    def driver_error(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def unique_violation(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]

    def after_destroy(self, conn) -> None:
        pass


class _SQLite(_Backend):
    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self.bytes_type = "BLOB"

    def connect(self):
        if not self.path.exists():
            # Created 0600 before SQLite opens it (its -wal and -shm files copy the mode).
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as exc:
                raise KmsError(f"cannot create the store database {self.path}: {exc.strerror}",
                               hint="the directory must exist and be writable") from None
        # Switching a new database to WAL while other connections open it can answer
        # SQLITE_BUSY without ever calling the busy handler (seen with 6 threads opening a fresh
        # store at once), so the set-up is retried for as long as a busy wait would last.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise KmsError(f"cannot open the store database {self.path}: {exc}") \
                        from None
                time.sleep(0.01 + random.random() * 0.04)

    def _connect_once(self):
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise KmsError(f"the store database {self.path} cannot use WAL (journal mode "
                               f"{mode!r})", hint="put it on a local file system")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
                raise KmsError("this SQLite library cannot enforce foreign keys")
        except BaseException:
            conn.close()
            raise
        return conn

    def execute(self, conn, sql, params=()):
        return conn.execute(sql, params)

    def begin(self, conn, *, migration=False):
        conn.execute("BEGIN IMMEDIATE")

    def driver_error(self, exc):
        return isinstance(exc, sqlite3.Error)

    def unique_violation(self, exc):
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def describe(self, exc):
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return (f"the database stayed locked by another writer for over {BUSY_TIMEOUT_S:.0f} s "
                    f"({exc})")
        return super().describe(exc)

    def after_destroy(self, conn):
        # Crypto-shredding: the row's old page images live on in the WAL until it is reset.
        # Best effort, waiting at most a second: a long reader can keep it from finishing (the
        # next destroy or SQLite's own checkpoints then overwrite those frames).
        try:
            conn.execute("PRAGMA busy_timeout = 1000")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")


class _Postgres(_Backend):
    kind = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise KmsError("a postgresql:// store needs the psycopg driver",
                           hint="pip install 'psycopg[binary]>=3.1'") from None
        self.psycopg = psycopg
        self.url = url
        self.bytes_type = "BYTEA"
        self._sql: dict[str, str] = {}

    def connect(self):
        try:
            conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                        application_name="hsm-suite-kms")
        except self.psycopg.Error as exc:
            raise KmsError(f"cannot connect to the PostgreSQL store: {self.describe(exc)}",
                           hint="check the URL, that the server runs, and pg_hba.conf") from None
        try:
            # Mirror SQLite's busy timeout: a lock held longer than this is an error, not a hang.
            conn.execute(f"SET lock_timeout = '{int(BUSY_TIMEOUT_S * 1000)}ms'")
        except BaseException:
            conn.close()
            raise
        return conn

    def execute(self, conn, sql, params=()):
        q = self._sql.get(sql)
        if q is None:
            q = self._sql[sql] = sql.replace("?", "%s")
        return conn.execute(q, params or None)

    def begin(self, conn, *, migration=False):
        conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        if migration:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))

    def broken(self, conn):
        return conn.closed or getattr(conn, "broken", False)

    def retryable(self, exc):
        return getattr(exc, "sqlstate", None) in ("40001", "40P01")

    def driver_error(self, exc):
        return isinstance(exc, self.psycopg.Error)

    def unique_violation(self, exc):
        return getattr(exc, "sqlstate", None) == "23505"

    def describe(self, exc):
        state = getattr(exc, "sqlstate", None)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if state == "55P03":
            return f"a lock stayed held by another writer for over {BUSY_TIMEOUT_S:.0f} s ({text})"
        return f"{type(exc).__name__}{f' [SQLSTATE {state}]' if state else ''}: {text}"


def _backend_for(url: str) -> _Backend:
    if not isinstance(url, (str, os.PathLike)):
        raise KmsError(f"store URL must be a string, not {type(url).__name__}")
    url = os.fspath(url)
    if url.startswith(("postgresql://", "postgres://")):
        return _Postgres(url)
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite://"):
            raise KmsError(f"bad store URL {url!r}", hint="use sqlite:///absolute/path.db")
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise KmsError(f"bad store URL {url!r}: the path must be absolute",
                           hint="use sqlite:///absolute/path.db, or give a plain file path")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise KmsError(f"unsupported store URL {url!r}",
                       hint="use sqlite:///path.db, a plain file path, or postgresql://...")
    else:
        path = url
    if not path or Path(path).name == ":memory:" or path.startswith("file:"):
        raise KmsError(f"the store needs a database file, not {path!r}",
                       hint="an in-memory database would be lost and cannot be shared")
    return _SQLite(Path(path).absolute())


# ----------------------------------------------------------------------------- migrations
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    sha256: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    directory = Path(directory)
    if not directory.is_dir():
        raise KmsError(f"store migrations not found in {directory}",
                       hint="the kms package was installed without kms/migrations/*.sql")
    found = []
    for p in sorted(directory.iterdir()):
        m = _MIGRATION_FILE.match(p.name)
        if m is None:
            if p.suffix == ".sql":
                raise KmsError(f"migration file {p.name} is not named NNNN_name.sql")
            continue
        text = p.read_text(encoding="utf-8")
        found.append(Migration(int(m.group(1)), m.group(2), text,
                               hashlib.sha256(text.encode()).hexdigest()))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise KmsError(f"migrations in {directory} must be numbered 0001, 0002, ... without gaps: "
                       f"{[m.version for m in found]}")
    return found


def _statements(sql: str, bytes_type: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    text = "\n".join(lines).replace("{bytes}", bytes_type)
    return [s.strip() for s in text.split(";") if s.strip()]


# ----------------------------------------------------------------------------- the store
class Store:
    """See the module docstring. Thread-safe; open one per process (after fork it reconnects)."""

    def __init__(self, backend: _Backend, *, pool_size: int = DEFAULT_POOL_SIZE):
        self._b = backend
        self.kind = backend.kind
        self._pool_size = max(1, int(pool_size))
        self._cond = threading.Condition()
        self._idle: list = []
        self._all: list = []
        self._abandoned: list = []      # connections inherited through fork: never used or closed
        self._closed = False
        self._pid = os.getpid()
        self._local = threading.local()
        # SQLite: threads of this process queue here, not in SQLite's sleeping busy handler.
        self._write_lock = threading.Lock() if backend.kind == "sqlite" else None
        self._kill_at = os.environ.get(KILL_ENV) or None

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
             migrations_dir: Path | None = None) -> Store:
        """``sqlite:///abs/path.db``, a plain file path, or ``postgresql://...``; creates or
        migrates the schema."""
        store = cls(_backend_for(url), pool_size=pool_size)
        try:
            store.migrate(load_migrations(migrations_dir or MIGRATIONS_DIR))
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conns, self._all, self._idle = self._all, [], []
            self._cond.notify_all()
        if os.getpid() == self._pid:
            for conn in conns:
                self._b.close_quietly(conn)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ connections
    def _after_fork(self) -> None:
        # A child must not use (or close: that would end the parent's session) what it inherited.
        # Its locks are replaced, not taken: a thread of the parent may have held them at fork.
        self._cond = threading.Condition()
        self._write_lock = threading.Lock() if self.kind == "sqlite" else None
        self._abandoned.extend(self._all)
        self._all, self._idle = [], []
        self._pid = os.getpid()

    @contextlib.contextmanager
    def _lease(self) -> Iterator[Any]:
        if getattr(self._local, "in_txn", False):
            raise KmsError("the store was called from inside one of its own transactions "
                           "(e.g. from a wrap callback)",
                           hint="a wrap callback must only wrap; it may not use the store")
        if os.getpid() != self._pid:
            self._after_fork()
        cond = self._cond
        with cond:
            while True:
                if self._closed:
                    raise KmsError("the store is closed")
                if self._idle:
                    conn = self._idle.pop()
                    break
                if len(self._all) < self._pool_size:
                    conn = None
                    self._all.append(placeholder := object())
                    break
                cond.wait()
        if conn is None:
            try:
                conn = self._b.connect()
            except BaseException:
                with cond:
                    self._all.remove(placeholder)
                    cond.notify()
                raise
            with cond:
                self._all[self._all.index(placeholder)] = conn
        try:
            yield conn
        finally:
            stale = []
            with cond:
                broken = self._b.broken(conn)
                bad = broken or self._closed or cond is not self._cond
                if bad:
                    if conn in self._all:
                        self._all.remove(conn)
                    if broken:
                        # The server went away (restart, failover): its idle siblings are dead too.
                        stale, self._idle = self._idle, []
                        for c in stale:
                            self._all.remove(c)
                else:
                    self._idle.append(conn)
                cond.notify_all()
            if bad and cond is self._cond:
                for c in (conn, *stale):
                    self._b.close_quietly(c)

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        for attempt in range(2):
            with self._lease() as conn:
                try:
                    return self._b.execute(conn, sql, params).fetchall()
                except Exception as exc:
                    if not self._b.driver_error(exc):
                        raise
                    if attempt == 0 and self._b.broken(conn):
                        continue      # a connection lost since its last use: once more, afresh
                    raise KmsError(f"store read failed: {self._b.describe(exc)}") from exc
        raise AssertionError("unreachable")

    def _write(self, operation: str, body: Callable[[Any], Any], *,
               after_commit: Callable[[Any, Any], None] | None = None) -> Any:
        """Run ``body(conn)`` in one write transaction and commit. Retried whole (``body`` runs
        again, ``wrap`` included) only when nothing can have been committed: a serialization or
        deadlock failure, or a connection lost before COMMIT was sent (PostgreSQL). Driver errors
        become KmsError; a connection lost *during* COMMIT is reported as such (the change may or
        may not have been made)."""
        for attempt in range(WRITE_RETRIES):
            with self._lease() as conn:
                lock = self._write_lock or contextlib.nullcontext()
                with lock:
                    committing = False
                    try:
                        self._local.in_txn = True
                        try:
                            self._b.begin(conn)
                            result = body(conn)
                            self._checkpoint("commit")
                            committing = True
                            self._b.commit(conn)
                        finally:
                            self._local.in_txn = False
                    except BaseException as exc:
                        self._b.rollback_quietly(conn)
                        if not self._b.driver_error(exc):
                            raise
                        lost = self._b.broken(conn)
                        if attempt + 1 < WRITE_RETRIES and (
                                self._b.retryable(exc) or (lost and not committing)):
                            time.sleep(0.005 * attempt)
                            continue
                        if lost and committing:
                            raise KmsError(f"{operation}: the connection to the store was lost "
                                           "during COMMIT, so it may or may not have been made",
                                           hint="read the state back before retrying") from exc
                        raise KmsError(f"{operation} failed in the store: "
                                       f"{self._b.describe(exc)}") from exc
                self._checkpoint("committed")
                if after_commit is not None:
                    after_commit(conn, result)
                return result
        raise AssertionError("unreachable")

    def _x(self, conn, sql: str, params: Sequence = ()):
        return self._b.execute(conn, sql, params)

    def _checkpoint(self, where: str) -> None:
        if self._kill_at is not None and self._kill_at == where:
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ migrations
    def migrate(self, migrations: list[Migration]) -> int:
        """Apply the pending migrations, each in its own transaction together with its
        ``schema_migrations`` row; refuse a database that is newer than the code or whose applied
        migrations were edited since. Returns the schema version."""
        known = {m.version: m for m in migrations}
        with self._lease() as conn:
            def run(fn):
                try:
                    self._b.begin(conn, migration=True)
                    out = fn()
                    self._b.commit(conn)
                    return out
                except BaseException as exc:
                    self._b.rollback_quietly(conn)
                    if self._b.driver_error(exc):
                        raise KmsError(f"store migration failed: {self._b.describe(exc)}") from exc
                    raise

            def applied() -> dict[int, str]:
                rows = self._x(conn, "SELECT version, sha256 FROM schema_migrations").fetchall()
                have = {int(v): sha for v, sha in rows}
                newer = sorted(v for v in have if v not in known)
                if newer:
                    raise KmsError(f"the store's schema is at migration {max(have)}, newer than "
                                   f"this code knows ({len(known)})",
                                   hint="upgrade hsm-suite on this node")
                for v, sha in have.items():
                    if known[v].sha256 != sha:
                        raise KmsError(f"migration {v:04d}_{known[v].name} was changed after it "
                                       "was applied to this store",
                                       hint="never edit an applied migration; add a new one")
                return have

            run(lambda: self._x(conn, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                                      "version BIGINT NOT NULL PRIMARY KEY, "
                                      "name TEXT NOT NULL, sha256 TEXT NOT NULL, "
                                      "applied_at DOUBLE PRECISION NOT NULL)"))
            have = run(applied)
            for m in (m for m in migrations if m.version not in have):
                def apply(m=m):
                    if m.version in applied():
                        return
                    for stmt in _statements(m.sql, self._b.bytes_type):
                        try:
                            self._x(conn, stmt)
                        except Exception as exc:
                            if self._b.driver_error(exc):
                                raise KmsError(f"store migration {m.version:04d}_{m.name} failed "
                                               f"(nothing of it applied): "
                                               f"{self._b.describe(exc)}") from exc
                            raise
                    self._checkpoint(f"migration:{m.version}")
                    self._x(conn, "INSERT INTO schema_migrations (version, name, sha256, "
                                  "applied_at) VALUES (?, ?, ?, ?)",
                            (m.version, m.name, m.sha256, time.time()))
                run(apply)
            return max(run(applied), default=0)

    def schema_version(self) -> int:
        rows = self._read("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    # ------------------------------------------------------------------ orgs
    def create_org(self, org_id: str, org_type: str) -> None:
        _check_text("org id", org_id)
        _check_choice("org type", org_type, policy.ORG_TYPES)
        created = time.time()
        checksum = _digest("orgs", (org_id, org_type, created))

        def body(conn):
            row = self._x(conn, "SELECT org_type FROM orgs WHERE org_id = ?", (org_id,)).fetchone()
            if row is not None:
                raise KmsError(f"org {org_id!r} already exists ({row[0]})")
            try:
                self._x(conn, "INSERT INTO orgs (org_id, org_type, created_at, checksum) "
                              "VALUES (?, ?, ?, ?)", (org_id, org_type, created, checksum))
            except Exception as exc:
                # PostgreSQL: another node created it between our SELECT and INSERT.
                if self._b.unique_violation(exc):
                    raise KmsError(f"org {org_id!r} already exists") from None
                raise
            self._checkpoint("create_org:inserted")
        self._write("create org", body)

    @staticmethod
    def _org_from_db(org_id, row) -> str:
        org_type, created, checksum = row
        if _digest("orgs", (org_id, org_type, created)) != checksum \
                or org_type not in policy.ORG_TYPES:
            raise _corrupt_org(org_id)
        return org_type

    def org_created(self, org_id: str) -> float:
        """When this store created the org: what binds a backup to the store it came from (an
        org recreated elsewhere, or in a new store, has another creation time)."""
        rows = self._read("SELECT org_type, created_at, checksum FROM orgs WHERE org_id = ?",
                          (org_id,))
        if not rows:
            raise UnknownTenant(f"unknown tenant: no org {org_id!r} in this KMS's store",
                                hint="create it with `kms tenant create`")
        self._org_from_db(org_id, rows[0])
        return float(rows[0][1])

    def org_type(self, org_id: str) -> str:
        rows = self._read("SELECT org_type, created_at, checksum FROM orgs WHERE org_id = ?",
                          (org_id,))
        if not rows:
            raise UnknownTenant(f"unknown tenant: no org {org_id!r} in this KMS's store",
                                hint="create it with `kms tenant create`")
        return self._org_from_db(org_id, rows[0])

    def orgs(self) -> list[tuple[str, str]]:
        rows = self._read("SELECT org_id, org_type, created_at, checksum FROM orgs "
                          "ORDER BY org_id")
        good, bad = [], []
        for org_id, *rest in rows:
            try:
                good.append((org_id, self._org_from_db(org_id, rest)))
            except CorruptRecord:
                bad.append(("orgs", org_id))
        if bad:
            raise _corrupt_many("listing orgs", bad, good)
        return good

    def _lock_org(self, conn, org_id: str) -> str:
        """Inside a write transaction: the org's type, after taking its lock (PostgreSQL row lock;
        SQLite already holds the database write lock)."""
        row = self._x(conn, "SELECT org_type, created_at, checksum FROM orgs WHERE org_id = ?"
                      + self._b.for_update, (org_id,)).fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant: no org {org_id!r} in this KMS's store",
                                hint="create it with `kms tenant create`")
        return self._org_from_db(org_id, row)

    # ------------------------------------------------------------------ secrets: writes
    def add_secret(self, org_id: str, key_type: str, *, source: str, derivation: str,
                   release: str | None, iterations: int, now: float,
                   wrap: Callable[[int], bytes], upload_sha256: str | None = None) -> SecretRow:
        """A new ACTIVE secret (version = max + 1) whose blob is ``wrap(version)``; the previous
        ACTIVE one becomes ARCHIVED. All in one transaction, rate limit included. With
        ``upload_sha256`` (a BYOK ciphertext's SHA-256) a ciphertext seen before is refused as a
        replay and the new one recorded, in the same transaction."""
        _check_text("org id", org_id)
        _check_choice("key type", key_type, policy.KEY_TYPES)
        _check_choice("source", source, policy.SOURCES)
        _check_choice("derivation", derivation, policy.DERIVATIONS)
        if release is not None:
            _check_text("release", release)
        _check_int("iterations", iterations, 1 if derivation == "PBKDF2" else 0)
        now = _check_time("now", now)
        if not callable(wrap):
            raise KmsError("wrap must be a callable taking the new version")
        usable_from = policy.usable_from(key_type, now)

        def body(conn):
            org_type = self._lock_org(conn, org_id)
            newest = self._x(conn, f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                                   "WHERE org_id = ? AND key_type = ? ORDER BY version DESC "
                                   "LIMIT 1", (org_id, key_type)).fetchone()
            newest = _secret_from_db(newest) if newest is not None else None
            if newest is not None:
                interval = policy.NEW_SECRET_INTERVAL[org_type]
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
                raise KmsError(f"wrap({version}) must return the wrapped secret as non-empty "
                               f"bytes, not {type(blob).__name__}")
            blob = bytes(blob)
            current = self._x(conn, f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                                    "WHERE org_id = ? AND key_type = ? AND state = 'ACTIVE'",
                              (org_id, key_type)).fetchone()
            if current is not None:
                old = _secret_from_db(current)
                archived = dataclasses.replace(old, state="ARCHIVED")
                self._update_secret(conn, old, archived)
                self._checkpoint("add_secret:archived")
            row = SecretRow(org_id, key_type, version, "ACTIVE", source, derivation, release,
                            blob, iterations, now, usable_from, None)
            self._insert_secret(conn, row)
            self._checkpoint("add_secret:inserted")
            return row
        return self._write("add secret", body)

    def destroy_secret(self, org_id: str, key_type: str, version: int, *,
                       now: float) -> SecretRow:
        """Crypto-shred: the wrapped blob becomes NULL, the state DESTROYED. Destroying a
        destroyed secret returns it unchanged. Database secrets live at least
        policy.DATABASE_MIN_LIFESPAN."""
        _check_text("org id", org_id)
        _check_choice("key type", key_type, policy.KEY_TYPES)
        _check_int("version", version, 1)
        now = _check_time("now", now)

        def body(conn):
            self._lock_org(conn, org_id)
            raw = self._x(conn, f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                                "WHERE org_id = ? AND key_type = ? AND version = ?",
                          (org_id, key_type, version)).fetchone()
            if raw is None:
                raise KmsError(f"org {org_id!r} has no {key_type} secret v{version}")
            old = _secret_from_db(raw)
            if old.state == "DESTROYED":
                return old, False
            if key_type == "database":
                earliest = old.created_at + policy.DATABASE_MIN_LIFESPAN
                if now < earliest:
                    raise PolicyViolation(
                        f"org {org_id!r}: database secret v{version} may not be destroyed before "
                        f"{utc_iso(earliest)} (minimum lifespan "
                        f"{policy.DATABASE_MIN_LIFESPAN / policy.DAY:g} days from its creation "
                        f"at {utc_iso(old.created_at)})")
            new = dataclasses.replace(old, state="DESTROYED", wrapped=None, destroyed_at=now)
            self._update_secret(conn, old, new)
            self._checkpoint("destroy_secret:updated")
            return new, True

        row, _changed = self._write(
            "destroy secret", body,
            after_commit=lambda conn, result: result[1] and self._b.after_destroy(conn))
        return row

    def _record_upload(self, conn, org_id: str, sha256_hex: str, now: float) -> None:
        if not _SHA256_HEX.match(sha256_hex or ""):
            raise KmsError("upload digest must be 64 lowercase hex characters")
        seen = self._x(conn, "SELECT uploaded_at FROM byok_uploads WHERE org_id = ? AND "
                             "ciphertext_sha256 = ?", (org_id, sha256_hex)).fetchone()
        if seen is not None:
            raise KmsError(f"org {org_id!r}: this encrypted secret was already uploaded at "
                           f"{utc_iso(seen[0])}; a replayed upload is refused",
                           hint="wrap a freshly generated secret (`kms byok wrap --generate`)")
        values = (org_id, sha256_hex, now)
        self._x(conn, "INSERT INTO byok_uploads (org_id, ciphertext_sha256, uploaded_at, "
                      "checksum) VALUES (?, ?, ?, ?)", (*values, _digest("byok_uploads", values)))

    # ------------------------------------------------------------------ customer keys
    def put_customer_key(self, org_id: str, kind: str, spec: dict, *, now: float) -> None:
        """Register (or replace) the org's EKM root key or BYOK certificate: public parameters
        only, as JSON."""
        _check_text("org id", org_id)
        _check_choice("customer key kind", kind, ("ekm", "byok"))
        now = _check_time("now", now)
        text = json.dumps(spec, sort_keys=True)

        def body(conn):
            self._lock_org(conn, org_id)
            self._x(conn, "DELETE FROM customer_keys WHERE org_id = ? AND kind = ?",
                    (org_id, kind))
            values = (org_id, kind, text, now)
            self._x(conn, "INSERT INTO customer_keys (org_id, kind, spec, created_at, checksum) "
                          "VALUES (?, ?, ?, ?, ?)", (*values, _digest("customer_keys", values)))
        self._write("register customer key", body)

    def customer_key(self, org_id: str, kind: str) -> dict | None:
        rows = self._read("SELECT org_id, kind, spec, created_at, checksum FROM customer_keys "
                          "WHERE org_id = ? AND kind = ?", (org_id, kind))
        if not rows:
            self.org_type(org_id)      # UnknownTenant first
            return None
        *values, checksum = rows[0]
        if _digest("customer_keys", values) != checksum:
            raise _corrupt(("customer_keys", org_id),
                           f"store row of org {org_id!r} ({kind} registration) failed its "
                           "integrity check", "register the key again")
        return json.loads(values[2])

    def _insert_secret(self, conn, row: SecretRow) -> None:
        values = _secret_values(row)
        try:
            self._x(conn, f"INSERT INTO tenant_secrets ({_SECRET_COLUMNS}) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, _secret_digest(values)))
        except Exception as exc:
            if self._b.unique_violation(exc):
                raise KmsError(f"org {row.org_id!r}: {row.key_type} secret v{row.version} "
                               "already exists, or a second ACTIVE one would") from None
            raise

    def _update_secret(self, conn, old: SecretRow, new: SecretRow) -> None:
        """Rewrite one verified row; the WHERE on the old checksum makes it a compare-and-set."""
        values = _secret_values(new)
        cur = self._x(conn, "UPDATE tenant_secrets SET state = ?, wrapped = ?, destroyed_at = ?, "
                            "checksum = ? WHERE org_id = ? AND key_type = ? AND version = ? "
                            "AND checksum = ?",
                      (new.state, new.wrapped, new.destroyed_at, _secret_digest(values),
                       old.org_id, old.key_type, old.version, _secret_digest(_secret_values(old))))
        if cur.rowcount != 1:
            raise KmsError(f"org {old.org_id!r}: {old.key_type} secret v{old.version} changed "
                           "during the transaction")

    # ------------------------------------------------------------------ secrets: reads
    def get(self, org_id: str, key_type: str, version: int) -> SecretRow:
        rows = self._read(f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                          "WHERE org_id = ? AND key_type = ? AND version = ?",
                          (org_id, key_type, version))
        if not rows:
            self.org_type(org_id)     # UnknownTenant first
            raise KmsError(f"org {org_id!r} has no {key_type} secret v{version}")
        return _secret_from_db(rows[0])

    def active(self, org_id: str, key_type: str, *, now: float) -> SecretRow | None:
        """The secret for NEW DEKs: the newest ACTIVE or ARCHIVED, not destroyed, usable
        (usable_from <= now) one. A database secret inside its activation delay is skipped, so
        the previous one keeps serving. None if there is none. Rows are checked newest first and
        a corrupt one stops the search (CorruptRecord) instead of falling back past it."""
        now = _check_time("now", now)
        rows = self._read(f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                          "WHERE org_id = ? AND key_type = ? ORDER BY version DESC",
                          (org_id, key_type))
        if not rows:
            self.org_type(org_id)     # UnknownTenant, or CorruptRecord for the org row
            return None
        for raw in rows:
            row = _secret_from_db(raw)
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
        good, bad = [], []
        for raw in self._read(f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets WHERE org_id = ? "
                              "ORDER BY key_type, version", (org_id,)):
            try:
                good.append(_secret_from_db(raw))
            except CorruptRecord:
                bad.append(("tenant_secrets", raw[0], raw[1], raw[2]))
        if bad:
            raise _corrupt_many(f"listing the secrets of org {org_id!r}", bad, good)
        return good

    def verify(self) -> list[tuple]:
        """Every row of the store that fails its integrity check, without raising:
        ``("orgs", org)``, ``("tenant_secrets", org, key_type, version)``, ``("releases", rel)``."""
        bad: list[tuple] = []
        for org_id, *rest in self._read("SELECT org_id, org_type, created_at, checksum FROM orgs "
                                        "ORDER BY org_id"):
            try:
                self._org_from_db(org_id, rest)
            except CorruptRecord:
                bad.append(("orgs", org_id))
        for raw in self._read(f"SELECT {_SECRET_COLUMNS} FROM tenant_secrets "
                              "ORDER BY org_id, key_type, version"):
            try:
                _secret_from_db(raw)
            except CorruptRecord:
                bad.append(("tenant_secrets", raw[0], raw[1], raw[2]))
        for rel, *rest in self._read("SELECT release_id, ceremony_id, bundle_sha256, recorded_at, "
                                     "checksum FROM releases ORDER BY release_id"):
            if not self._release_ok(rel, rest):
                bad.append(("releases", rel))
        return bad

    # ------------------------------------------------------------------ releases
    @staticmethod
    def _release_ok(release, rest) -> bool:
        ceremony_id, sha, recorded, checksum = rest
        return _digest("releases", (release, ceremony_id, sha, recorded)) == checksum

    def record_release(self, release: str, ceremony_id: str, bundle_sha256: str,
                       now: float) -> None:
        """Remember an imported release. Recording the same one again is a no-op; the same
        release from another ceremony or bundle is refused (ImportRefused)."""
        _check_text("release", release)
        _check_text("ceremony id", ceremony_id)
        if not isinstance(bundle_sha256, str) or not _SHA256_HEX.match(bundle_sha256):
            raise KmsError(f"bundle SHA-256 must be 64 lowercase hex digits, not "
                           f"{bundle_sha256!r}")
        now = _check_time("now", now)

        def body(conn):
            row = self._x(conn, "SELECT release_id, ceremony_id, bundle_sha256, recorded_at, "
                                "checksum FROM releases WHERE release_id = ?"
                          + self._b.for_update, (release,)).fetchone()
            if row is None:
                self._x(conn, "INSERT INTO releases (release_id, ceremony_id, bundle_sha256, "
                              "recorded_at, checksum) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (release_id) DO NOTHING",
                        (release, ceremony_id, bundle_sha256, now,
                         _digest("releases", (release, ceremony_id, bundle_sha256, now))))
                row = self._x(conn, "SELECT release_id, ceremony_id, bundle_sha256, "
                                    "recorded_at, checksum FROM releases WHERE release_id = ?",
                              (release,)).fetchone()
            if not self._release_ok(row[0], row[1:]):
                raise self._corrupt_release(release)
            if (row[1], row[2]) != (ceremony_id, bundle_sha256):
                raise ImportRefused(
                    f"release {release!r} is already recorded from ceremony {row[1]!r} "
                    f"(bundle {row[2][:16]}...); refusing ceremony {ceremony_id!r} "
                    f"(bundle {bundle_sha256[:16]}...)",
                    hint="a release is imported from exactly one ceremony's bundle")
        self._write("record release", body)

    @staticmethod
    def _corrupt_release(release) -> CorruptRecord:
        return _corrupt(("releases", release),
                        f"store row of release {release!r} failed its integrity check",
                        "re-import the release's bundle after investigating")

    def releases(self) -> dict[str, tuple[str, str]]:
        good, bad = {}, []
        for rel, *rest in self._read("SELECT release_id, ceremony_id, bundle_sha256, recorded_at, "
                                     "checksum FROM releases ORDER BY release_id"):
            if self._release_ok(rel, rest):
                good[rel] = (rest[0], rest[1])
            else:
                bad.append(("releases", rel))
        if bad:
            raise _corrupt_many("listing releases", bad, good)
        return good

    # ------------------------------------------------------------------ backup rows
    def export_rows(self, org_id: str) -> list[dict]:
        """The org's secret rows as plain dicts (SECRET_FIELDS + ``checksum``; ``wrapped`` is the
        wrapped blob or None), for a backup encrypted elsewhere. Corrupt rows: CorruptRecord."""
        return [{**row.as_dict(), "checksum": _secret_digest(_secret_values(row))}
                for row in self.secrets(org_id)]

    def import_rows(self, org_id: str, rows: list[dict]) -> None:
        """Insert exported rows into an existing org, all in one transaction or none. Refuses a
        version that already exists, a row of another org, a row failing its checksum, an
        inconsistent row, or a second ACTIVE secret for a key type."""
        _check_text("org id", org_id)
        if not isinstance(rows, (list, tuple)):
            raise KmsError("rows must be a list of dicts from export_rows")
        parsed = [self._row_from_export(org_id, i, r) for i, r in enumerate(rows)]
        keys = [(r.key_type, r.version) for r in parsed]
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)
        if dup:
            raise KmsError(f"import into org {org_id!r} refused: the rows repeat "
                           + ", ".join(f"{kt} v{v}" for kt, v in dup))
        for kt in policy.KEY_TYPES:
            act = [r.version for r in parsed if r.key_type == kt and r.state == "ACTIVE"]
            if len(act) > 1:
                raise KmsError(f"import into org {org_id!r} refused: the rows hold "
                               f"{len(act)} ACTIVE {kt} secrets ({act})")

        def body(conn):
            self._lock_org(conn, org_id)
            existing = self._x(conn, "SELECT key_type, version, state FROM tenant_secrets "
                                     "WHERE org_id = ?", (org_id,)).fetchall()
            have = {(kt, int(v)) for kt, v, _ in existing}
            clash = sorted(set(keys) & have)
            if clash:
                raise KmsError(f"import into org {org_id!r} refused (nothing imported): the store "
                               "already holds " + ", ".join(f"{kt} v{v}" for kt, v in clash),
                               hint="import only into an org that lacks these versions")
            for r in parsed:
                if r.state == "ACTIVE":
                    live = [int(v) for kt, v, st in existing
                            if kt == r.key_type and st == "ACTIVE"]
                    if live:
                        raise KmsError(f"import into org {org_id!r} refused (nothing imported): "
                                       f"the rows' ACTIVE {r.key_type} v{r.version} would be a "
                                       f"second ACTIVE one beside v{live[0]}")
            for r in parsed:
                self._insert_secret(conn, r)
            self._checkpoint("import_rows:inserted")
        self._write("import rows", body)

    @staticmethod
    def _row_from_export(org_id: str, i: int, r) -> SecretRow:
        where = f"import row {i}"
        if not isinstance(r, dict):
            raise KmsError(f"{where}: not a dict")
        extra = set(r) - set(SECRET_FIELDS) - {"checksum"}
        missing = set(SECRET_FIELDS) - set(r)
        if extra or missing:
            raise KmsError(f"{where}: " + "; ".join(
                p for p in (f"unknown fields {sorted(extra)}" if extra else "",
                            f"missing fields {sorted(missing)}" if missing else "") if p))
        if r["org_id"] != org_id:
            raise KmsError(f"{where} belongs to org {r['org_id']!r}, not {org_id!r}",
                           hint="a tenant's wrapped secrets are bound to that tenant")
        kt = _check_choice(f"{where}: key type", r["key_type"], policy.KEY_TYPES)
        version = _check_int(f"{where}: version", r["version"], 1)
        state = _check_choice(f"{where}: state", r["state"], policy.STATES)
        _check_choice(f"{where}: source", r["source"], policy.SOURCES)
        derivation = _check_choice(f"{where}: derivation", r["derivation"], policy.DERIVATIONS)
        if r["release"] is not None:
            _check_text(f"{where}: release", r["release"])
        _check_int(f"{where}: iterations", r["iterations"], 1 if derivation == "PBKDF2" else 0)
        wrapped = _bytes_or_none(r["wrapped"])
        destroyed_at = r["destroyed_at"]
        if state == "DESTROYED":
            if wrapped is not None or destroyed_at is None:
                raise KmsError(f"{where}: a DESTROYED row has no wrapped blob and a destroyed_at")
            destroyed_at = _check_time(f"{where}: destroyed_at", destroyed_at)
        elif not isinstance(wrapped, bytes) or not wrapped or destroyed_at is not None:
            raise KmsError(f"{where}: a {state} row has a wrapped blob and no destroyed_at")
        row = SecretRow(org_id, kt, version, state, r["source"], derivation, r["release"],
                        wrapped, r["iterations"],
                        _check_time(f"{where}: created_at", r["created_at"]),
                        _check_time(f"{where}: usable_from", r["usable_from"]), destroyed_at)
        if "checksum" in r and r["checksum"] != _secret_digest(_secret_values(row)):
            raise CorruptRecord(f"{where} ({kt} v{version}) fails its checksum: the backup "
                                "was altered or damaged; nothing imported")
        return row


__all__ = [
    "KILL_ENV",
    "SECRET_FIELDS",
    "Migration",
    "SecretRow",
    "Store",
    "load_migrations",
    "utc_iso",
]
