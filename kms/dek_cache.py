"""The encrypted DEK cache: data-encryption keys live in the KMS process only encrypted.

Each cached DEK is AES-256-GCM encrypted under a per-org *cache key*. Cache keys come from
``cache_key_source(org_id, epoch) -> 32 bytes``, which the KMS implements inside its HSM (an HMAC
keyed by an HSM-resident session key over the org and the epoch): the HSM can always derive a cache
key again, so none is ever stored. The cache keeps, per org, only the ``AESGCM`` object made from
the current epoch's key (the raw key bytes are dropped at once).

* The associated data of every cached ciphertext is the canonical encoding of ``(org_id, key_id)``,
  computed from the lookup key on every ``get``: a ciphertext moved to another slot (another org,
  key type, version or fragment) fails authentication. ``get`` then fails closed: the entry is
  dropped, the lookup counts as a miss and as an ``integrity_failure``, and ``None`` is returned,
  so the caller derives the DEK again in the HSM.
* A miss that derives a DEK should read ``generation()`` first and pass it to
  ``put(..., since=...)``: a put that raced with an invalidation (destroy, rotate) or flush is dropped,
  so a destroyed key cannot be put back into the cache.
* ``flush()`` bumps the epoch: every cache key and every entry is dropped, and the next ``put`` for
  an org asks the source for the new epoch's key. A hard flush happens on access once
  ``flush_after`` seconds (policy: 72 h) have passed since the last flush.
* Bounded to ``max_entries`` with LRU eviction (``OrderedDict``; a hit moves the entry to the end).
  An org whose last entry leaves the cache also loses its cache-key object.
* Thread-safe: one lock. The hit path is a clock read, a dict lookup, ``move_to_end``, one AES-GCM
  decrypt of the DEK and a counter; the HSM is never called with the lock held.
* Nothing is ever written to disk, and the object refuses to be pickled or copied.

``key_id`` tuples are ``(key_type, version, fragment_or_None)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import key_rules

__all__ = ["KeyCache", "CacheKeySource"]

log = logging.getLogger("kms.cache")     # the logger's name since before the move

CacheKeySource = Callable[[str, int], bytes]

_NONCE_BYTES = 12
_AAD_PREFIX = "kms-dek-cache-v1|"


def _aad(org_id: str, key_id: tuple) -> bytes:
    """Canonical associated data for ``(org_id, key_id)``.

    The org id and key type are length-prefixed, the version is an int and the fragment's ``repr``
    comes last, so two different slots never share associated data. (Memoised per cache by a
    bounded ``lru_cache``: a pure function of the lookup key, so it binds the slot exactly as if it
    were recomputed.)
    """
    key_type, version, fragment = key_id
    return (f"{_AAD_PREFIX}{len(org_id)}:{org_id}|{len(key_type)}:{key_type}|{version:d}|"
            f"{fragment!r}").encode("utf-8", "surrogatepass")


def _check_key_id(key_id) -> tuple:
    if not (isinstance(key_id, tuple) and len(key_id) == 3):
        raise TypeError(f"key_id must be a (key_type, version, fragment-or-None) tuple, got {key_id!r}")
    key_type, version, fragment = key_id
    if not isinstance(key_type, str) or not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"key_id must be (str key_type, int version, fragment), got {key_id!r}")
    if fragment is not None and not isinstance(fragment, (str, int, bytes)):
        raise TypeError(f"key_id fragment must be str, int, bytes or None, got {fragment!r}")
    return key_id


class KeyCache:
    """In-process cache of DEKs, each stored only as AES-256-GCM ciphertext under its org's cache key."""

    def __init__(self, cache_key_source: CacheKeySource | None, *,
                 max_entries: int = key_rules.CACHE_MAX_ENTRIES,
                 flush_after: float = key_rules.CACHE_FLUSH_AFTER,
                 clock: Callable[[], float] = time.monotonic):
        if cache_key_source is not None and not callable(cache_key_source):
            raise TypeError("cache_key_source must be callable(org_id, epoch) -> 32 bytes, or "
                            "None (each put is handed the key it needs: key_needed)")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not flush_after > 0:
            raise ValueError("flush_after must be a positive number of seconds")
        self._source = cache_key_source
        self._max = int(max_entries)
        self._flush_after = float(flush_after)
        self._clock = clock
        self._aad = lru_cache(maxsize=self._max)(_aad)
        self._lock = threading.Lock()
        self._epoch = 0
        self._last_flush = clock()
        self._deadline = self._last_flush + self._flush_after  # next hard flush
        # (org_id, key_id) -> (nonce, ciphertext||tag); LRU order, most recently used last.
        self._entries: OrderedDict[tuple[str, tuple], tuple[bytes, bytes]] = OrderedDict()
        # org_id -> AESGCM under the current epoch's cache key (present iff the org has entries,
        # or a put is about to add one).
        self._ciphers: dict[str, AESGCM] = {}
        # org_id -> key_ids cached for it (for invalidation without scanning every entry).
        self._by_org: dict[str, set[tuple]] = {}
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._flushes = 0
        self._invalidations = 0
        self._integrity_failures = 0
        self._key_derivations = 0
        # Bumped by every invalidate() and flush(): a put() that started before one is stale.
        self._generation = 0

    # ------------------------------------------------------------------ the hot path
    def get(self, org_id: str, key_id: tuple) -> bytes | None:
        """The cached DEK for ``(org_id, key_id)``, or ``None`` (miss, or an entry that failed
        authentication: dropped, counted, treated as a miss)."""
        slot = (org_id, key_id)
        aad = self._aad(org_id, key_id)
        now = self._clock()
        with self._lock:
            if now >= self._deadline:
                self._flush_locked(now, hard=True)
            entry = self._entries.get(slot)
            if entry is None:
                self._misses += 1
                return None
            try:
                dek = self._ciphers[org_id].decrypt(entry[0], entry[1], aad)
            except (InvalidTag, KeyError):
                self._drop_locked(slot)
                self._misses += 1
                self._integrity_failures += 1
                log.warning("DEK cache entry failed authentication and was dropped "
                            "(org=%r key=%r); deriving again", org_id, key_id)
                return None
            self._entries.move_to_end(slot)
            self._hits += 1
            return dek

    def generation(self) -> int:
        """A token to read *before* deriving a DEK on a miss and to pass to ``put(since=...)``."""
        return self._generation

    def key_needed(self, org_id: str) -> int | None:
        """The epoch whose cache key a ``put`` for the org must be handed (``cache_key``), or
        None while the cache holds the org's key of the current epoch."""
        with self._lock:
            self._maybe_hard_flush_locked()
            return None if org_id in self._ciphers else self._epoch

    def put(self, org_id: str, key_id: tuple, dek: bytes, *, since: int | None = None,
            cache_key: tuple[int, bytes] | None = None) -> bool:
        """Cache ``dek`` for ``(org_id, key_id)`` (replacing any previous entry), encrypted.

        ``since``: the value :meth:`generation` returned before the DEK was derived. If any
        invalidation or flush happened since (e.g. the key was destroyed while it was being
        derived), the DEK is not cached, so a destroyed key cannot come back into the cache.
        ``cache_key``: ``(epoch, 32 bytes)``, the org's cache key for the epoch
        :meth:`key_needed` named (a cache made without a source is handed its keys this way; a
        key of an epoch flushed since is not used). Returns whether the DEK was cached.
        """
        if not isinstance(org_id, str) or not org_id:
            raise TypeError("org_id must be a non-empty str")
        _check_key_id(key_id)
        if not isinstance(dek, (bytes, bytearray, memoryview)) or not len(dek):
            raise TypeError("dek must be non-empty bytes")
        slot = (org_id, key_id)
        aad = self._aad(org_id, key_id)
        for _ in range(3):
            with self._lock:
                self._maybe_hard_flush_locked()
                if since is not None and since != self._generation:
                    return False
                epoch = self._epoch
                aead = self._ciphers.get(org_id)
                if aead is None and cache_key is not None and cache_key[0] == epoch:
                    aead = self._ciphers[org_id] = self._aead(cache_key[1])
                if aead is not None:
                    self._store_locked(slot, aead, dek, aad)
                    return True
                if self._source is None:
                    return False    # no key handed for this epoch: not cached, derived again
            # No cache key for this org in this epoch: ask the HSM, without holding the lock.
            aead = self._derive(org_id, epoch)
            with self._lock:
                if since is not None and since != self._generation:
                    return False
                if self._epoch != epoch:
                    continue  # flushed meanwhile: that key belongs to a dead epoch
                aead = self._ciphers.setdefault(org_id, aead)
                self._store_locked(slot, aead, dek, aad)
                return True
        log.warning("DEK not cached for org %r: the cache was flushed repeatedly while "
                    "deriving its cache key", org_id)
        return False

    # ------------------------------------------------------------------ invalidation
    def invalidate(self, org_id: str, key_type: str | None = None,
                   version: int | None = None) -> int:
        """Drop the org's cached DEKs, all or those of one key type (and one version of it).

        Returns how many entries were dropped. Invalidating a whole org also drops its cache key.
        """
        if version is not None and key_type is None:
            raise ValueError("invalidate by version needs the key_type too")
        with self._lock:
            self._maybe_hard_flush_locked()
            self._generation += 1
            ids = self._by_org.get(org_id)
            if not ids:
                self._ciphers.pop(org_id, None)
                return 0
            victims = [k for k in ids
                       if (key_type is None or k[0] == key_type)
                       and (version is None or k[1] == version)]
            for key_id in victims:
                self._drop_locked((org_id, key_id))
            if key_type is None:
                self._ciphers.pop(org_id, None)
            self._invalidations += len(victims)
            return len(victims)

    def flush(self) -> None:
        """Bump the epoch: every cache key and every cached DEK is dropped."""
        with self._lock:
            self._flush_locked(self._clock(), hard=False)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        with self._lock:
            self._maybe_hard_flush_locked()
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "flushes": self._flushes,
                "entries": len(self._entries),
                "orgs": len(self._by_org),
                "invalidations": self._invalidations,
                "integrity_failures": self._integrity_failures,
                "cache_key_derivations": self._key_derivations,
                "epoch": self._epoch,
                "max_entries": self._max,
                "flush_after_seconds": self._flush_after,
                "seconds_since_flush": self._clock() - self._last_flush,
            }

    def holds(self, org_id: str, key_id: tuple) -> bool:
        """Whether a DEK is cached for the slot: a hint (no decrypt, no LRU or counter update)
        for a caller deciding whether a lookup will need the HSM."""
        return (org_id, key_id) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"<KeyCache entries={len(self._entries)} max={self._max} epoch={self._epoch} "
                f"flush_after={self._flush_after:g}s>")

    # Never serialised: an in-memory structure only (no pickling, no copies, nothing on disk).
    def __reduce_ex__(self, protocol):
        raise TypeError("KeyCache cannot be pickled or copied: cached keys never leave the process")

    def __reduce__(self):
        raise TypeError("KeyCache cannot be pickled or copied: cached keys never leave the process")

    def __getstate__(self):
        raise TypeError("KeyCache cannot be pickled or copied: cached keys never leave the process")

    # ------------------------------------------------------------------ internals
    def _derive(self, org_id: str, epoch: int) -> AESGCM:
        assert self._source is not None
        key = self._source(org_id, epoch)
        with self._lock:
            return self._aead(key)

    def _aead(self, key) -> AESGCM:
        """An org's AESGCM from its 32-byte cache key (counted; the key bytes are not kept)."""
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise ValueError("a cache key must be 32 bytes "
                             f"(got {type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'})")
        self._key_derivations += 1
        return AESGCM(bytes(key))

    def _store_locked(self, slot, aead: AESGCM, dek, aad: bytes) -> None:
        nonce = os.urandom(_NONCE_BYTES)
        self._entries[slot] = (nonce, aead.encrypt(nonce, bytes(dek), aad))
        self._entries.move_to_end(slot)
        self._by_org.setdefault(slot[0], set()).add(slot[1])
        while len(self._entries) > self._max:
            old, _ = self._entries.popitem(last=False)
            self._unindex_locked(old)
            self._evictions += 1

    def _drop_locked(self, slot) -> None:
        if self._entries.pop(slot, None) is not None:
            self._unindex_locked(slot)

    def _unindex_locked(self, slot) -> None:
        org_id, key_id = slot
        ids = self._by_org.get(org_id)
        if ids is not None:
            ids.discard(key_id)
            if not ids:
                del self._by_org[org_id]
                self._ciphers.pop(org_id, None)

    def _maybe_hard_flush_locked(self) -> None:
        now = self._clock()
        if now >= self._deadline:
            self._flush_locked(now, hard=True)

    def _flush_locked(self, now: float, *, hard: bool) -> None:
        self._epoch += 1
        self._generation += 1
        self._entries.clear()
        self._ciphers.clear()
        self._by_org.clear()
        self._flushes += 1
        self._last_flush = now
        self._deadline = now + self._flush_after
        if hard:
            log.info("DEK cache hard flush (%.0f s since the last flush); epoch %d",
                     self._flush_after, self._epoch)
