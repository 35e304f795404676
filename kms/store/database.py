"""Connections and transactions: a small pool, one write transaction per state change, retried
whole only when nothing can have been committed.

Every write that touches an org's secrets first takes that org's lock (the repository does it
with :attr:`Backend.for_update`): SQLite ``BEGIN IMMEDIATE`` takes the database write lock, and
threads of one process also queue on an in-process lock so that only other processes wait in
SQLite's busy handler; PostgreSQL locks the org's row under READ COMMITTED. A transaction is run
again (its ``wrap`` callback included) after a deadlock or serialization failure, or a connection
lost before COMMIT was sent; a connection lost *during* COMMIT is reported as such. A forked
child opens its own connections and never touches (or closes) the parent's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kms.errors import KmsError, StoreUnavailable

from .backends import Backend

DEFAULT_POOL_SIZE = 8
WRITE_RETRIES = 5
# Test hook, named loudly: SIGKILL this process when a write reaches the named checkpoint
# ("add_secret:archived", "destroy_secret:updated", "import_rows:inserted", "commit", "committed").
KILL_ENV = "KMS_STORE_TEST_KILL_AT"


class Database:
    """Thread-safe; one per process (after a fork it reconnects)."""

    def __init__(self, backend: Backend, *, pool_size: int = DEFAULT_POOL_SIZE):
        self.backend = backend
        self._pool_size = max(1, int(pool_size))
        self._cond = threading.Condition()
        self._idle: list = []
        self._all: list = []
        self._abandoned: list = []      # connections inherited through fork: never used or closed
        self._closed = False
        self._pid = os.getpid()
        self._local = threading.local()
        self._write_lock = self._new_write_lock()
        self._kill_at = os.environ.get(KILL_ENV) or None

    def _new_write_lock(self) -> threading.Lock | None:
        # SQLite: threads of this process queue here, not in SQLite's sleeping busy handler.
        return threading.Lock() if self.backend.kind == "sqlite" else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conns, self._all, self._idle = self._all, [], []
            self._cond.notify_all()
        if os.getpid() == self._pid:
            for conn in conns:
                self.backend.close_quietly(conn)

    # ------------------------------------------------------------------ the pool
    def _after_fork(self) -> None:
        # A child must not use (or close: that would end the parent's session) what it inherited.
        # Its locks are replaced, not taken: a thread of the parent may have held them at fork.
        self._cond = threading.Condition()
        self._write_lock = self._new_write_lock()
        self._abandoned.extend(self._all)
        self._all, self._idle = [], []
        self._pid = os.getpid()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        """A connection of the pool for the duration of the block."""
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
                    raise StoreUnavailable("the store is closed")
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
                conn = self.backend.connect()
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
            self._give_back(cond, conn)

    def _give_back(self, cond: threading.Condition, conn: Any) -> None:
        stale = []
        with cond:
            broken = self.backend.broken(conn)
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
                self.backend.close_quietly(c)

    # ------------------------------------------------------------------ statements
    def execute(self, conn, sql: str, params: Sequence = ()):
        return self.backend.execute(conn, sql, params)

    def read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """All rows of one query, on a connection of the pool; a connection found lost since its
        last use is replaced once."""
        for attempt in range(2):
            with self.lease() as conn:
                try:
                    return self.backend.execute(conn, sql, params).fetchall()
                except Exception as exc:
                    if not self.backend.driver_error(exc):
                        raise
                    if attempt == 0 and self.backend.broken(conn):
                        continue      # a connection lost since its last use: once more, afresh
                    raise self._failure("store read failed", exc) from exc
        raise AssertionError("unreachable")

    def write(self, operation: str, body: Callable[[Any], Any], *,
              after_commit: Callable[[Any, Any], None] | None = None) -> Any:
        """Run ``body(conn)`` in one write transaction and commit. Retried whole (``body`` runs
        again, ``wrap`` included) only when nothing can have been committed: a serialization or
        deadlock failure, or a connection lost before COMMIT was sent (PostgreSQL). Driver errors
        become StoreUnavailable; a connection lost *during* COMMIT is reported as such (the
        change may or may not have been made)."""
        b = self.backend
        for attempt in range(WRITE_RETRIES):
            with self.lease() as conn:
                with self._write_lock or contextlib.nullcontext():
                    committing = False
                    try:
                        self._local.in_txn = True
                        try:
                            b.begin(conn)
                            result = body(conn)
                            self.checkpoint("commit")
                            committing = True
                            b.commit(conn)
                        finally:
                            self._local.in_txn = False
                    except BaseException as exc:
                        b.rollback_quietly(conn)
                        if not b.driver_error(exc):
                            raise
                        lost = b.broken(conn)
                        if attempt + 1 < WRITE_RETRIES and (
                                b.retryable(exc) or (lost and not committing)):
                            time.sleep(0.005 * attempt)
                            continue
                        if lost and committing:
                            raise StoreUnavailable(
                                f"{operation}: the connection to the store was lost during "
                                "COMMIT, so it may or may not have been made",
                                hint="read the state back before retrying") from exc
                        raise self._failure(f"{operation} failed in the store", exc) from exc
                self.checkpoint("committed")
                if after_commit is not None:
                    after_commit(conn, result)
                return result
        raise AssertionError("unreachable")

    def _failure(self, what: str, exc: BaseException) -> KmsError:
        """A driver error as the suite's: StoreUnavailable when the database could not be
        reached or timed out (worth a retry later), KmsError for anything else it refused."""
        klass = StoreUnavailable if self.backend.unreachable(exc) else KmsError
        return klass(f"{what}: {self.backend.describe(exc)}")

    def checkpoint(self, where: str) -> None:
        if self._kill_at is not None and self._kill_at == where:
            os.kill(os.getpid(), signal.SIGKILL)
