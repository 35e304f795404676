"""kms.dek_cache.KeyCache: the encrypted DEK cache (real AES-256-GCM from `cryptography`).

The cache-key source here is an HMAC-SHA256 over (org, epoch) keyed by a test secret: the same
computation the KMS makes inside its HSM with an HSM-resident key, done in Python because these
tests are about the cache, not the token.
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import hmac
import os
import pickle
import random
import threading

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import key_rules
from kms.dek_cache import KeyCache, _aad
from tests.helpers import run_threads

HOUR = 3600.0


class Source:
    """cache_key_source double: HMAC(secret, org ‖ epoch), counting its calls."""

    def __init__(self):
        self.secret = os.urandom(32)
        self.calls: list[tuple[str, int]] = []
        self.keys: set[bytes] = set()
        self.lock = threading.Lock()

    def __call__(self, org_id: str, epoch: int) -> bytes:
        key = hmac.digest(self.secret, f"{len(org_id)}:{org_id}|{epoch}".encode(), "sha256")
        with self.lock:
            self.calls.append((org_id, epoch))
            self.keys.add(key)
        return key


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def dek_for(org: str, key_id: tuple) -> bytes:
    return hashlib.sha256(repr((org, key_id)).encode()).digest()


F1 = ("field", 1, None)
F2 = ("field", 2, None)
D1 = ("database", 1, "frag-7")


@pytest.fixture
def source():
    return Source()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(source, clock):
    return KeyCache(source, clock=clock)


def stored_bytes(obj, seen=None):
    """Every bytes-like value reachable from obj's attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        yield bytes(obj)
    elif isinstance(obj, str):
        yield obj.encode("utf-8", "surrogatepass")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from stored_bytes(k, seen)
            yield from stored_bytes(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from stored_bytes(v, seen)
    elif hasattr(obj, "__dict__") and not callable(obj):
        yield from stored_bytes(vars(obj), seen)


# --------------------------------------------------------------------------- basics
def test_defaults_come_from_policy(source):
    c = KeyCache(source)
    s = c.stats()
    assert s["max_entries"] == key_rules.CACHE_MAX_ENTRIES
    assert s["flush_after_seconds"] == key_rules.CACHE_FLUSH_AFTER == 72 * HOUR


def test_miss_then_hit(cache):
    assert cache.get("org-a", F1) is None
    dek = dek_for("org-a", F1)
    cache.put("org-a", F1, dek)
    assert cache.get("org-a", F1) == dek
    assert cache.get("org-a", F2) is None
    assert cache.get("org-b", F1) is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["evictions"], s["flushes"]) == (1, 3, 1, 0, 0)


def test_put_replaces(cache):
    cache.put("org-a", F1, b"\x01" * 32)
    cache.put("org-a", F1, b"\x02" * 32)
    assert cache.get("org-a", F1) == b"\x02" * 32
    assert len(cache) == 1


def test_one_cache_key_per_org_and_epoch(cache, source):
    for key_id in (F1, F2, D1):
        cache.put("org-a", key_id, dek_for("org-a", key_id))
    cache.put("org-b", F1, dek_for("org-b", F1))
    assert source.calls == [("org-a", 0), ("org-b", 0)]
    assert cache.stats()["cache_key_derivations"] == 2


def test_bad_arguments(cache):
    with pytest.raises(TypeError):
        cache.put("org-a", ("field", 1), b"k" * 32)
    with pytest.raises(TypeError):
        cache.put("org-a", ("field", "1", None), b"k" * 32)
    with pytest.raises(TypeError):
        cache.put("", F1, b"k" * 32)
    with pytest.raises(TypeError):
        cache.put("org-a", F1, b"")
    with pytest.raises(ValueError):
        cache.invalidate("org-a", version=1)
    with pytest.raises(ValueError):
        KeyCache(lambda o, e: b"k" * 32, max_entries=0)
    with pytest.raises(ValueError):
        KeyCache(lambda o, e: b"k" * 32, flush_after=0)


def test_source_must_return_32_bytes(clock):
    c = KeyCache(lambda org, epoch: b"short", clock=clock)
    with pytest.raises(ValueError, match="32 bytes"):
        c.put("org-a", F1, b"k" * 32)
    assert len(c) == 0


# --------------------------------------------------------------------------- LRU
def test_lru_eviction_order(source, clock):
    c = KeyCache(source, max_entries=3, clock=clock)
    ids = [("field", v, None) for v in range(1, 5)]
    for key_id in ids[:3]:
        c.put("org-a", key_id, dek_for("org-a", key_id))
    assert c.get("org-a", ids[0]) is not None      # 1 is now the most recently used
    c.put("org-a", ids[3], dek_for("org-a", ids[3]))  # evicts 2, the least recently used
    assert [k for _, k in c._entries] == [ids[2], ids[0], ids[3]]
    assert c.get("org-a", ids[1]) is None
    for key_id in (ids[0], ids[2], ids[3]):
        assert c.get("org-a", key_id) == dek_for("org-a", key_id)
    c.put("org-b", F1, dek_for("org-b", F1))          # evicts org-a's LRU: 1 (hit order 1, 3, 4)
    assert c.get("org-a", ids[0]) is None
    s = c.stats()
    assert s["evictions"] == 2 and s["entries"] == 3


def test_org_loses_its_cache_key_when_its_last_entry_is_evicted(source, clock):
    c = KeyCache(source, max_entries=1, clock=clock)
    c.put("org-a", F1, b"a" * 32)
    c.put("org-b", F1, b"b" * 32)
    assert set(c._ciphers) == {"org-b"}
    c.put("org-a", F1, b"a" * 32)   # same epoch: the HSM derives the same cache key again
    assert source.calls == [("org-a", 0), ("org-b", 0), ("org-a", 0)]
    assert c.get("org-a", F1) == b"a" * 32


# --------------------------------------------------------------------------- flushes
def test_explicit_flush_bumps_epoch_and_drops_everything(cache, source):
    cache.put("org-a", F1, dek_for("org-a", F1))
    cache.put("org-b", F1, dek_for("org-b", F1))
    old_entry = cache._entries[("org-a", F1)]
    cache.flush()
    s = cache.stats()
    assert (s["entries"], s["flushes"], s["epoch"], s["orgs"]) == (0, 1, 1, 0)
    assert cache._ciphers == {}
    assert cache.get("org-a", F1) is None
    cache.put("org-a", F1, dek_for("org-a", F1))
    assert source.calls[-1] == ("org-a", 1)
    # The new epoch's cache key cannot open the old epoch's ciphertext.
    with pytest.raises(InvalidTag):
        cache._ciphers["org-a"].decrypt(old_entry[0], old_entry[1], _aad("org-a", F1))


def test_hard_flush_after_72_hours(cache, clock, source):
    cache.put("org-a", F1, dek_for("org-a", F1))
    clock.t += 72 * HOUR - 1
    assert cache.get("org-a", F1) == dek_for("org-a", F1)
    assert cache.stats()["flushes"] == 0
    clock.t += 1
    assert cache.get("org-a", F1) is None
    s = cache.stats()
    assert (s["flushes"], s["entries"], s["epoch"]) == (1, 0, 1)
    cache.put("org-a", F1, dek_for("org-a", F1))
    assert source.calls[-1] == ("org-a", 1)
    # The clock restarts at the flush: the next hard flush is 72 h later, not at once.
    clock.t += 71 * HOUR
    assert cache.get("org-a", F1) == dek_for("org-a", F1)
    clock.t += 1 * HOUR
    assert cache.get("org-a", F1) is None
    assert cache.stats()["flushes"] == 2


def test_hard_flush_checked_on_put_and_stats(source, clock):
    c = KeyCache(source, flush_after=10, clock=clock)
    c.put("org-a", F1, b"a" * 32)
    clock.t += 10
    assert c.stats()["entries"] == 0 and c.stats()["flushes"] == 1
    clock.t += 10
    c.put("org-a", F2, b"b" * 32)        # flushes first, then stores under epoch 2
    assert c.stats()["flushes"] == 2 and c.get("org-a", F2) == b"b" * 32
    assert source.calls[-1] == ("org-a", 2)


def test_explicit_flush_restarts_the_hard_flush_timer(source, clock):
    c = KeyCache(source, flush_after=100, clock=clock)
    clock.t += 60
    c.flush()
    c.put("org-a", F1, b"a" * 32)
    clock.t += 60           # 120 s since construction, 60 s since the flush
    assert c.get("org-a", F1) == b"a" * 32
    assert c.stats()["flushes"] == 1


def test_flush_during_cache_key_derivation_is_not_lost(clock):
    """A flush that lands while put() asks the HSM for a cache key: the put uses the new epoch."""
    holder: dict = {}
    real = Source()

    def source(org_id, epoch):
        if epoch == 0:
            holder["cache"].flush()
        return real(org_id, epoch)

    c = holder["cache"] = KeyCache(source, clock=clock)
    c.put("org-a", F1, b"a" * 32)
    assert real.calls == [("org-a", 0), ("org-a", 1)]
    assert c.get("org-a", F1) == b"a" * 32
    assert c.stats()["epoch"] == 1


# --------------------------------------------------------------------------- invalidation
def _fill(c):
    for org in ("org-a", "org-b"):
        for key_id in (F1, F2, ("field", 2, "x"), D1, ("database", 2, "frag-7")):
            c.put(org, key_id, dek_for(org, key_id))


def test_invalidate_org(cache):
    _fill(cache)
    assert cache.invalidate("org-a") == 5
    assert all(org == "org-b" for org, _ in cache._entries)
    assert "org-a" not in cache._ciphers
    assert cache.get("org-b", F1) == dek_for("org-b", F1)
    assert cache.invalidate("org-nobody") == 0


def test_invalidate_key_type(cache):
    _fill(cache)
    assert cache.invalidate("org-a", "database") == 2
    assert cache.get("org-a", D1) is None
    assert cache.get("org-a", F1) == dek_for("org-a", F1)
    assert cache.get("org-b", D1) == dek_for("org-b", D1)


def test_invalidate_key_type_and_version(cache):
    _fill(cache)
    assert cache.invalidate("org-a", "field", 2) == 2   # (field, 2, None) and (field, 2, "x")
    assert cache.get("org-a", F2) is None and cache.get("org-a", ("field", 2, "x")) is None
    assert cache.get("org-a", F1) == dek_for("org-a", F1)
    assert cache.get("org-a", ("database", 2, "frag-7")) is not None
    assert cache.get("org-b", F2) == dek_for("org-b", F2)
    s = cache.stats()
    assert s["invalidations"] == 2 and s["entries"] == 8


def test_put_started_before_an_invalidation_is_dropped(cache):
    """Miss -> derive (slow, in the HSM) -> destroy + invalidate lands meanwhile -> put: not cached."""
    since = cache.generation()
    # ... the KMS derives the DEK here; meanwhile the key is destroyed:
    assert cache.invalidate("org-a", "field", 1) == 0
    assert cache.put("org-a", F1, b"destroyed" * 4, since=since) is False
    assert cache.get("org-a", F1) is None and len(cache) == 0
    since = cache.generation()
    cache.flush()
    assert cache.put("org-a", F1, b"k" * 32, since=since) is False
    since = cache.generation()
    assert cache.put("org-a", F1, b"k" * 32, since=since) is True
    assert cache.get("org-a", F1) == b"k" * 32
    assert cache.put("org-a", F2, b"k" * 32) is True      # without since: always cached


# --------------------------------------------------------------------------- what is stored
def test_entries_are_ciphertext_under_the_derived_cache_key(cache, source):
    deks = {}
    for org in ("org-a", "org-b"):
        for key_id in (F1, F2, D1):
            deks[(org, key_id)] = os.urandom(32)
            cache.put(org, key_id, deks[(org, key_id)])
    blobs = list(stored_bytes(cache))
    assert blobs, "the walk found nothing: the test would prove nothing"
    for secret in [*deks.values(), *source.keys]:
        assert not any(secret in b for b in blobs), "a DEK or cache key is stored in clear"
        assert not any(secret.hex().encode() in b for b in blobs)
    for (org, key_id), (nonce, ct) in cache._entries.items():
        assert len(nonce) == 12 and len(ct) == 32 + 16
        # Really AES-256-GCM under the HSM-derived cache key, bound to the slot:
        key = hmac.digest(source.secret, f"{len(org)}:{org}|0".encode(), "sha256")
        assert AESGCM(key).decrypt(nonce, ct, _aad(org, key_id)) == deks[(org, key_id)]
    assert all(type(v).__name__ == "AESGCM" for v in cache._ciphers.values())


def test_swapped_ciphertexts_fail_closed(cache):
    cache.put("org-a", F1, dek_for("org-a", F1))
    cache.put("org-a", F2, dek_for("org-a", F2))
    cache.put("org-a", D1, dek_for("org-a", D1))
    e = cache._entries
    e[("org-a", F1)], e[("org-a", F2)] = e[("org-a", F2)], e[("org-a", F1)]
    before = cache.stats()
    assert cache.get("org-a", F1) is None
    assert cache.get("org-a", F2) is None
    after = cache.stats()
    assert after["misses"] - before["misses"] == 2
    assert after["hits"] == before["hits"]
    assert after["integrity_failures"] == 2
    assert after["entries"] == 1                       # the bad entries are dropped
    assert cache.get("org-a", D1) == dek_for("org-a", D1)
    cache.put("org-a", F1, dek_for("org-a", F1))       # and the slot works again
    assert cache.get("org-a", F1) == dek_for("org-a", F1)


def test_entry_moved_to_another_org_fails_closed(cache):
    cache.put("org-a", F1, dek_for("org-a", F1))
    cache.put("org-b", F2, dek_for("org-b", F2))
    cache._entries[("org-b", F2)] = cache._entries[("org-a", F1)]
    assert cache.get("org-b", F2) is None
    assert cache.stats()["integrity_failures"] == 1


def test_tampered_ciphertext_fails_closed(cache):
    cache.put("org-a", F1, dek_for("org-a", F1))
    nonce, ct = cache._entries[("org-a", F1)]
    cache._entries[("org-a", F1)] = (nonce, bytes([ct[0] ^ 1]) + ct[1:])
    assert cache.get("org-a", F1) is None
    assert cache.stats()["integrity_failures"] == 1


def test_aad_encoding_is_unambiguous():
    slots = [("a", ("field", 1, None)), ("a|", ("field", 1, None)), ("a", ("|field", 1, None)),
             ("a", ("field", 11, None)), ("a", ("field", 1, "None")), ("a", ("field", 1, 0)),
             ("a", ("field", 1, "0")), ("a", ("field", 1, b"0")), ("1:a", ("field", 1, None))]
    assert len({_aad(org, key_id) for org, key_id in slots}) == len(slots)


def test_refuses_pickling_and_copies(cache):
    cache.put("org-a", F1, b"k" * 32)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cache)
    with pytest.raises(TypeError):
        copy.copy(cache)
    with pytest.raises(TypeError):
        copy.deepcopy(cache)
    assert "k" * 8 not in repr(cache)


def test_nothing_touches_the_filesystem(source, clock, monkeypatch):
    def no_files(*a, **k):
        raise AssertionError("the key cache opened a file")
    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "open", no_files)
    c = KeyCache(source, max_entries=2, clock=clock)
    for v in range(5):
        c.put("org-a", ("field", v, None), b"k" * 32)
        c.get("org-a", ("field", v, None))
    c.invalidate("org-a", "field", 4)
    c.flush()
    clock.t += key_rules.CACHE_FLUSH_AFTER
    c.stats()


# --------------------------------------------------------------------------- threads
def test_sixteen_threads(source, clock):
    """16 threads of gets, puts and invalidations, while thread 0 flushes the whole cache every
    300 of its operations (5 flushes, each racing the other 15 threads)."""
    c = KeyCache(source, max_entries=64, clock=clock)
    orgs = [f"org-{i}" for i in range(8)]
    ids = [("field", v, None) for v in range(1, 6)] + [("database", 1, f"f{i}") for i in range(5)]
    per_thread, flush_every = 1500, 300
    gets = [0] * 16
    flushed = []
    barrier = threading.Barrier(16, timeout=60)

    def work(n: int) -> None:
        rng = random.Random(n)
        barrier.wait()
        for i in range(per_thread):
            if n == 0 and i % flush_every == flush_every // 2:
                c.flush()
                flushed.append(i)
                continue
            org, key_id = rng.choice(orgs), rng.choice(ids)
            r = rng.random()
            if r < 0.55:
                got = c.get(org, key_id)
                gets[n] += 1
                if got is not None and got != dek_for(org, key_id):
                    raise AssertionError(f"wrong DEK for {org} {key_id}")
            elif r < 0.97:
                c.put(org, key_id, dek_for(org, key_id))
            elif r < 0.99:
                c.invalidate(org, key_id[0] if rng.random() < 0.5 else None)

    run_threads(16, work)  # re-raises every thread's error (a wrong DEK included)
    # The flush branch really ran, concurrently with the others: 5 flushes, 5 epochs.
    assert flushed == [150, 450, 750, 1050, 1350]
    assert c.stats()["flushes"] == 5 and c.stats()["epoch"] == 5
    s = c.stats()
    assert s["hits"] + s["misses"] == sum(gets)
    assert s["hits"] > 0 and s["evictions"] > 0
    assert s["integrity_failures"] == 0
    assert s["entries"] == len(c._entries) <= 64
    # The org index and cache keys agree with the entries.
    assert {org for org, _ in c._entries} == set(c._by_org) == set(c._ciphers)
    for (org, key_id) in list(c._entries):
        assert key_id in c._by_org[org]
        assert c.get(org, key_id) == dek_for(org, key_id)

