"""The DEK hot path's store reads, kept while the store says nothing was written since.

A cache-hit DEK fetch reads one thing from the store: the org's head (its generation and seal),
which says whether the org's verified state (``kms.node.sealing``: versions, destroyed or not) is
still current. ``FreshRows`` keeps the last value read per lookup and hands it back while its
*watch* says that no write can have been committed since it was read, and never for longer than
``max_age`` seconds:

* ``SqliteWatch``: ``PRAGMA data_version`` on a connection of its own that never writes. Its
  value changes whenever any *other* connection commits: this process's pool, another worker,
  another node, the CLI. One read serves the lookups of the next ``STAMP_REUSE`` (1 ms): a
  destroy committed anywhere is seen by every request that looks 1 ms or more after the commit.
  (A read per lookup cost ~9 µs of the worker's ~200 µs per cached DEK fetch, measured with
  ``benchmarks/service_breakdown.py``; at thousands of requests a second one read now serves
  several.)
* ``ListenerWatch`` (PostgreSQL): the node's invalidation listener (``kms.server.invalidation``).
Its
  stamp moves with every notification it receives and every time its connection is lost or
  made again; while it is not connected nothing is kept. A destroy made on another node is
  refused here as soon as its NOTIFY arrives (milliseconds on one host), and in any case once
  ``max_age`` has passed since the value was read - also when notifications are lost.

The watch's stamp is read *before* the store: a write committed during the read leaves the value
stored under an older stamp, so it is read again next time. ``clear()`` (this node changed a
secret) also stops a read that was under way from storing its value. Values hold only what the
store holds (wrapped secrets): nothing here is key material in the clear.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

MAX_AGE = 0.5          # seconds: the cross-node destroy bound on PostgreSQL (see docs/assurance)
STAMP_REUSE = 0.001    # seconds: one data_version read serves the lookups made this long after it
MAX_ENTRIES = 100_000


class Watch(Protocol):
    def stamp(self) -> Any | None:
        """A value that changes whenever the store may have changed; None: keep nothing."""

    def close(self) -> None: ...


class SqliteWatch:
    """``PRAGMA data_version`` of one connection that never writes (it sees every commit made
    by any other connection to the file)."""

    def __init__(self, conn, reuse: float = STAMP_REUSE):
        self._conn = conn
        self._lock = threading.Lock()   # one connection, used from the loop and pool threads
        self._reuse = reuse
        # (monotonic time taken *before* the read, value): replaced whole, read without the lock
        self._last: tuple[float, int | None] = (float("-inf"), None)

    def stamp(self) -> int | None:
        now = time.monotonic()
        at, value = self._last
        if now - at < self._reuse:
            return value
        with self._lock:
            if self._conn is None:
                return None
            value = self._conn.execute("PRAGMA data_version").fetchone()[0]
            self._last = (now, value)
            return value

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._last = (float("-inf"), None)
        if conn is not None:
            conn.close()


class ListenerWatch:
    """The invalidation listener's stamp: moves on every notification and (re)connection;
    None while it is not listening."""

    def __init__(self, listener):
        self._listener = listener

    def stamp(self) -> Any | None:
        return self._listener.stamp

    def close(self) -> None:
        pass      # the listener is the worker's; it closes it


class FreshRows:
    """``node_clock``: the node's clock (``Kms.clock``): a kept value also expires once that
    clock moved ``max_age`` on (or back), so a test's clock that jumps hours sees fresh reads."""

    def __init__(self, watch: Watch, *, max_age: float = MAX_AGE,
                 node_clock: Callable[[], float] = time.time, max_entries: int = MAX_ENTRIES):
        self.watch, self.max_age, self._max = watch, max_age, max_entries
        self._node_clock = node_clock
        self._rows: dict[Hashable, tuple[Any, Any, tuple[float, float]]] = {}
        self._generation = 0
        self.hits = self.reads = 0

    def kept(self, key: Hashable) -> Any | None:
        """The row for ``key`` if the one kept is still fresh, else None: never reads the store
        (the hit-only path on the event loop)."""
        return self._fresh(key, self.watch.stamp())

    def _fresh(self, key: Hashable, stamp: Any | None) -> Any | None:
        if stamp is None:
            return None
        kept = self._rows.get(key)
        if kept is not None and kept[1] == stamp and self._young(kept[2]):
            self.hits += 1
            return kept[0]
        return None

    def get(self, key: Hashable, read: Callable[[], Any]) -> Any:
        """The row for ``key``: kept if still fresh, else ``read()`` (and kept if not None)."""
        stamp = self.watch.stamp()
        row = self._fresh(key, stamp)
        if row is not None:
            return row
        generation = self._generation
        read_at = (time.monotonic(), self._node_clock())
        row = read()
        self.reads += 1
        if stamp is not None and row is not None and generation == self._generation:
            if len(self._rows) >= self._max:
                self._rows.clear()
            self._rows[key] = (row, stamp, read_at)
        return row

    def _young(self, read_at: tuple[float, float]) -> bool:
        # Both clocks: monotonic for the bound (a wall clock set back does not stretch it),
        # the node's for activation delays.
        return time.monotonic() - read_at[0] < self.max_age and \
            0 <= self._node_clock() - read_at[1] < self.max_age

    def clear(self) -> None:
        """This node changed the store: forget every row, and keep none being read now."""
        self._generation += 1
        self._rows = {}

    def close(self) -> None:
        self.clear()
        self.watch.close()


def for_store(store, node_clock: Callable[[], float] = time.time) -> FreshRows | None:
    """The watch a store offers by itself: SQLite's data_version on a connection of its own.
    PostgreSQL needs the node's invalidation listener (``ListenerWatch``), set by the server."""
    backend = store.db.backend
    if backend.kind != "sqlite":
        return None
    return FreshRows(SqliteWatch(backend.connect()), node_clock=node_clock)
