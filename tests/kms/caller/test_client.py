"""kms.caller.client against a real node: failover, bounded retries, timeouts, error mapping, and
the
remote key provider under FieldEncryptor (its own encrypted cache, the destroy bound)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kms.caller.client import Forbidden, KmsClient, RemoteKeyProvider, ServiceError, Unavailable
from kms.errors import KeyDestroyed, RateLimited, UnknownTenant
from kms.caller.sdk import FieldEncryptor
from tests.service_kit import node_fixtures


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


node, local = node_fixtures(lambda kit: kit.config(store=str(kit.root / "client.db")))


def _client(kit, urls, who="data", **kw):
    cert, key = kit.tls.clients[who]
    return KmsClient(urls, cert=cert, key=key, ca=kit.tls.ca, **kw)


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{s.getsockname()[1]}"   # nothing listens there now


@pytest.fixture(scope="module")
def admin(service_kit, node):
    c = _client(service_kit, [node.url], "admin")
    yield c
    c.close()


def test_remote_field_encryptor_interoperates_with_the_local_one(service_kit, node, local,
                                                                 admin):
    admin.create_tenant("sdk-remote")
    remote = FieldEncryptor(RemoteKeyProvider(_client(service_kit, [node.url])))
    mine = FieldEncryptor(local)
    blob = remote.encrypt("sdk-remote", b"over mTLS")
    assert mine.decrypt("sdk-remote", blob) == b"over mTLS"
    assert remote.decrypt("sdk-remote", mine.encrypt("sdk-remote", b"local")) == b"local"
    record = remote.encrypt_record("sdk-remote", {"name": "Ada", "card": b"\x01\x02"})
    assert mine.decrypt_record("sdk-remote", record) == {"name": "Ada", "card": b"\x01\x02"}


def test_a_warm_client_cache_does_not_ask_the_node_and_holds_deks_encrypted(service_kit, node,
                                                                           admin):
    admin.create_tenant("sdk-warm")
    provider = RemoteKeyProvider(_client(service_kit, [node.url]))
    sdk = FieldEncryptor(provider)
    blobs = [sdk.encrypt("sdk-warm", b"x%d" % i) for i in range(20)]
    assert [sdk.decrypt("sdk-warm", b) for b in blobs] == [b"x%d" % i for i in range(20)]
    assert provider.fetches == 1     # one encrypt fetch; decrypts of that version hit the cache
    dek = provider.dek_for_decrypt("sdk-warm", "field", 1)
    stored = [ct for (_nonce, ct) in provider._cache._entries.values()]
    assert stored and all(dek not in ct for ct in stored)


def test_after_a_destroy_no_client_uses_the_key_once_its_ttl_has_passed(service_kit, node,
                                                                       admin):
    """The bound on a destroy: a provider serves a DEK from its cache only for `ttl` seconds
    after fetching it; every node refuses a destroyed key, so after ttl it is refused here too.
    (A clock is injected: the test moves time, it does not sleep.)"""
    admin.create_tenant("sdk-ttl")
    clock = Clock()
    provider = RemoteKeyProvider(_client(service_kit, [node.url]), ttl=5.0, clock=clock)
    sdk = FieldEncryptor(provider)
    blob = sdk.encrypt("sdk-ttl", b"shredded soon")
    admin.destroy("sdk-ttl", "field", 1)
    clock.now += 4.9     # inside the window the cached DEK may still be used
    assert sdk.decrypt("sdk-ttl", blob) == b"shredded soon"
    clock.now += 0.2     # past ttl: the node is asked, and refuses
    with pytest.raises(KeyDestroyed, match="key destroyed"):
        sdk.decrypt("sdk-ttl", blob)
    with pytest.raises(ServiceError):
        sdk.encrypt("sdk-ttl", b"new data")     # no usable key: 409
    # and nothing of that key stays in the client cache
    assert all(org != "sdk-ttl" for org, _ in provider._cache._entries)
    with pytest.raises(ValueError):
        RemoteKeyProvider(provider.client, ttl=10_000)


def test_failover_to_the_next_node_and_bounded_retries(service_kit, node, admin):
    admin.create_tenant("failover")
    c = _client(service_kit, [_dead_url(), node.url], connect_timeout=1.0)
    assert c.dek_for_encrypt("failover")[0] == 1
    assert c.failovers >= 1
    dead = _client(service_kit, [_dead_url(), _dead_url()], retries=1, connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="after 3 attempts"):
        dead.dek_for_encrypt("failover")
    assert time.monotonic() - t0 < 30   # bounded: three refused connects, not a hang


def test_a_node_that_never_answers_times_out(service_kit):
    """A listener that accepts and never speaks TLS: the client gives up after its timeouts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        c = _client(service_kit, [f"https://127.0.0.1:{srv.getsockname()[1]}"], retries=0,
                    connect_timeout=0.5, read_timeout=0.5)
        with pytest.raises(Unavailable):
            c.dek_for_encrypt("anyone")
    finally:
        stop.set()
        th.join(5)
        for s in held:
            s.close()
        srv.close()


def test_errors_map_to_the_project_exceptions(service_kit, node, admin):
    data = _client(service_kit, [node.url])
    with pytest.raises(UnknownTenant):
        data.dek_for_encrypt("nobody-here")
    admin.create_tenant("limited")
    with pytest.raises(RateLimited) as info:
        admin.rotate("limited")
    assert info.value.next_allowed > time.time() + 23 * 3600
    with pytest.raises(Forbidden):
        _client(service_kit, [node.url], "unauthorised").dek_for_encrypt("limited")
    with pytest.raises(Forbidden):
        data.create_tenant("not-an-admin")
