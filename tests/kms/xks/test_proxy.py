"""The XKS proxy against a real ``kms --config XKS.toml serve`` on a real SoftHSM2 token, every
request signed by botocore: each operation of the specification and each of its errors.

One node for the module with five key stores: ``/main`` (keys of every usage, a disabled key, a
configured key that is not on the token, one credential in a file and one in the environment:
the two live credentials of a rotation), ``/quota/a-b_c`` (2 requests/s), ``""`` (no prefix;
secondary authorisation rules), ``/off`` (a disabled key store) and ``/mtls`` (AWS's client
certificate required).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import time

import botocore.auth
import pytest

from hsm.keys import xks as xkeys
from kms.xks.client import request_metadata, signed_headers
from tests import xks_kit as kit

ALLOWED = "arn:aws:iam::111122223333:role/allowed"
KEYS = {"both": (True, True), "enc-only": (True, False), "dec-only": (False, True),
        "neither": (False, False), "disabled-k": (True, True), "q-key": (True, True),
        "root-key": (True, True), "off-key": (True, True), "m-key": (True, True),
        "rot-key": (True, True), "gone": (True, True)}


@pytest.fixture(scope="module")
def env_and_token(softhsm_session_token_factory):
    tt = softhsm_session_token_factory(prefix="xks")
    for key_id, (enc, dec) in KEYS.items():
        xkeys.create(tt.token, key_id, encrypt=enc, decrypt=dec)
    env = {**os.environ, **tt.env, "HSM_PIN": tt.user_pin.reveal()}
    return env, tt


@pytest.fixture(scope="module")
def setup(env_and_token, tmp_path_factory):
    env, tt = env_and_token
    root = tmp_path_factory.mktemp("xks")
    tls = kit.make_tls(root / "tls")
    creds = {"file": kit.file_cred(root), "env": kit.env_cred(env), "quota": kit.file_cred(root),
             "root": kit.file_cred(root), "off": kit.file_cred(root), "mtls": kit.file_cred(root),
             "rot": kit.file_cred(root)}
    keystores = [
        {"name": "main", "path_prefix": "/main", "region": kit.REGION,
         "keys": ["both", "enc-only", "dec-only", "neither", "disabled-k", "missing-k", "gone"],
         "disabled_keys": ["disabled-k"], "credentials": [creds["file"], creds["env"]]},
        {"name": "quota", "path_prefix": "/quota/a-b_c", "region": kit.REGION,
         "keys": ["q-key"], "requests_per_second": 2, "credentials": [creds["quota"]]},
        {"name": "root", "region": kit.REGION, "keys": ["root-key"],
         "credentials": [creds["root"]],
         "rules": [{"principals": [ALLOWED], "kms_operations": ["Encrypt", "Decrypt",
                                                                "CreateKey"]}]},
        {"name": "off", "path_prefix": "/off", "region": kit.REGION, "keys": ["off-key"],
         "enabled": False, "credentials": [creds["off"]]},
        {"name": "mtls", "path_prefix": "/mtls", "region": kit.REGION, "keys": ["m-key"],
         "mtls_subject": kit.AWS_CN, "credentials": [creds["mtls"]]},
        {"name": "rot", "path_prefix": "/rot", "region": kit.REGION, "keys": ["rot-key"],
         "credentials": [creds["rot"]]},
    ]
    config = kit.write_config(root, tt.label, tls, keystores, metrics_subjects=[kit.MONITOR_CN])
    node = kit.start(config, tls, env)
    yield {"node": node, "creds": creds, "root": root, "tls": tls, "keystores": keystores,
           "label": tt.label,
           "env": env}
    node.kill()


@pytest.fixture
def main(setup):
    c = setup["node"].client("/main", setup["creds"]["file"])
    yield c
    c.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(answer) -> tuple[int, str]:
    status, doc = answer
    return status, doc.get("errorName")


# ------------------------------------------------------------------------------ operations
def test_health_answers_the_fleet_details_with_either_rotated_credential(setup):
    node, creds = setup["node"], setup["creds"]
    for which in ("file", "env"):
        client = node.client("/main", creds[which])
        status, doc = client.health()
        client.close()
        assert status == 200, doc
        assert doc["xksProxyFleetSize"] == 1 and doc["xksProxyVendor"] == "hsm-suite"
        assert doc["xksProxyModel"].startswith("hsm-suite XKS proxy")
        assert doc["ekmVendor"] == "SoftHSM project"
        (fleet,) = doc["ekmFleetDetails"]
        assert fleet["healthStatus"] == "ACTIVE" and fleet["id"].startswith("xks")
        assert "SoftHSM" in fleet["model"]


def test_metadata_reports_each_key_usage_and_a_disabled_key_its_state(main):
    for key_id, usage in (("both", ["ENCRYPT", "DECRYPT"]), ("enc-only", ["ENCRYPT"]),
                          ("dec-only", ["DECRYPT"]), ("neither", [])):
        assert main.metadata(key_id) == (200, {"keySpec": "AES_256", "keyUsage": usage,
                                               "keyStatus": "ENABLED"})
    assert main.metadata("disabled-k") == (200, {"keySpec": "AES_256", "keyStatus": "DISABLED",
                                                 "keyUsage": ["ENCRYPT", "DECRYPT"]})


def test_encrypt_then_decrypt_with_aad_and_a_cdiv_checked_by_recomputing_it(main):
    for plaintext, aad in ((b"Hello World!", b"project=nile,department=marketing"),
                           (os.urandom(4300), os.urandom(8192)), (b"", None)):
        status, enc = main.encrypt("both", plaintext, aad, cdiv=True)
        assert status == 200, enc
        iv, ct, tag = (base64.b64decode(enc[k]) for k in
                       ("initializationVector", "ciphertext", "authenticationTag"))
        assert len(iv) == 12 and len(tag) == 16 and len(ct) == len(plaintext)
        assert "ciphertextMetadata" not in enc
        assert base64.b64decode(enc["ciphertextDataIntegrityValue"]) == hashlib.sha256(
            (aad or b"") + iv + ct + tag).digest()
        assert main.decrypt("both", enc, aad) == (200, {"plaintext": b64(plaintext)})
    # no CDIV unless asked; fresh IVs
    _, one = main.encrypt("both", b"x")
    _, two = main.encrypt("both", b"x")
    assert "ciphertextDataIntegrityValue" not in one
    assert one["initializationVector"] != two["initializationVector"]


@pytest.mark.parametrize("tamper", ["ciphertext", "tag", "iv", "wrong-aad", "no-aad",
                                    "metadata", "short-iv", "short-tag", "bad-base64",
                                    "missing-tag"])
def test_a_tampered_ciphertext_or_wrong_aad_is_invalid_ciphertext(main, tamper):
    _, enc = main.encrypt("both", b"secret data key material!", b"aad")
    aad = b"aad"

    def flip(name):
        raw = bytearray(base64.b64decode(enc[name]))
        raw[0] ^= 1
        enc[name] = b64(bytes(raw))
    if tamper == "ciphertext":
        flip("ciphertext")
    elif tamper == "tag":
        flip("authenticationTag")
    elif tamper == "iv":
        flip("initializationVector")
    elif tamper == "wrong-aad":
        aad = b"aae"
    elif tamper == "no-aad":
        aad = None
    elif tamper == "metadata":
        enc["ciphertextMetadata"] = b64(b"v1")
    elif tamper == "short-iv":
        enc["initializationVector"] = b64(os.urandom(8))
    elif tamper == "short-tag":
        enc["authenticationTag"] = b64(os.urandom(12))
    elif tamper == "bad-base64":
        enc["ciphertext"] = "not base64!"
    elif tamper == "missing-tag":
        del enc["authenticationTag"]
    assert error(main.decrypt("both", enc, aad)) == (400, "InvalidCiphertextException")


def test_aad_cannot_pass_for_ciphertext_metadata(main):
    """The token's AAD carries both lengths: AAD "v1" without metadata is not metadata "v1"."""
    _, enc = main.encrypt("both", b"data", b"v1")
    enc["ciphertextMetadata"] = b64(b"v1")
    assert error(main.decrypt("both", enc, None)) == (400, "InvalidCiphertextException")


def test_each_key_usage_is_refused_where_it_must_be(main):
    _, enc = main.encrypt("both", b"data")
    assert error(main.decrypt("enc-only", enc)) == (400, "InvalidKeyUsageException")
    assert error(main.encrypt("dec-only", b"data")) == (400, "InvalidKeyUsageException")
    assert error(main.encrypt("neither", b"data")) == (400, "InvalidKeyUsageException")
    assert error(main.decrypt("neither", enc)) == (400, "InvalidKeyUsageException")
    status, enc2 = main.encrypt("enc-only", b"data", cdiv=True)   # CDIV without a round trip
    assert status == 200 and "ciphertextDataIntegrityValue" in enc2
    # a ciphertext of one key is nothing to another (the dec-only key never encrypted it)
    assert error(main.decrypt("dec-only", enc)) == (400, "InvalidCiphertextException")


def test_disabled_key_and_disabled_key_store_are_invalid_state(setup, main):
    assert error(main.encrypt("disabled-k", b"data")) == (400, "InvalidStateException")
    _, enc = main.encrypt("both", b"data")
    assert error(main.decrypt("disabled-k", enc)) == (400, "InvalidStateException")
    off = setup["node"].client("/off", setup["creds"]["off"])
    assert error(off.health()) == (400, "InvalidStateException")
    assert error(off.encrypt("off-key", b"data")) == (400, "InvalidStateException")
    off.close()


def test_unknown_keys_and_invalid_key_ids(setup, main):
    assert error(main.metadata("no-such-key")) == (404, "KeyNotFoundException")
    assert error(main.metadata("missing-k")) == (404, "KeyNotFoundException")  # not on token
    assert error(main.encrypt("q-key", b"x")) == (404, "KeyNotFoundException")  # other store
    for bad in ("bad$id", "x" * 129, "..", "key%2Fid"):
        assert error(main.metadata(bad)) == (400, "ValidationException"), bad


def test_a_key_destroyed_behind_the_proxy_is_key_not_found(env_and_token, main):
    """Someone with the user PIN destroys a key the running proxy has cached (XKS keys stay
    destroyable: that is the customer's crypto-shredding): the next use is KeyNotFoundException."""
    from pkcs11 import Attribute
    _, tt = env_and_token
    assert main.encrypt("gone", b"before")[0] == 200
    with tt.token.lease() as lease:
        (obj,) = lease.session.get_objects({Attribute.LABEL: "xks-gone"})
        obj.destroy()
    assert error(main.encrypt("gone", b"after")) == (404, "KeyNotFoundException")


def test_a_saturated_token_path_is_dependency_timeout(env_and_token, tmp_path):
    """One token thread and a 0.1 ms deadline (shorter than a 4300-byte encryption with its CDIV
    round trip, queueing included): those late are answered DependencyTimeoutException (503)
    instead of waiting, and nothing else is answered."""
    import threading
    env, tt = env_and_token
    tls = kit.make_tls(tmp_path / "tls")
    cred = kit.env_cred(env)
    config = kit.write_config(tmp_path, tt.label, tls, [
        {"name": "slow", "path_prefix": "/slow", "region": kit.REGION, "keys": ["both"],
         "credentials": [cred]}], token_timeout_seconds=0.0001, executor_threads=1)
    node = kit.start(config, tls, env)
    answers: list = []

    def client():
        c = node.client("/slow", cred)
        for _ in range(15):
            answers.append(error(c.encrypt("both", os.urandom(4300), os.urandom(8192),
                                           cdiv=True)))
        c.close()
    try:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        node.stop()
    assert set(answers) <= {(200, None), (503, "DependencyTimeoutException")}, set(answers)
    assert (503, "DependencyTimeoutException") in answers


def test_slow_headers_are_cut_and_kept_alive_connections_are_not(env_and_token, tmp_path):
    """The XKS listener's connection guard (kms.xks.guard): a request header that dribbles
    in is cut after header_timeout_seconds; a kept-alive connection that AWS KMS reuses for
    longer than that is not."""
    import socket
    env, tt = env_and_token
    tls = kit.make_tls(tmp_path / "tls")
    cred = kit.env_cred(env)
    config = kit.write_config(tmp_path, tt.label, tls, [
        {"name": "g", "path_prefix": "/g", "region": kit.REGION, "keys": ["both"],
         "credentials": [cred]}], header_timeout_seconds=0.3)
    node = kit.start(config, tls, env)
    try:
        client = node.client("/g", cred)
        for _ in range(8):                    # ~1 s on one connection
            assert client.health()[0] == 200
            time.sleep(0.12)
        conn = client.conn
        assert conn is not None and client.health()[0] == 200 and client.conn is conn
        client.close()
        raw = tls_socket(node.port, setup_tls=tls)
        raw.sendall(b"POST /g/kms/xks/v1/health HTTP/1.1\r\nHost: x")
        time.sleep(0.8)
        with pytest.raises((ConnectionError, ssl.SSLError, socket.timeout, AssertionError)):
            raw.sendall(b"\r\n\r\n")
            assert raw.recv(1), "a slow header was answered"
        raw.close()
    finally:
        node.stop()


def tls_socket(port: int, *, setup_tls):
    import socket
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return setup_tls.context().wrap_socket(sock, server_hostname="localhost")


@pytest.mark.parametrize("path", ["/nope/kms/xks/v1/health", "/kms/xks/v1/health" + "/",
                                  "/main/kms/xks/v2/health", "/main/kms/xks/v1/keys/both/sign",
                                  "/ma%69n/kms/xks/v1/health", "/main/kms/xks/v1/health?x=1",
                                  "/main/extra/kms/xks/v1/health", "/v1/dek"])
def test_invalid_path_prefixes_and_routes(setup, main, path):
    main.base = f"https://localhost:{setup['node'].port}"
    assert error(main.post(path, {"requestMetadata": {"kmsRequestId": "r",
                                                      "kmsOperation": "x"}})) == \
        (404, "InvalidUriPathException")


def test_get_is_405_at_every_operation(setup):
    ctx = setup["tls"].context()
    for path in ("/main/kms/xks/v1/health", "/main/kms/xks/v1/keys/both/encrypt",
                 "/main/kms/xks/v1/keys/both/decrypt", "/main/kms/xks/v1/keys/both/metadata"):
        conn = http.client.HTTPSConnection("localhost", setup["node"].port, context=ctx)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        conn.close()


def test_load_balancer_ping_needs_no_signature_and_no_token(setup):
    conn = http.client.HTTPSConnection("localhost", setup["node"].port,
                                       context=setup["tls"].context())
    conn.request("GET", "/kms/xks/ping")
    assert conn.getresponse().status == 200
    conn.close()


def test_metrics_only_to_the_monitor_certificate(setup, main):
    assert main.encrypt("both", b"counted")[0] == 200
    texts = {}
    for who, status in (("monitor", 200), (None, 403), ("aws", 403)):
        conn = http.client.HTTPSConnection("localhost", setup["node"].port,
                                           context=setup["tls"].context(who))
        conn.request("GET", "/kms/xks/metrics")
        resp = conn.getresponse()
        texts[who] = resp.read().decode()
        conn.close()
        assert resp.status == status, who
    text = texts["monitor"]
    assert 'kms_http_requests_total{method="POST",route="xks.encrypt",status="200"}' in text
    assert 'kms_hsm_operations_total{operation="C_Encrypt(AES_GCM)"}' in text


# ------------------------------------------------------------------------------ SigV4
def test_signature_failures_are_authentication_failed(setup, main, monkeypatch):
    creds = setup["creds"]
    wrong = kit.secret_key()
    assert error(main.health(secret=wrong)) == (401, "AuthenticationFailedException")
    assert error(main.health(service="kms")) == (401, "AuthenticationFailedException")
    assert error(main.health(region="eu-west-1")) == (401, "AuthenticationFailedException")
    assert error(main.health(access_key_id=kit.access_key_id())) == \
        (401, "AuthenticationFailedException")
    # the credential of another key store is unknown here
    assert error(main.health(access_key_id=creds["quota"].access_key_id,
                             secret=creds["quota"].secret)) == \
        (401, "AuthenticationFailedException")
    for minutes in (-6, 6):      # outside the five-minute window, either side
        at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + \
            dt.timedelta(minutes=minutes)
        monkeypatch.setattr(botocore.auth, "get_current_datetime",
                            lambda remove_tzinfo=True, at=at: at)
        assert error(main.health()) == (401, "AuthenticationFailedException"), minutes
    # the client learns only that it failed; why (here: an unknown access key id) is in the log
    status, doc = main.health(access_key_id=kit.access_key_id())
    assert doc == {"errorName": "AuthenticationFailedException",
                   "errorMessage": "SigV4 authentication failed"}
    assert any("unknown access key id" in r.get("detail", "") for r in setup["node"].audit())
    at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=4)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: at)
    assert main.health()[0] == 200          # four minutes of skew is inside the window


def _send(port, ctx, path, body: bytes, headers: dict):
    conn = http.client.HTTPSConnection("localhost", port, context=ctx)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_the_signature_covers_the_received_body_and_its_own_signed_headers(setup):
    node, cred = setup["node"], setup["creds"]["file"]
    url = node.base("/main") + "/keys/both/encrypt"
    doc = {"requestMetadata": request_metadata("Encrypt"), "plaintext": b64(b"pay 10"),
           "encryptionAlgorithm": "AES_GCM"}
    body = json.dumps(doc).encode()
    hdrs = signed_headers("POST", url, body, cred.access_key_id, cred.secret, kit.REGION,
                          headers={"X-Extra": "signed too"})
    assert "x-extra" in hdrs["Authorization"]     # botocore signs it: we verify what it listed
    path, ctx = "/main/kms/xks/v1/keys/both/encrypt", setup["tls"].context()
    assert _send(node.port, ctx, path, body, hdrs)[0] == 200
    tampered = body.replace(b(b"pay 10"), b(b"pay 99"))
    assert error(_send(node.port, ctx, path, tampered, hdrs)) == \
        (401, "AuthenticationFailedException")
    assert error(_send(node.port, ctx, path, body, {**hdrs, "X-Extra": "changed"})) == \
        (401, "AuthenticationFailedException")
    assert _send(node.port, ctx, path, body, {**hdrs, "X-Unsigned": "free"})[0] == 200
    no_auth = {k: v for k, v in hdrs.items() if k != "Authorization"}
    assert error(_send(node.port, ctx, path, body, no_auth)) == \
        (401, "AuthenticationFailedException")


def b(data: bytes) -> bytes:
    return b64(data).encode()


# ------------------------------------------------------------------------------ limits
def test_sizes_and_malformed_requests(main):
    big_arn = "arn:aws:iam::111122223333:role/" + "r" * 2048
    assert error(main.encrypt("both", os.urandom(4301))) == (501, "UnsupportedOperationException")
    assert error(main.encrypt("both", b"x", os.urandom(8193))) == \
        (501, "UnsupportedOperationException")
    assert error(main.encrypt("both", b"x", meta=request_metadata("Encrypt", big_arn))) == \
        (501, "UnsupportedOperationException")
    _, enc = main.encrypt("both", b"x")
    enc["ciphertextMetadata"] = b64(os.urandom(21))
    assert error(main.decrypt("both", enc)) == (400, "ValidationException")
    path = "/keys/both/encrypt"
    for doc in ({"plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"},
                {"requestMetadata": request_metadata("Encrypt"), "encryptionAlgorithm": "AES_GCM"},
                {"requestMetadata": request_metadata("Encrypt"), "plaintext": "!!",
                 "encryptionAlgorithm": "AES_GCM"},
                {"requestMetadata": request_metadata("Encrypt"), "plaintext": b64(b"x"),
                 "encryptionAlgorithm": "AES_CBC"},
                {"requestMetadata": request_metadata("Encrypt"), "plaintext": b64(b"x"),
                 "encryptionAlgorithm": "AES_GCM",
                 "ciphertextDataIntegrityValueAlgorithm": "MD5"},
                {"requestMetadata": {"kmsOperation": "Encrypt"}, "plaintext": b64(b"x"),
                 "encryptionAlgorithm": "AES_GCM"}):
        assert error(main.post(path, doc)) == (400, "ValidationException"), doc
    assert error(main.post(path, b"{not json")) == (400, "ValidationException")
    assert error(main.post(path, b"x" * 70000)) == (501, "UnsupportedOperationException")
    # a kmsOperation nobody listed and requestMetadata fields KMS may add later are accepted
    meta = request_metadata("BulkEncrypt", SourceIdentity="alice", kmsViaService="ebs")
    assert main.encrypt("both", b"x", meta=meta)[0] == 200


def test_throttling_per_key_store_quota(setup):
    client = setup["node"].client("/quota/a-b_c", setup["creds"]["quota"])
    answers = [error(client.health()) for _ in range(6)]
    client.close()
    assert (429, "ThrottlingException") in answers
    assert answers[0] == (200, None)
    main = setup["node"].client("/main", setup["creds"]["file"])   # other stores unaffected
    assert main.health()[0] == 200
    main.close()


# ------------------------------------------------------------------------------ authorisation
def test_secondary_authorisation_from_request_metadata(setup):
    client = setup["node"].client("", setup["creds"]["root"])
    ok = request_metadata("Encrypt", ALLOWED)
    status, enc = client.encrypt("root-key", b"data", meta=ok)
    assert status == 200
    assert client.decrypt("root-key", enc, meta=request_metadata("Decrypt", ALLOWED))[0] == 200
    other = request_metadata("Encrypt", "arn:aws:iam::999999999999:user/mallory")
    assert error(client.encrypt("root-key", b"data", meta=other)) == \
        (403, "AccessDeniedException")
    assert error(client.encrypt("root-key", b"x", meta=request_metadata("ReEncrypt", ALLOWED))) \
        == (403, "AccessDeniedException")
    assert client.health()[0] == 200          # GetHealthStatus is never subject to it
    client.close()
    lines = [r for r in setup["node"].audit() if r.get("result") == "AccessDeniedException"
             and r["op"] == "xks.encrypt"]
    assert lines and "mallory" in lines[0]["detail"] and "ReEncrypt" in lines[-1]["detail"]


# ------------------------------------------------------------------------------ mTLS
def test_mtls_key_store_requires_the_configured_certificate_others_do_not(setup):
    node, cred = setup["node"], setup["creds"]["mtls"]
    with_aws = node.client("/mtls", cred, who="aws")
    assert with_aws.health()[0] == 200
    with_aws.close()
    for who in (None, "other-cn", "other-ca"):
        client = node.client("/mtls", cred, who=who)
        with pytest.raises((ConnectionError, http.client.HTTPException, ssl.SSLError)):
            client.health()
        client.close()
    # a certificate from another CA is refused by the TLS layer, even for a key store without
    # mTLS (which serves a client with no certificate: see below). With TLS 1.3 the client may
    # see the server's alert as a reset on its first read rather than as an SSLError.
    client = node.client("/main", setup["creds"]["file"], who="other-ca")
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        client.health()
    client.close()
    # the same listener serves a key store without mTLS to a client without a certificate
    plain = node.client("/main", setup["creds"]["file"])
    assert plain.health()[0] == 200
    plain.close()


# ------------------------------------------------------------------------------ audit
def test_audit_has_request_id_and_principal_never_plaintext_or_aad(setup, main):
    secret_pt, secret_aad = b"plaintext-" + os.urandom(8).hex().encode(), b"aad-" + os.urandom(8).hex().encode()
    meta = request_metadata("GenerateDataKey", "arn:aws:iam::111122223333:user/Alice")
    status, enc = main.encrypt("both", secret_pt, secret_aad, meta=meta)
    assert status == 200
    assert main.decrypt("both", enc, secret_aad)[0] == 200
    records = setup["node"].audit()
    mine = [r for r in records if r.get("request_id") == meta["kmsRequestId"]]
    assert len(mine) == 1 and mine[0]["client"] == meta["awsPrincipalArn"]
    assert mine[0]["op"] == "xks.encrypt" and mine[0]["org"] == "main"
    assert "kmsOperation=GenerateDataKey" in mine[0]["detail"]
    assert f"accessKeyId={setup['creds']['file'].access_key_id}" in mine[0]["detail"]
    text = (setup["node"].config.parent / "audit" / "audit-w0.jsonl").read_text()
    for leaked in (secret_pt, secret_aad, b64(secret_pt), b64(secret_aad), enc["ciphertext"]):
        assert (leaked.decode() if isinstance(leaked, bytes) else leaked) not in text
    from kms.server.audit import verify
    assert verify(setup["node"].config.parent / "audit" / "audit-w0.jsonl")[1] is None


# ------------------------------------------------------------------------------ rotation
def test_credentials_rotate_on_sighup_without_a_restart(setup):
    """Add a second credential, then remove the first: each step by SIGHUP, never a restart.
    (It rewrites the node's configuration; the other key stores stay as they were.)"""
    import signal
    import time
    node, root = setup["node"], setup["root"]
    old, new = setup["creds"]["rot"], kit.file_cred(root)
    stores = setup["keystores"]

    def rewrite(creds):
        stores[-1]["credentials"] = creds
        kit.write_config(root, setup["label"], setup["tls"], stores,
                         metrics_subjects=[kit.MONITOR_CN])
        node.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
    pid = node.proc.pid
    rewrite([old, new])
    for cred in (old, new):
        c = node.client("/rot", cred)
        assert c.health()[0] == 200
        c.close()
    rewrite([new])
    c = node.client("/rot", old)
    assert error(c.health()) == (401, "AuthenticationFailedException")
    c.close()
    c = node.client("/rot", new)
    assert c.health()[0] == 200
    c.close()
    assert node.proc.pid == pid and node.proc.poll() is None


# ------------------------------------------------------------------------------ curl
def test_curl_aws_sigv4_round_trip(setup):
    """The specification's troubleshooting tool: curl --aws-sigv4 (7.75+) signs its own way
    (its own SignedHeaders, content-type among them); the proxy verifies what it received.
    The secret goes to curl on stdin (-K -), never on its command line."""
    import shutil
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    version = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    if "--aws-sigv4" not in subprocess.run([curl, "--help", "all"], capture_output=True,
                                           text=True).stdout:
        pytest.skip(f"this curl has no --aws-sigv4: {version.splitlines()[0]}")
    node, cred = setup["node"], setup["creds"]["env"]

    def call(op, doc):
        config = (f'user = "{cred.access_key_id}:{cred.secret}"\n'
                  f'aws-sigv4 = "aws:amz:{kit.REGION}:kms-xks-proxy"\n')
        proc = subprocess.run(
            [curl, "-sS", "-K", "-", "--cacert", str(setup["tls"].ca), "-X", "POST",
             "-H", "Content-Type: application/json", "--data-binary", json.dumps(doc),
             node.base("/main") + f"/keys/both/{op}"],
            input=config, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    enc = call("encrypt", {"requestMetadata": request_metadata("Encrypt"),
                           "plaintext": b64(b"Hello World!"), "encryptionAlgorithm": "AES_GCM",
                           "additionalAuthenticatedData": b64(b"curl")})
    assert "ciphertext" in enc, enc
    dec = call("decrypt", {"requestMetadata": request_metadata("Decrypt"),
                           "encryptionAlgorithm": "AES_GCM",
                           "additionalAuthenticatedData": b64(b"curl"),
                           **{k: enc[k] for k in ("ciphertext", "initializationVector",
                                                  "authenticationTag")}})
    assert dec == {"plaintext": b64(b"Hello World!")}


# ------------------------------------------------------------------------------ kms serve
def test_two_workers_under_the_supervisor_probe_and_drain(env_and_token, tmp_path):
    """An [xks]-only node with two worker processes (one socket, the KMS's supervisor): the
    operator's probe (python -m kms.xks probe, botocore-signed) passes against it, and SIGTERM
    drains both workers to exit 0 with a verifiable audit chain per worker."""
    env, tt = env_and_token
    tls = kit.make_tls(tmp_path / "tls")
    cred = kit.env_cred(env)
    config = kit.write_config(tmp_path, tt.label, tls, [
        {"name": "two", "path_prefix": "/two", "region": kit.REGION, "keys": ["both"],
         "credentials": [cred]}])
    node = kit.start(config, tls, env, workers=2)
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "kms.xks", "probe", "--url", node.base("/two"),
             "--access-key-id", cred.access_key_id, "--secret-source", cred.source,
             "--region", kit.REGION, "--key", "both", "--ca", str(tls.ca)],
            capture_output=True, text=True, env=env, timeout=60)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        lines = probe.stdout.splitlines()
        assert [x.split()[0] for x in lines] == ["GetHealthStatus", "GetKeyMetadata", "Encrypt",
                                                "Decrypt"]
        assert all(x.split()[1] == "200" for x in lines)
        assert cred.secret not in probe.stdout + probe.stderr
    finally:
        assert node.stop() == 0
    from kms.server.audit import verify
    for w in (0, 1):
        path = tmp_path / "audit" / f"audit-w{w}.jsonl"
        assert verify(path)[1] is None
        assert '"op":"worker.stop"' in path.read_text()
