"""The two databases behind the store, behind one small :class:`Backend` protocol.

Everything above this module speaks ``?``-placeholder SQL that both run; what differs (how to
connect, begin, lock a row, recognise a retryable or a unique-key failure, shred a destroyed
row's pages) is here and only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kms.errors import ConfigError, KmsError, StoreUnavailable

BUSY_TIMEOUT_S = 30.0
# One advisory lock serialises migrations across PostgreSQL nodes starting together.
_MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"hsm-suite kms.store migrations").digest()[:8],
                                 "big", signed=True)


class Backend(Protocol):
    kind: str               # "sqlite" | "postgresql"
    for_update: str         # appended to a SELECT that must lock the row it reads
    token_lock: str | None  # a statement that serialises every node's HSM key writes (below)
    bytes_type: str         # the column type of wrapped blobs in the migrations

    def connect(self) -> Any: ...
    def execute(self, conn: Any, sql: str, params: Sequence = ()) -> Any: ...
    def begin(self, conn: Any, *, migration: bool = False) -> None: ...
    def commit(self, conn: Any) -> None: ...
    def rollback_quietly(self, conn: Any) -> None: ...
    def close_quietly(self, conn: Any) -> None: ...
    def broken(self, conn: Any) -> bool: ...
    def retryable(self, exc: BaseException) -> bool: ...
    def driver_error(self, exc: BaseException) -> bool: ...
    def unreachable(self, exc: BaseException) -> bool: ...
    def unique_violation(self, exc: BaseException) -> bool: ...
    def describe(self, exc: BaseException) -> str: ...
    def after_destroy(self, conn: Any) -> None: ...


class _Common:
    """What both backends do the same way."""

    def execute(self, conn, sql: str, params: Sequence = ()):
        raise NotImplementedError

    def commit(self, conn) -> None:
        self.execute(conn, "COMMIT")

    def rollback_quietly(self, conn) -> None:
        with contextlib.suppress(Exception):
            self.execute(conn, "ROLLBACK")

    def close_quietly(self, conn) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


class SQLite(_Common):
    kind = "sqlite"
    for_update = ""           # BEGIN IMMEDIATE already holds the database write lock
    token_lock: str | None = None   # BEGIN IMMEDIATE serialises the nodes' HSM key writes too
    bytes_type = "BLOB"

    def __init__(self, path: Path):
        self.path = path

    def connect(self):
        if not self.path.exists():
            # Created 0600 before SQLite opens it (its -wal and -shm files copy the mode).
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as exc:
                raise StoreUnavailable(f"cannot create the store database {self.path}: "
                                       f"{exc.strerror}",
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
                    raise StoreUnavailable(f"cannot open the store database {self.path}: "
                                           f"{exc}") from None
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

    def broken(self, conn) -> bool:
        return False

    def retryable(self, exc) -> bool:
        return False          # the write lock is taken at BEGIN: no deadlock can follow it

    def driver_error(self, exc):
        return isinstance(exc, sqlite3.Error)

    def unreachable(self, exc):
        return isinstance(exc, sqlite3.OperationalError)   # locked, disk I/O, cannot open

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


class Postgres(_Common):
    kind = "postgresql"
    for_update = " FOR UPDATE"
    # One transaction-scoped advisory lock for every write of an org KEK to the token (the key
    # "kek" in ASCII): SoftHSM2 2.6.1 processes can miss each other's new objects when they
    # write the token at the same moment (kms.node.sealing.Keks).
    token_lock: str | None = "SELECT pg_advisory_xact_lock(7038315)"
    bytes_type = "BYTEA"

    def __init__(self, url: str):
        import psycopg  # a dependency; imported here so that SQLite nodes do not load it
        self.psycopg = psycopg
        self.url = url
        self._sql: dict[str, str] = {}

    def connect(self):
        try:
            conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                        application_name="hsm-suite-kms")
        except self.psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the PostgreSQL store: "
                                   f"{self.describe(exc)}",
                                   hint="check the URL, that the server runs, and pg_hba.conf") \
                from None
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

    def unreachable(self, exc):
        # Connection lost or refused, server shutting down, lock or statement timeout.
        return isinstance(exc, (self.psycopg.OperationalError, self.psycopg.InterfaceError))

    def unique_violation(self, exc):
        return getattr(exc, "sqlstate", None) == "23505"

    def describe(self, exc):
        state = getattr(exc, "sqlstate", None)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if state == "55P03":
            return f"a lock stayed held by another writer for over {BUSY_TIMEOUT_S:.0f} s ({text})"
        return f"{type(exc).__name__}{f' [SQLSTATE {state}]' if state else ''}: {text}"

    def after_destroy(self, conn) -> None:
        pass                  # the dead tuple stays until VACUUM reuses its space (docs/store.md)


def backend_for(url: str | os.PathLike) -> Backend:
    """``sqlite:///abs/path.db``, a plain file path, or ``postgresql://...``."""
    if not isinstance(url, (str, os.PathLike)):
        raise ConfigError(f"store URL must be a string, not {type(url).__name__}")
    url = os.fspath(url)
    if url.startswith(("postgresql://", "postgres://")):
        return Postgres(url)
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite://"):
            raise ConfigError(f"bad store URL {url!r}", hint="use sqlite:///absolute/path.db")
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise ConfigError(f"bad store URL {url!r}: the path must be absolute",
                              hint="use sqlite:///absolute/path.db, or give a plain file path")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise ConfigError(f"unsupported store URL {url!r}",
                          hint="use sqlite:///path.db, a plain file path, or postgresql://...")
    else:
        path = url
    if not path or Path(path).name == ":memory:" or path.startswith("file:"):
        raise ConfigError(f"the store needs a database file, not {path!r}",
                          hint="an in-memory database would be lost and cannot be shared")
    return SQLite(Path(path).absolute())
