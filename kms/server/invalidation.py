"""Cross-node DEK cache invalidation for nodes sharing one PostgreSQL store (LISTEN/NOTIFY).

A node keeps what its DEK requests read from the store while its listener is connected and no
notification came (``kms.node.rowcache``, at most ``rowcache.MAX_AGE`` seconds), and its encrypted
DEK
cache. So
the node that makes a change announces it (``Publisher.announce`` → ``NOTIFY kms_invalidate,
'{"op", "org", ...}'``), and each node's ``Listener`` thread, as the notification arrives
(milliseconds on one host; the benchmark measures it), first moves its ``stamp`` (nothing kept
answers again: the next request reads the org's state, which says DESTROYED) and then drops the
named entries from its cache.

Notifications are not queued for a listener that is not connected. While it is not connected
its ``stamp`` is None (nothing is kept: every request reads the store). After a lost connection the
listener reconnects (bounded back-off) and then flushes its *whole* cache: whatever it missed,
the next requests re-read from the store. Every change is announced by the node that commits
it (``Kms.announce``: the server's worker sets the listener's, the CLI ``announce_once`` on a
PostgreSQL store). The payload names only org, key type, version
and operation: never key material.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

log = logging.getLogger("kms.invalidation")     # its name since before the move

CHANNEL = "kms_invalidate"
APPLICATION_NAME = "hsm-suite-kms-invalidation"     # how operators (and tests) find it


def _connect(url: str):
    import psycopg
    return psycopg.connect(url, autocommit=True, connect_timeout=5,
                           application_name=APPLICATION_NAME)


class Publisher:
    """Sends NOTIFYs on one connection of its own (reconnects once on a lost one)."""

    def __init__(self, url: str, *, name: str = ""):
        self.url, self.name = url, name
        self._conn: Any = None     # a psycopg connection, opened on first use
        self._lock = threading.Lock()

    def announce(self, op: str, org: str, key_type: str | None = None,
                 version: int | None = None) -> None:
        payload = json.dumps({"op": op, "org": org, "key_type": key_type, "version": version,
                              "from": self.name}, separators=(",", ":"))
        with self._lock:
            for attempt in range(2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = _connect(self.url)
                    self._conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    return
                except Exception as exc:
                    self._close()
                    if attempt:
                        # The change is committed; other nodes still refuse a destroyed key
                        # (within kms.node.rowcache.MAX_AGE), and their caches age out. Say so, do
                        # not fail.
                        log.warning("invalidation not announced (%s): %s", type(exc).__name__,
                                    op)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


def announce_once(url: str, name: str, op: str, org: str, key_type: str | None = None,
                  version: int | None = None) -> None:
    """One announcement on a connection of its own, closed at once (the CLI's changes)."""
    publisher = Publisher(url, name=name)
    try:
        publisher.announce(op, org, key_type, version)
    finally:
        publisher.close()


class Listener(Publisher):
    """A daemon thread that LISTENs and invalidates ``cache``; also publishes (one object per
    node). ``listening`` is false while disconnected (``/readyz`` reports it)."""

    def __init__(self, url: str, cache, *, name: str = "", on_remote=None,
                 backoff: tuple[float, float] = (0.1, 2.0)):
        super().__init__(url, name=name)
        self.cache = cache
        self.on_remote = on_remote
        self.listening = False
        self._stamp = 0            # moved by every notification and every (dis)connection
        self.received = 0
        self.reconnects = 0
        self._backoff = backoff
        self._stop = threading.Event()
        self._listen_conn = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kms-invalidation", daemon=True)
        self._thread.start()
        self._connected.wait(5)

    @property
    def stamp(self) -> int | None:
        """Changes whenever a change may have been announced; None while not listening."""
        return self._stamp if self.listening else None

    def _run(self) -> None:
        delay = self._backoff[0]
        first = True
        while not self._stop.is_set():
            try:
                conn = self._listen_conn = _connect(self.url)
                conn.execute(f"LISTEN {CHANNEL}")
                self._stamp += 1
                if not first:
                    # Anything announced while we were away is lost: drop the whole cache.
                    self.cache.flush()
                self.listening = True
                if not first:
                    self.reconnects += 1
                    log.info("invalidation listener reconnected; cache flushed")
                first = False
                delay = self._backoff[0]
                self._connected.set()
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        self._apply(note.payload)
            except Exception as exc:
                was_listening, self.listening = self.listening, False
                self._stamp += 1
                if self._stop.is_set():
                    break
                if was_listening:
                    log.warning("invalidation listener lost its connection (%s); "
                                "reconnecting", type(exc).__name__)
                self.listening = False
                self._connected.set()
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
            finally:
                self.listening = False
                c, self._listen_conn = self._listen_conn, None
                if c is not None:
                    try:
                        c.close()
                    except Exception:
                        pass

    def _apply(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            org, key_type, version = msg["org"], msg.get("key_type"), msg.get("version")
        except (ValueError, KeyError, TypeError):
            log.warning("invalidation: ignored a malformed notification")
            return
        self.received += 1
        self._stamp += 1      # first: nothing kept answers again, then the cache entries go
        if key_type is not None and version is not None:
            self.cache.invalidate(org, key_type, version)
        elif key_type is not None:
            self.cache.invalidate(org, key_type)
        else:
            self.cache.invalidate(org)
        if msg.get("from") != self.name and self.on_remote is not None:
            self.on_remote()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        super().close()
