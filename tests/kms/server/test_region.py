"""Many nodes, one region, one PostgreSQL store: cross-node refusal and cache invalidation
(LISTEN/NOTIFY), kill -9 of a node under load (the client fails over), a PostgreSQL restart
under load (the nodes recover without a restart; nothing committed is lost)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from kms.caller.client import KmsClient, ServiceError, Unavailable
from kms.node import rowcache
from kms.errors import KeyDestroyed
from tests.helpers import start_threads

BOUND_S = 60.0   # every wait below polls up to this and then fails; none asserts a latency


@pytest.fixture(scope="module")
def region(service_kit, postgresql_server):
    url = postgresql_server.create_database("region")
    a = service_kit.start(service_kit.config(store=url))
    b = service_kit.start(service_kit.config(store=url))
    yield a, b, url
    for n in (a, b):
        n.kill()


def _client(kit, urls, who="data", **kw):
    cert, key = kit.tls.clients[who]
    return KmsClient(urls, cert=cert, key=key, ca=kit.tls.ca, **kw)


def _metric(node, name: str) -> float:
    status, text = node.call("GET", "/metrics", who="status")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.split(" ")[0].split("{")[0] == name)


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        assert time.monotonic() < deadline, f"not within {BOUND_S} s: {what}"
        time.sleep(0.02)


def test_both_nodes_listen_for_invalidations(region):
    a, b, _ = region
    for n in (a, b):
        status, body = n.call("GET", "/readyz")
        assert status == 200 and body["checks"]["invalidation_listening"] is True


def test_a_destroy_on_node_a_is_refused_on_node_b_and_purges_b_cache(service_kit, region):
    a, b, _ = region
    admin = _client(service_kit, [a.url], "admin")
    admin.create_tenant("cross")
    on_b = _client(service_kit, [b.url])
    dek = on_b.dek_for_decrypt("cross", "field", 1)          # now cached on B
    assert on_b.dek_for_decrypt("cross", "field", 1) == dek
    entries_before = _metric(b, "kms_cache_entries")
    remote_before = _metric(b, "kms_remote_invalidations_total")
    admin.destroy("cross", "field", 1)
    # refused on B within the bound: B keeps a row it read at most rowcache.MAX_AGE seconds,
    # and no longer once A's announcement arrives; past the bound, whatever B's cache holds
    time.sleep(rowcache.MAX_AGE)
    with pytest.raises(KeyDestroyed):
        on_b.dek_for_decrypt("cross", "field", 1)
    # and B's cache dropped the entry because A announced it
    _wait(lambda: _metric(b, "kms_remote_invalidations_total") > remote_before,
          "B received A's invalidation")
    assert _metric(b, "kms_cache_entries") < entries_before


def _kill_listeners(url: str) -> int:
    """pg_terminate_backend on every node's LISTEN connection; how many were killed."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        return len(conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
            "'hsm-suite-kms-invalidation' AND query LIKE 'LISTEN%'").fetchall())


def test_the_destroy_bound_holds_while_b_cannot_hear_a(service_kit, region):
    """B serves a DEK from its cache with the org's head kept fresh; A destroys the key while B's
    LISTEN connection is being killed (the announcement may be lost). Once the bound
    (rowcache.MAX_AGE) has passed since the destroy, B refuses - whether its listener noticed
    the loss, reconnected, or heard nothing at all."""
    a, b, url = region
    admin = _client(service_kit, [a.url], "admin")
    on_b = _client(service_kit, [b.url])
    for trial in range(3):
        org = f"deaf-{trial}"
        admin.create_tenant(org)
        dek = on_b.dek_for_decrypt(org, "field", 1)
        assert on_b.dek_for_decrypt(org, "field", 1) == dek     # kept head, cached DEK
        assert _kill_listeners(url) >= 1
        admin.destroy(org, "field", 1)
        time.sleep(rowcache.MAX_AGE)
        with pytest.raises(KeyDestroyed):
            on_b.dek_for_decrypt(org, "field", 1)
    # the listeners come back (and flush their caches)
    for n in (a, b):
        _wait(lambda n=n: n.call("GET", "/readyz")[0] == 200, "listener back")
    # a destroy nobody announces (made by a node library in this process, which sends no
    # NOTIFY; B's listener connected and hearing nothing): refused once the bound has passed,
    # by age alone
    admin.create_tenant("deaf-silent")
    dek = on_b.dek_for_decrypt("deaf-silent", "field", 1)
    assert on_b.dek_for_decrypt("deaf-silent", "field", 1) == dek
    with service_kit.local_node(a.config) as silent:
        silent.destroy("deaf-silent", "field", 1)
    time.sleep(rowcache.MAX_AGE)
    with pytest.raises(KeyDestroyed):
        on_b.dek_for_decrypt("deaf-silent", "field", 1)


def test_a_rotation_on_a_reaches_b_through_the_store(service_kit, region):
    a, b, _ = region
    admin = _client(service_kit, [a.url], "admin")
    admin.create_tenant("cross-rot", secret=False)
    on_b = _client(service_kit, [b.url])
    with pytest.raises(ServiceError, match="has no usable field secret") as info:
        on_b.dek_for_encrypt("cross-rot")  # no version yet: 409 conflict, not a retry
    assert type(info.value) is ServiceError
    assert (info.value.status, info.value.code) == (409, "conflict")
    assert admin.rotate("cross-rot")["version"] == 1
    # b kept the org's head from its 409 read; a's announcement (PostgreSQL NOTIFY) reaches b's
    # listener asynchronously, and the kept head is never used past rowcache.MAX_AGE: the new
    # version is served on b within that bound (S21), whichever comes first.
    deadline = time.monotonic() + rowcache.MAX_AGE + 0.5
    while True:
        try:
            assert on_b.dek_for_encrypt("cross-rot")[0] == 1
            break
        except ServiceError as exc:
            if (exc.status, exc.code) != (409, "conflict") or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _load(kit, urls, orgs, expected, stop, results, threads=4):
    """Reader threads: every answer is either the expected DEK or an Unavailable error."""
    def run(t):
        c = _client(kit, urls, connect_timeout=1.0, read_timeout=5.0, retries=3)
        rnd = random.Random(t)
        while not stop.is_set():
            org = rnd.choice(orgs)
            try:
                got = c.dek_for_decrypt(org, "field", 1)
                results.append("ok" if got == expected[org] else f"WRONG {org}")
            except Unavailable:
                results.append("unavailable")
            except Exception as exc:  # noqa: BLE001
                results.append(f"error {type(exc).__name__}: {exc}")
        c.close()
    return start_threads(threads, run)  # .join() re-raises a reader's own failure


def _expected(service_kit, node, orgs):
    with service_kit.local_node(node.config) as kms:
        return {org: kms.dek_for_decrypt(org, "field", 1) for org in orgs}


def test_kill_9_of_one_node_under_load_the_client_fails_over_with_no_wrong_answer(
        service_kit, postgresql_server):
    url = postgresql_server.create_database("kill")
    a = service_kit.start(service_kit.config(store=url))
    b = service_kit.start(service_kit.config(store=url))
    try:
        admin = _client(service_kit, [a.url, b.url], "admin")
        orgs = [f"k9-{i}" for i in range(4)]
        for org in orgs:
            admin.create_tenant(org)
        expected = _expected(service_kit, a, orgs)
        stop, results = threading.Event(), []
        ths = _load(service_kit, [a.url, b.url], orgs, expected, stop, results)
        _wait(lambda: len(results) >= 200, "200 answers before the kill")
        a.proc.kill()                     # SIGKILL: no drain, connections cut mid-flight
        a.proc.wait(30)
        at_kill = len(results)
        _wait(lambda: len(results) >= at_kill + 200, "200 answers after the kill")
        stop.set()
        ths.join(60)
        assert [r for r in results if r != "ok"] == []
    finally:
        a.kill()
        b.kill()


def test_postgresql_restart_under_load_nodes_recover_and_keep_every_commit(
        service_kit, region, postgresql_server):
    a, b, _ = region
    admin = _client(service_kit, [a.url], "admin", retries=5)
    orgs = [f"pgr-{i}" for i in range(4)]
    for org in orgs:
        admin.create_tenant(org)
    expected = _expected(service_kit, a, orgs)
    reconnects_before = _metric(b, "kms_cache_flushes_total")
    stop, results = threading.Event(), []
    ths = _load(service_kit, [a.url, b.url], orgs, expected, stop, results)
    _wait(lambda: len(results) >= 100, "100 answers before the restart")
    postgresql_server.restart()
    at_restart = len(results)
    # the nodes were not restarted: both answer again, and report ready (listener back)
    for n in (a, b):
        _wait(lambda n=n: n.call("GET", "/readyz")[0] == 200, "node ready after the restart")
    _wait(lambda: results[at_restart:].count("ok") >= 200, "200 good answers after")
    stop.set()
    ths.join(60)
    assert [r for r in results if r not in ("ok", "unavailable")] == []
    assert results[-50:] == ["ok"] * 50
    # every change committed before the restart is there, on both nodes, and new ones commit
    for org in orgs:
        for n in (a, b):
            assert _client(service_kit, [n.url]).dek_for_decrypt(org, "field", 1) \
                == expected[org]
    admin.create_tenant("pgr-after")
    admin.destroy("pgr-after", "field", 1)
    with pytest.raises(KeyDestroyed):
        _client(service_kit, [b.url]).dek_for_decrypt("pgr-after", "field", 1)
    # B's listener lost its connection and flushed its cache on reconnecting
    assert _metric(b, "kms_cache_flushes_total") > reconnects_before
