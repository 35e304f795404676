"""Cache-only keys on real tokens and real HTTPS on 127.0.0.1: the reference key service as its own
process (`kms keyservice serve`, mTLS), and a crafting HTTPS server in a thread for every
refusal the issue lists, each asserted by its event code."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import ssl
import threading
import time

import pytest

from kms.customer_keys import byok, cache_only, reference_service
from kms.errors import KeyUnavailable, KmsError
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms
from tests import localtls
from tests.ceremony_kit import kit_fixture
from tests.helpers import assert_secrets_absent
from tests.kms_kit import Clock, CustomerDek, kms_config
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


kit = kit_fixture("cacheonly", regions=("eu",))


@pytest.fixture(scope="module")
def env(kit, tmp_path_factory):
    """A node with org "shop" (BYOK seed certificate), a key directory, server and client PKI,
    and the reference key service running with client-certificate authentication."""
    release = kit.run_release()
    tmp = tmp_path_factory.mktemp("co")
    node = Kms(kms_config(kit, tmp, release.output_dir), pin=kit.regionals["eu"].user_pin,
               clock=Clock())
    node.start()
    node.create_tenant("shop", "sandbox")
    cert = tmp / "shop-seed.pem"
    byok.certificate(node, "shop", cert)
    keys = tmp / "keys"
    keys.mkdir()
    server, client = localtls.make_pki(tmp / "srv"), localtls.make_pki(tmp / "cli", client=True)
    log = tmp / "reference_service.log"
    proc, url = localtls.start_keyservice(keys, server, client_ca=client.ca, log=log)
    ns = type("Env", (), dict(node=node, cert=cert, keys=keys, server=server, client=client,
                              url=url, log=log, tmp=tmp, proc=proc))
    yield ns
    localtls.stop(proc)
    node.close()


def _add_key(env, kid: str) -> bytes:
    dek = os.urandom(32)
    (env.keys / f"{kid}.dek").write_text(base64.b64encode(dek).decode())
    shutil.copy(env.cert, env.keys / f"{kid}.pem")
    return dek


def _register(env, kid: str, **kw):
    env.node.clock.now += 5 * 3600
    return cache_only.register(env.node, "shop", "field", env.url, kid, ca=str(env.server.ca),
                              client_cert=str(env.client.cert), client_key=str(env.client.key),
                              **kw)


def _hits(env, kid: str) -> int:
    return env.log.read_text().count(f"GET /{kid}?")


def test_cache_only_end_to_end_with_the_reference_key_service(env, tmp_path):
    node = env.node
    # The cache runs on the monotonic clock; put it on the node's test clock to cross 72 h.
    node.cache._clock = node.clock
    node.cache._last_flush = node.clock()
    dek = _add_key(env, "shop-k1")
    row = _register(env, "shop-k1")
    assert (row.source, row.derivation) == ("REMOTE", "NONE")
    descriptor = json.loads(node._tenant_secret(row))
    assert descriptor["kid"] == "shop-k1" and "dek" not in json.dumps(descriptor).lower()
    sdk = FieldEncryptor(node)
    blob = sdk.encrypt("shop", b"order 66")
    # The DEK is the customer's: their own key opens the SDK ciphertext outside the KMS.
    assert FieldEncryptor(CustomerDek(dek)).decrypt("shop", blob) == b"order 66"
    hits = _hits(env, "shop-k1")
    assert sdk.decrypt("shop", blob) == b"order 66" and _hits(env, "shop-k1") == hits  # cached
    # The 72 h cache flush: the next use fetches again.
    node.clock.now += 73 * 3600
    assert sdk.decrypt("shop", blob) == b"order 66" and _hits(env, "shop-k1") == hits + 1
    # Revoked by the customer (the key file removed): unavailable once the cache is gone.
    (env.keys / "shop-k1.dek").unlink()
    node.cache.flush()
    with pytest.raises(KeyUnavailable, match="key unavailable.*HTTP 404") as info:
        sdk.decrypt("shop", blob)
    assert info.value.code == "DESTROY_HTTP_CODE"
    # Within the retry interval, operations fail without calling the key service.
    hits = _hits(env, "shop-k1")
    node.clock.now += 30
    with pytest.raises(KeyUnavailable, match="next retry in 30 s"):
        sdk.decrypt("shop", blob)
    assert _hits(env, "shop-k1") == hits
    # Back at the service: the next retry (a minute after the failure) makes it active again.
    (env.keys / "shop-k1.dek").write_text(base64.b64encode(dek).decode())
    node.clock.now += 31
    assert cache_only.retry_due(node) == {("shop", "field", row.version): True}
    assert sdk.decrypt("shop", blob) == b"order 66"
    backup = node.export_backup("shop", tmp_path / "shop.json")
    pin = env.node._pin.reveal().encode()
    assert_secrets_absent([dek, pin], [node.config.store.removeprefix("sqlite:///"), backup, env.log])


def test_rotate_to_a_new_kid_and_destroy_the_old_version(env):
    node = env.node
    old_dek = _add_key(env, "shop-r1")
    old = _register(env, "shop-r1")
    blob_old = FieldEncryptor(node).encrypt("shop", b"before rotation")
    new_dek = _add_key(env, "shop-r2")
    new = _register(env, "shop-r2")                  # a rotation: new version, old archived
    assert new.version == old.version + 1
    assert node.store.get("shop", "field", old.version).state == "ARCHIVED"
    blob_new = FieldEncryptor(node).encrypt("shop", b"after rotation")
    assert FieldEncryptor(CustomerDek(new_dek)).decrypt("shop", blob_new) == b"after rotation"
    node.cache.flush()
    assert FieldEncryptor(node).decrypt("shop", blob_old) == b"before rotation"
    assert FieldEncryptor(CustomerDek(old_dek)).decrypt("shop", blob_old) == b"before rotation"
    node.destroy("shop", "field", old.version)
    with pytest.raises(KmsError, match="key destroyed"):
        FieldEncryptor(node).decrypt("shop", blob_old)
    assert FieldEncryptor(node).decrypt("shop", blob_new) == b"after rotation"


def test_failure_policy_schedule():
    nxt = cache_only.Availability.next_retry
    t0 = 1_000.0
    assert nxt(t0, t0) == t0 + 60                       # once a minute...
    assert nxt(t0, t0 + 240) == t0 + 300                # ...for 5 minutes
    assert nxt(t0, t0 + 300) == t0 + 600                # then every 5 minutes
    assert nxt(t0, t0 + 23.9 * 3600) == t0 + 23.9 * 3600 + 300
    assert nxt(t0, t0 + 24 * 3600) is None              # for 24 hours
    av = cache_only.Availability()
    key = ("o", "field", 1)
    av.failed(key, t0, "UNREACHABLE")
    with pytest.raises(KeyUnavailable):
        av.check(key, t0 + 59)
    av.check(key, t0 + 60)                              # a retry is due: allowed through
    av.failed(key, t0 + 24 * 3600, "UNREACHABLE")
    with pytest.raises(KeyUnavailable, match="retries stopped"):
        av.check(key, t0 + 25 * 3600)
    av.succeeded(key)
    av.check(key, t0 + 25 * 3600)


def test_mtls_is_enforced_and_tls_verified(env):
    _add_key(env, "shop-k2")
    row = _register(env, "shop-k2")
    d = json.loads(env.node._tenant_secret(row))
    for bad in ({"client_cert": None, "client_key": None}, {"ca": None, "ca_pem": None}):
        env.node._cache_only_availability = None
        with pytest.raises(KeyUnavailable) as info:
            cache_only.dek(env.node, row, {**d, **bad})
        assert info.value.code == "UNREACHABLE"
    env.node._cache_only_availability = None
    assert len(cache_only.dek(env.node, row, d)) == 32


class _Crafted(http.server.BaseHTTPRequestHandler):
    respond = None          # (kid, nonce) -> (status, body bytes); set by the test

    def do_GET(self):  # noqa: N802
        from urllib.parse import parse_qs, urlsplit
        u = urlsplit(self.path)
        type(self).last_authorization = self.headers.get("Authorization")
        status, body, *headers = type(self).respond(u.path.rsplit("/", 1)[-1],
                                                    parse_qs(u.query)["requestId"][0])
        self.send_response(status)
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def crafted(env):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(env.server.cert), str(env.server.key))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Crafted)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _jwe(env, kid, nonce, dek=None, header=None, cert=None):
    return reference_service.make_jwe(dek or os.urandom(32), (cert or env.cert).read_bytes(), kid,
                               nonce, header=header)


def _ok(kid, nonce, jwe):
    return 200, json.dumps({"kid": kid, "jwe": jwe}).encode()


def _tamper_tag(jwe: str) -> str:
    parts = jwe.split(".")
    tag = bytearray(base64.urlsafe_b64decode(parts[4] + "=="))
    tag[0] ^= 1
    parts[4] = base64.urlsafe_b64encode(bytes(tag)).rstrip(b"=").decode()
    return ".".join(parts)


@pytest.fixture(scope="module")
def other_cert(env):
    env.node.create_tenant("stranger", "sandbox")
    path = env.tmp / "stranger.pem"
    byok.certificate(env.node, "stranger", path)
    return path


def _jwe_with_cek(env, kid, nonce, cek: bytes) -> str:
    """A JWE built by hand (jwcrypto will not make one that lies about its CEK size)."""
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid,
                             "jti": nonce}).encode())
    pub = cx509.load_pem_x509_certificates(env.cert.read_bytes())[0].public_key()
    ek = pub.encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    iv = os.urandom(12)
    ct = AESGCM(cek).encrypt(iv, os.urandom(32), header.encode())
    return ".".join([header, b64(ek), b64(iv), b64(ct[:-16]), b64(ct[-16:])])


CASES = {
    "ERROR_HTTP_CODE": lambda env, k, n: (500, b"{}"),
    "AUTHENTICATION_FAILURE_RESPONSE": lambda env, k, n: (401, b""),
    "EMPTY_RESPONSE": lambda env, k, n: (200, b""),
    "KID_MISMATCH": lambda env, k, n: _ok("other", n, _jwe(env, k, n)),
    "KID_MISMATCH header": lambda env, k, n: _ok(k, n, _jwe(env, k, n, header={
        "alg": "RSA-OAEP", "enc": "A256GCM", "kid": "other", "jti": n})),
    "JTI_MISMATCH": lambda env, k, n: _ok(k, n, _jwe(env, k, "0" * 32)),
    "MISSING_JTI": lambda env, k, n: _ok(k, n, _jwe(env, k, n, header={
        "alg": "RSA-OAEP", "enc": "A256GCM", "kid": k})),
    "INCORRECT_ALGORITHM_IN_JWE_HEADER alg": lambda env, k, n: _ok(k, n, _jwe(env, k, n, header={
        "alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": k, "jti": n})),
    "INCORRECT_ALGORITHM_IN_JWE_HEADER enc": lambda env, k, n: _ok(k, n, _jwe(env, k, n, header={
        "alg": "RSA-OAEP", "enc": "A128GCM", "kid": k, "jti": n})),
    "ILLEGAL_PARAMETERS_IN_JWE_HEADER": lambda env, k, n: _ok(k, n, _jwe(env, k, n, header={
        "alg": "RSA-OAEP", "enc": "A256GCM", "kid": k, "jti": n, "crit": ["exp"], "exp": 1})),
    "INCORRECT_DATA_ENCRYPTION_KEY_SIZE": lambda env, k, n: _ok(k, n, _jwe(env, k, n,
                                                                          dek=os.urandom(16))),
    "TAG_MISMATCH": lambda env, k, n: _ok(k, n, _tamper_tag(_jwe(env, k, n))),
    "INCORRECT_ALGORITHM_IN_JWE_HEADER cek-128": lambda env, k, n: _ok(k, n, _jwe_with_cek(
        env, k, n, os.urandom(16))),
    "INCORRECT_ALGORITHM_IN_JWE_HEADER cek-192": lambda env, k, n: _ok(k, n, _jwe_with_cek(
        env, k, n, os.urandom(24))),
    "ILLEGAL_JWE": lambda env, k, n: _ok(k, n, "not.a.jwe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_refusal_has_its_own_code(env, crafted, case):
    _Crafted.respond = lambda kid, nonce: CASES[case](env, kid, nonce)
    env.node._cache_only_availability = None
    fake = _Row("shop", "field", 999)
    with pytest.raises(KeyUnavailable) as info:
        cache_only.dek(env.node, fake, {"kind": "cache-only", "url": crafted, "kid": "shop-x",
                                       "ca_pem": env.server.ca.read_text()})
    assert info.value.code == case.split()[0]
    assert "key unavailable" in str(info.value)


def test_a_hand_made_jwe_with_a_256_bit_cek_opens(env, crafted):
    """The control for the CEK-size cases: the same hand-made JWE with 32 bytes opens."""
    _Crafted.respond = lambda kid, nonce: _ok(kid, nonce, _jwe_with_cek(env, kid, nonce,
                                                                       os.urandom(32)))
    env.node._cache_only_availability = None
    assert len(cache_only.dek(env.node, _Row("shop", "field", 996), {
        "kind": "cache-only", "url": crafted, "kid": "shop-w", "ca_pem": env.server.ca.read_text()})) == 32


def test_a_jwe_for_another_orgs_key_does_not_open(env, crafted, other_cert):
    _Crafted.respond = lambda kid, nonce: _ok(kid, nonce, _jwe(env, kid, nonce,
                                                              cert=other_cert))
    env.node._cache_only_availability = None
    with pytest.raises(KeyUnavailable) as info:
        cache_only.dek(env.node, _Row("shop", "field", 998), {
            "kind": "cache-only", "url": crafted, "kid": "shop-y", "ca_pem": env.server.ca.read_text()})
    assert info.value.code == "ILLEGAL_JWE"


def test_basic_auth_comes_from_the_named_environment_variable(env, crafted, monkeypatch):
    def check(kid, nonce):
        want = "Basic " + base64.b64encode(b"shop:s3cret").decode()
        if _Crafted.last_authorization != want:
            return 401, b""
        return _ok(kid, nonce, _jwe(env, kid, nonce))
    _Crafted.respond = check
    d = {"kind": "cache-only", "url": crafted, "kid": "shop-b", "ca_pem": env.server.ca.read_text(),
         "basic_auth_env": "SHOP_KEYSERVICE_AUTH"}
    env.node._cache_only_availability = None
    with pytest.raises(KeyUnavailable) as info:      # the variable is not set
        cache_only.dek(env.node, _Row("shop", "field", 995), d)
    assert info.value.code == "AUTHENTICATION_FAILURE"
    monkeypatch.setenv("SHOP_KEYSERVICE_AUTH", "shop:wrong")
    env.node._cache_only_availability = None
    with pytest.raises(KeyUnavailable) as info:
        cache_only.dek(env.node, _Row("shop", "field", 995), d)
    assert info.value.code == "AUTHENTICATION_FAILURE_RESPONSE"
    assert "wrong" not in str(info.value)
    monkeypatch.setenv("SHOP_KEYSERVICE_AUTH", "shop:s3cret")
    env.node._cache_only_availability = None
    assert len(cache_only.dek(env.node, _Row("shop", "field", 995), d)) == 32


def test_a_slow_key_service_is_bounded_by_the_timeout(env, crafted):
    def slow(kid, nonce):
        time.sleep(4.5)
        return _ok(kid, nonce, _jwe(env, kid, nonce))
    _Crafted.respond = slow
    env.node._cache_only_availability = None
    started = time.monotonic()
    with pytest.raises(KeyUnavailable) as info:
        cache_only.dek(env.node, _Row("shop", "field", 997), {
            "kind": "cache-only", "url": crafted, "kid": "shop-z", "ca_pem": env.server.ca.read_text()})
    assert info.value.code == "UNREACHABLE"
    assert time.monotonic() - started < 4.0


def test_a_redirect_to_plain_http_is_refused_and_no_credential_reaches_it(env, crafted,
                                                                           monkeypatch):
    """The key service answers 302 to an http:// URL on 127.0.0.1 (a listener that records
    every byte it receives). The fetch is refused with its own code, REDIRECT; the listener
    receives nothing, so the org's Basic credential never leaves the verified TLS connection."""
    from tests.helpers import recording_listener
    monkeypatch.setenv("SHOP_REDIRECT_AUTH", "shop:redirect-secret")
    with recording_listener() as (base, received):
        plain = f"{base}/shop-r"
        for status in (301, 302, 307, 308):
            _Crafted.respond = lambda kid, nonce, status=status: (
                status, b"", {"Location": f"{plain}?requestId={nonce}"})
            env.node._cache_only_availability = None
            with pytest.raises(KeyUnavailable) as info:
                cache_only.dek(env.node, _Row("shop", "field", 994), {
                    "kind": "cache-only", "url": crafted, "kid": "shop-r",
                    "ca_pem": env.server.ca.read_text(), "basic_auth_env": "SHOP_REDIRECT_AUTH"})
            assert info.value.code == "REDIRECT" and f"HTTP {status}" in str(info.value)
        time.sleep(0.5)
    assert received == []


class _Row:
    def __init__(self, org_id, key_type, version):
        self.org_id, self.key_type, self.version = org_id, key_type, version


def test_registration_refusals(env):
    with pytest.raises(KmsError, match="https://"):
        cache_only.register(env.node, "shop", "field", "http://127.0.0.1:1", "k")
    with pytest.raises(KmsError, match="kid must be"):
        cache_only.register(env.node, "shop", "field", env.url, "bad/kid")
    env.node.create_tenant("no-byok", "sandbox")
    with pytest.raises(KmsError, match="no BYOK seed certificate"):
        cache_only.register(env.node, "no-byok", "field", env.url, "k")


def test_cli_cache_only_flow(kit, env):
    dek = _add_key(env, "cli-k")
    cli_env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", env.node.config.path, *args, env=cli_env)
    # The CLI's own clock is real time; give it an org of its own (the module's clock is ahead).
    assert kms("tenant", "create", "--org", "cli-shop", "--no-secret").returncode == 0
    cert = env.tmp / "cli-shop.pem"
    assert kms("byok", "certificate", "--org", "cli-shop", "--out", str(cert)).returncode == 0
    shutil.copy(cert, env.keys / "cli-k.pem")
    add = kms("cache-only", "add", "--org", "cli-shop", "--url", env.url, "--kid", "cli-k",
              "--ca", str(env.server.ca), "--client-cert", str(env.client.cert),
              "--client-key", str(env.client.key))
    assert add.returncode == 0, add.stderr
    enc = kms("encrypt", "--org", "cli-shop", "hello cache-only")
    assert enc.returncode == 0, enc.stderr
    blob = base64.b64decode(enc.stdout)
    assert FieldEncryptor(CustomerDek(dek)).decrypt("cli-shop", blob) == b"hello cache-only"
    (env.keys / "cli-k.dek").unlink()
    dec = kms("decrypt", "--org", "cli-shop", enc.stdout.strip())
    assert dec.returncode == 2 and "key unavailable" in dec.stderr
    assert "Traceback" not in dec.stderr and dec.stdout == ""
