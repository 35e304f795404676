"""The KMS service on one real `kms serve` process: mTLS refusals, authorisation from the verified
certificate, every route, bad input, limits, audit, metrics, SIGHUP and SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import threading
import time

import pytest

from kms.node import config as configs
from kms.errors import ConfigError
from kms.server import auditchain
from tests.service_kit import ACME_ID, DATA_ID, node_fixtures
from tests.helpers import run_cli, start_threads


node, local = node_fixtures(
    lambda kit: kit.config(header_timeout_seconds=1.0, max_body_bytes=4096))


def _org(node, name, **kw):
    status, body = node.call("POST", "/v1/tenants", {"org": name, **kw}, who="admin")
    assert status == 201, body
    return body


def _dek(node, org, who="data", **kw):
    return node.call("POST", "/v1/dek", {"org": org, **kw}, who=who)


def _handshake(node, ctx) -> bytes:
    """Connect, handshake and ask; return what the server sent (b'' if it hung up)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(4096)


# ----------------------------------------------------------------------------- mTLS
@pytest.mark.parametrize("who", [None, "other-ca", "expired"])
def test_tls_refuses_no_certificate_another_ca_and_an_expired_one(node, who):
    ctx = node.tls.context(who)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        answer = _handshake(node, ctx)
        # TLS 1.3: the client's handshake completes before the server's verdict arrives
        assert answer == b"", answer
        raise ConnectionResetError("closed without an answer")
    assert node.call("GET", "/healthz")[0] == 200


def test_a_ca_signed_client_the_policy_does_not_name_gets_403(node):
    _org(node, "acme-403")
    status, body = _dek(node, "acme-403", who="unauthorised", purpose="encrypt")
    assert (status, body["error"]) == (403, "forbidden")
    assert "not named by the policy" in body["message"]


def test_authorisation_reads_the_verified_certificate_never_a_header(node):
    _org(node, "acme-hdr")
    forged = {"X-Client-Identity": DATA_ID, "X-SSL-Client-S-DN": f"CN={DATA_ID}",
              "X-Forwarded-Client-Cert": f"URI={DATA_ID}", "X-Request-Id": "forged-1"}
    status, body = node.call("POST", "/v1/dek", {"org": "acme-hdr", "purpose": "encrypt"},
                             who="unauthorised", headers=forged)
    assert status == 403
    # And the other way round: the authorised certificate works whatever headers say.
    status, _ = node.call("POST", "/v1/dek", {"org": "acme-hdr", "purpose": "encrypt"},
                          who="data", headers={"X-Client-Identity": "spiffe://test/nobody"})
    assert status == 200


def test_authorisation_by_org_pattern_and_key_type(node):
    _org(node, "acme-one")
    _org(node, "globex")
    _org(node, "acme-db", key_type="database", org_type="sandbox")
    assert _dek(node, "acme-one", who="acme", purpose="encrypt")[0] == 200
    assert _dek(node, "globex", who="acme", purpose="encrypt")[0] == 403
    status, body = _dek(node, "acme-db", who="acme", purpose="decrypt", key_type="database",
                        version=1)
    assert status == 403 and "database" in body["message"]
    # the data client (orgs "*", both key types) may; the key is just not usable for 24 h
    assert _dek(node, "acme-db", purpose="decrypt", key_type="database", version=1)[0] == 200
    # a certificate without SANs is named by its CN
    _org(node, "cn-x")
    assert _dek(node, "cn-x", who="cn", purpose="encrypt")[0] == 200
    assert _dek(node, "acme-one", who="cn", purpose="encrypt")[0] == 403


def test_admin_and_data_plane_are_separate_roles(node):
    status, body = node.call("POST", "/v1/tenants", {"org": "role-x"}, who="data")
    assert status == 403 and "admin role" in body["message"]
    _org(node, "role-y")
    assert _dek(node, "role-y", who="admin", purpose="encrypt")[0] == 403
    assert node.call("POST", "/v1/tenants/role-y/destroy", {"version": 1}, who="status")[0] \
        == 403
    assert node.call("GET", "/v1/status", who="data")[0] == 403
    assert node.call("GET", "/v1/status", who="status")[0] == 200
    assert node.call("GET", "/v1/status", who="admin")[0] == 200   # admin implies status
    assert node.call("GET", "/metrics", who="data")[0] == 403


# ----------------------------------------------------------------------------- data plane
def test_dek_over_mtls_equals_the_node_library_and_versions_fragments_work(node, local):
    _org(node, "dek-eq")
    status, enc = _dek(node, "dek-eq", purpose="encrypt")
    assert status == 200 and enc["version"] == 1 and enc["derivation"] == "PBKDF2"
    assert base64.b64decode(enc["dek"]) == local.dek_for_decrypt("dek-eq", "field", 1)
    status, dec = _dek(node, "dek-eq", purpose="decrypt", version=1)
    assert dec["dek"] == enc["dek"] and "derivation" not in dec
    status, frag = _dek(node, "dek-eq", purpose="decrypt", version=1, fragment="part-7")
    assert status == 200 and frag["dek"] != enc["dek"]
    assert base64.b64decode(frag["dek"]) == local.dek_for_decrypt("dek-eq", "field", 1,
                                                                  "part-7")


def test_tenant_lifecycle_over_the_admin_routes(node, local):
    # create without a secret, then rotate makes v1; a second rotate hits the rate limit
    body = _org(node, "life", secret=False)
    assert "version" not in body
    assert node.call("POST", "/v1/tenants", {"org": "life"}, who="admin")[0] == 409
    status, body = node.call("POST", "/v1/tenants/life/rotate", {}, who="admin")
    assert (status, body["version"]) == (200, 1)
    status, body = node.call("POST", "/v1/tenants/life/rotate", {}, who="admin")
    assert (status, body["error"]) == (429, "rate_limited")
    assert int(node.last_headers["Retry-After"]) > 23 * 3600
    # BYOK upload of a DEK (derivation NONE): the service hands back exactly that DEK
    _org(node, "byok", secret=False)
    material = os.urandom(32)
    status, body = node.call("POST", "/v1/tenants/byok/upload", {
        "material": base64.b64encode(material).decode(), "derivation": "NONE"}, who="admin")
    assert (status, body["version"]) == (201, 1)
    status, enc = _dek(node, "byok", purpose="encrypt")
    assert base64.b64decode(enc["dek"]) == material and enc["derivation"] == "NONE"
    # list, export, destroy
    status, body = node.call("GET", "/v1/tenants/byok", who="admin")
    assert status == 200 and [s["state"] for s in body["secrets"]] == ["ACTIVE"]
    assert "wrapped" not in json.dumps(body)
    status, backup = node.call("GET", "/v1/tenants/byok/export", who="admin")
    assert status == 200 and backup["format"] == "hsm-suite-tenant-backup"
    assert material.hex() not in json.dumps(backup) and enc["dek"] not in json.dumps(backup)
    status, body = node.call("POST", "/v1/tenants/byok/destroy", {"version": 1}, who="admin")
    assert (status, body["state"]) == (200, "DESTROYED")
    status, body = _dek(node, "byok", purpose="decrypt", version=1)
    assert (status, body["error"]) == (410, "key_destroyed")
    status, body = _dek(node, "byok", purpose="encrypt")
    assert (status, body["error"]) == (409, "conflict")
    # a database secret may not be destroyed before its 90 days
    _org(node, "db-keep", key_type="database")
    status, body = node.call("POST", "/v1/tenants/db-keep/destroy",
                             {"key_type": "database", "version": 1}, who="admin")
    assert (status, body["error"]) == (409, "policy_violation")


def test_unknown_org_and_unknown_version_are_404(node):
    status, body = _dek(node, "no-such-org", purpose="encrypt")
    assert (status, body["error"]) == (404, "unknown_org")
    _org(node, "has-v1")
    status, body = _dek(node, "has-v1", purpose="decrypt", version=9)
    assert (status, body["error"]) == (404, "unknown_version")
    status, body = node.call("POST", "/v1/tenants/has-v1/destroy", {"version": 9}, who="admin")
    assert status == 404


# ----------------------------------------------------------------------------- bad input
BAD = [
    (b"{not json", 400, "malformed_json"),
    (b"\xff\xfe", 400, "malformed_json"),
    (b"[1, 2]", 400, "bad_request"),
    (json.dumps({"org": 5, "purpose": "encrypt"}).encode(), 400, "bad_request"),
    (json.dumps({"org": "x", "purpose": "encrypt", "extra": 1}).encode(), 400, "unknown_field"),
    (json.dumps({"org": "x", "purpose": "sign"}).encode(), 400, "bad_request"),
    (json.dumps({"org": "x", "purpose": "decrypt"}).encode(), 400, "bad_request"),
    (json.dumps({"org": "x", "purpose": "decrypt", "version": "1"}).encode(), 400,
     "bad_request"),
    (json.dumps({"org": "x", "purpose": "decrypt", "version": True}).encode(), 400,
     "bad_request"),
    (json.dumps({"org": "x", "purpose": "decrypt", "version": 0}).encode(), 400,
     "bad_request"),
    (json.dumps({"org": "x", "purpose": "encrypt", "version": 1}).encode(), 400,
     "bad_request"),
    (json.dumps({"org": "x", "purpose": "encrypt", "key_type": "disk"}).encode(), 400,
     "bad_request"),
    (json.dumps({"org": "a\nb", "purpose": "encrypt"}).encode(), 400, "bad_request"),
    (json.dumps({"org": "x" * 256, "purpose": "encrypt"}).encode(), 400, "bad_request"),
    (json.dumps({"org": "x", "purpose": "encrypt", "fragment": ""}).encode(), 400,
     "bad_request"),
]


@pytest.mark.parametrize("raw,status,code", BAD)
def test_bad_dek_requests_get_a_4xx_json_error(node, raw, status, code):
    got, body = node.call("POST", "/v1/dek", raw=raw)
    assert (got, body["error"]) == (status, code), body
    assert "Traceback" not in json.dumps(body)


def test_bad_admin_requests_oversized_bodies_and_unknown_routes(node):
    _org(node, "bad-admin", secret=False)
    for body in ({"material": "not base64!"}, {"material": base64.b64encode(b"short").decode()},
                 {"material": 32}, {"material": base64.b64encode(bytes(32)).decode(),
                                    "derivation": "HKDF"}):
        status, answer = node.call("POST", "/v1/tenants/bad-admin/upload", body, who="admin")
        assert status == 400, (body, answer)
    status, answer = node.call("POST", "/v1/tenants", {"org": "x", "org_type": "gold"},
                               who="admin")
    assert status == 400
    status, answer = node.call("POST", "/v1/dek", raw=b"{" + b" " * 8192 + b"}")
    assert (status, answer["error"]) == (413, "body_too_large")
    # one byte over max_body_bytes (4096), whole with its header (the body is taken from the
    # buffer as it lies) and after a pause (the body is awaited): 413 either way
    over = b"{" + b" " * 4095 + b"}"
    head = (f"POST /v1/dek HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(over)}\r\n\r\n").encode()
    for pause in (None, 0.3):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
            with node.tls.context("data").wrap_socket(raw, server_hostname="localhost") as s:
                if pause is None:
                    s.sendall(head + over)
                else:
                    s.sendall(head)
                    time.sleep(pause)
                    s.sendall(over)
                answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413 ") and b'"body_too_large"' in answer, \
            (pause, answer.split(b"\r\n\r\n", 1)[-1])
    status, answer = node.call("GET", "/v2/nothing")
    assert (status, answer["error"]) == (404, "not_found")
    status, answer = node.call("GET", "/v1/dek")
    assert (status, answer["error"]) == (405, "method_not_allowed")


def test_slow_headers_are_cut_while_other_clients_are_served(node):
    """A client dribbling its request header (slowloris) is disconnected after the header
    timeout (1 s in this node), though each byte arrives well inside the idle timeout."""
    ctx = node.tls.context("data")
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    cut = False
    try:
        for ch in b"POST /v1/dek HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400:
            s.sendall(bytes([ch]))
            assert node.call("GET", "/healthz")[0] == 200   # others are served meanwhile
            time.sleep(0.2)
    except (ConnectionError, ssl.SSLError, BrokenPipeError):
        cut = True
    finally:
        s.close()
    assert cut, "the slow client was never disconnected"


def test_thousands_of_dropped_connections_leave_the_node_serving(node):
    _org(node, "after-storm")
    for i in range(2000):      # TCP connect and drop at once
        socket.create_connection(("127.0.0.1", node.port), timeout=10).close()
    ctx = node.tls.context("data")
    for i in range(100):       # TLS handshake done, then dropped without a request
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost").close()
    for i in range(100):       # half a request, then dropped
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"POST /v1/dek HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"org\"")
    assert _dek(node, "after-storm", purpose="encrypt")[0] == 200
    assert node.call("GET", "/readyz")[0] == 200


# ----------------------------------------------------------------------------- metrics, docs
def test_metrics_count_requests_cache_hsm_and_refusals(node):
    _org(node, "metered")
    for _ in range(3):
        _dek(node, "metered", purpose="encrypt")
    # a named client outside its orgs (refused by the policy: role data) and a certificate the
    # policy does not name (refused by the guard: role none); each counted under its role
    assert _dek(node, "metered", who="acme", purpose="encrypt")[0] == 403
    _dek(node, "metered", who="unauthorised", purpose="encrypt")
    status, text = node.call("GET", "/metrics", who="status")
    assert status == 200
    lines = text.splitlines()
    assert any(line.startswith('kms_http_requests_total{method="POST",route="/v1/dek",'
                               'status="200"}') for line in lines)
    assert any(line.startswith('kms_authz_refusals_total{role="data"}') for line in lines)
    assert any(line.startswith('kms_authz_refusals_total{role="none"}') for line in lines)
    hits = next(float(line.split()[-1]) for line in lines
                if line.startswith("kms_cache_hits_total"))
    assert hits >= 2
    assert any(line.startswith('kms_hsm_operations_total{operation="C_Sign(SHA256_HMAC)"}')
               for line in lines)
    assert any(line.startswith("kms_hsm_operation_seconds_bucket") for line in lines)
    assert any(line.startswith('kms_worker{pid=') and 'worker="0"' in line for line in lines)
    assert any(line.startswith("kms_import_refusals 0") for line in lines)
    # cache hits on this SQLite node were answered on the event loop, without the pool hop
    inline = next(float(line.split()[-1]) for line in lines
                  if line.startswith("kms_dek_inline_total"))
    assert inline >= 2


def test_openapi_document_covers_every_route(node):
    from kms.server import app as apps
    status, doc = node.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(method, path) for method, path, _ in apps.ROUTES}
    assert documented == served


# ----------------------------------------------------------------------------- config
def test_service_section_is_strict(service_kit, tmp_path):
    good = service_kit.config()
    text = good.read_text()
    cases = {
        "unknown key": text.replace("[service]\n", "[service]\nthreads = 4\n"),
        "bad role": text.replace('roles = ["status"]', 'roles = ["root"]'),
        "client key": text.replace('roles = ["status"]', 'roles = ["status"]\npin = "1234"'),
        "wrong type": text.replace("workers = 1", 'workers = "two"'),
        "missing ca": "\n".join(line for line in text.splitlines()
                                if not line.startswith("client_ca")),
    }
    for why, body in cases.items():
        bad = tmp_path / f"{why.replace(' ', '-')}.toml"
        bad.write_text(body)
        with pytest.raises(ConfigError):
            configs.load(bad)
        proc = run_cli("kms", "--config", bad, "serve", timeout=60)
        assert proc.returncode == 2, (why, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- signals, audit
def _metric(node, name: str) -> float:
    status, text = node.call("GET", "/metrics", who="status")
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.mark.parametrize("loop", [None, "asyncio"])
def test_a_worker_serves_on_uvloop_by_default_and_on_asyncio_when_told(service_kit, loop):
    """The loop the worker says it runs on is the running loop's own module (not the setting
    read back), and a DEK fetch with its durable audit record works on either."""
    cfg = service_kit.config() if loop is None else service_kit.config(event_loop=loop)
    n = service_kit.start(cfg)
    try:
        _org(n, f"loop-{loop}")
        status, body = _dek(n, f"loop-{loop}", purpose="encrypt")
        assert status == 200 and len(base64.b64decode(body["dek"])) == 32
    finally:
        assert n.stop() == 0
    assert f"worker 0: event loop {loop or 'uvloop'}" in n.stderr()


def test_sighup_reloads_the_client_policy(service_kit):
    cfg = service_kit.config()
    n = service_kit.start(cfg)
    try:
        _org(n, "hup")
        assert _dek(n, "hup", who="unauthorised", purpose="encrypt")[0] == 403
        text = cfg.read_text() + ('\n[[service.clients]]\nidentity = "spiffe://test/nobody"\n'
                                  'roles = ["data"]\norgs = ["hup"]\n')
        cfg.write_text(text)
        n.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _dek(n, "hup", who="unauthorised", purpose="encrypt")[0] != 200:
            assert time.monotonic() < deadline, "policy not reloaded"
            time.sleep(0.05)
        # a broken file keeps the policy in force
        cfg.write_text(text + "\n[[service.clients]]\nidentity = 5\n")
        n.signal(signal.SIGHUP)
        assert _dek(n, "hup", who="unauthorised", purpose="encrypt")[0] == 200
        assert _dek(n, "hup", who="data", purpose="encrypt")[0] == 200
    finally:
        assert n.stop() == 0


def test_a_request_past_its_time_limit_is_answered_408_and_the_node_serves_on(service_kit):
    """request_timeout_seconds holds (the worker's sweep, kms.server.deadlines): a cache miss
    that takes 50,000 PBKDF2 iterations is answered 408 `timeout` (a finished derivation would
    have been 200), the same request line shows in no 5xx, and the node answers others."""
    cfg = service_kit.config(store=str(service_kit.root / "slow.db"), request_timeout_seconds=0.2)
    cfg.write_text(cfg.read_text().replace("pbkdf2_iterations = 50",
                                           "pbkdf2_iterations = 50000"))
    n = service_kit.start(cfg)
    try:
        _org(n, "slow")
        status, body = _dek(n, "slow", purpose="decrypt", version=1, fragment="f1")
        assert (status, body["error"]) == (408, "timeout"), body
        assert n.call("GET", "/healthz")[0] == 200
        status, text = n.call("GET", "/metrics", who="status")
        assert 'kms_http_requests_total{method="POST",route="/v1/dek",status="408"} 1.0' \
            in text.splitlines()
    finally:
        assert n.stop() == 0


def test_sigterm_drains_in_flight_requests_and_exits_0_and_the_audit_chain_verifies(
        service_kit):
    """Eight slow cache misses (20,000 PBKDF2 iterations each) are in flight when SIGTERM
    arrives: all eight are answered 200, then the node exits 0 and its audit log verifies. Neither
    the audit log nor the node's stdout/stderr holds a DEK or the PIN."""
    cfg = service_kit.config(store=str(service_kit.root / "drain.db"))
    cfg.write_text(cfg.read_text().replace("pbkdf2_iterations = 50",
                                           "pbkdf2_iterations = 20000"))
    n = service_kit.start(cfg)
    _org(n, "drain")
    results, started = [], threading.Barrier(9, timeout=60)

    def fetch(i):
        started.wait()
        results.append(_dek(n, "drain", purpose="decrypt", version=1, fragment=f"f{i}"))
    fetching = start_threads(8, fetch)
    started.wait()
    deadline = time.monotonic() + 30
    while _metric(n, "kms_http_inflight") < 8:
        assert time.monotonic() < deadline and all(t.is_alive() for t in fetching.threads)
        time.sleep(0.01)
    n.signal(signal.SIGTERM)
    fetching.join(60)  # re-raises a fetch that failed
    assert n.proc.wait(60) == 0
    assert [status for status, _ in results] == [200] * 8
    deks = {body["dek"] for _, body in results}
    assert len(deks) == 8
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", n.port), timeout=5).close()
    log = cfg.parent / "audit" / "audit-w0.jsonl"
    proc = run_cli("kms", "audit", "verify", log, timeout=60)
    assert proc.returncode == 0 and "chain intact" in proc.stdout, proc.stdout + proc.stderr
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    fetches = [r for r in records if r["op"] == "dek.decrypt"]
    assert len(fetches) == 8 and {r["client"] for r in fetches} == {DATA_ID}
    assert all(r["org"] == "drain" and r["version"] == 1 and r["result"] == "ok"
               for r in fetches)
    assert [r["op"] for r in records[-2:]] == ["worker.stop", "audit.checkpoint"]
    logs = n.stderr() + "\n".join(n.lines)
    pin = service_kit.kit.regionals["eu"].user_pin.reveal()
    assert "drain" in text and pin not in text and pin not in logs
    for dek in deks:   # never any key material, in the audit log or the node's output
        for form in (dek, base64.b64decode(dek).hex()):
            assert form not in text and form not in logs


def test_audit_records_refusals_and_verify_reports_the_first_break(node, tmp_path):
    _org(node, "audited")
    _dek(node, "audited", who="acme", purpose="encrypt")      # refused: org not acme-*
    _dek(node, "audited", purpose="decrypt", version=5)        # 404
    log = node.config.parent / "audit" / "audit-w0.jsonl"
    deadline = time.monotonic() + 30
    while True:   # the writer thread appends in batches: wait for the last of our records
        records = [json.loads(line) for line in log.read_text().splitlines()]
        if any(r.get("org") == "audited" and r.get("result") == "unknown_version"
               for r in records):
            break
        assert time.monotonic() < deadline, "audit batch never written"
        time.sleep(0.05)
    create = next(r for r in records if r["op"] == "tenant.create" and r["org"] == "audited")
    assert create["client"] == "spiffe://test/admin" and create["status"] == 201
    assert any(r["op"] == "authz" and r["client"] == ACME_ID and r["status"] == 403
               and r["org"] == "audited" for r in records)
    assert any(r["op"] == "dek.decrypt" and r["result"] == "unknown_version"
               and r["version"] == 5 for r in records)
    assert auditchain.verify(log).intact
    lines = log.read_text().splitlines(keepends=True)
    for k, mutate in ((3, lambda r: r.update(org="someone-else")), (5, None)):
        copy = tmp_path / f"tampered-{k}.jsonl"
        changed = list(lines)
        if mutate is None:
            del changed[k - 1]                      # a line removed
        else:
            rec = json.loads(changed[k - 1])
            mutate(rec)
            changed[k - 1] = json.dumps(rec) + "\n"  # a field changed
        copy.write_text("".join(changed))
        verdict = auditchain.verify(copy)
        assert verdict.broken_at == k and verdict.why.startswith(f"line {k}:"), verdict.why
        proc = run_cli("kms", "audit", "verify", copy, timeout=60)
        assert proc.returncode == 1 and f"line {k}" in proc.stdout



def test_max_concurrent_sheds_with_503_and_max_connections_refuses_extra_connections(
        service_kit):
    """One worker allowed 1 request in flight and 4 connections: a second concurrent request
    is answered 503 overloaded with Retry-After (not queued), a fifth connection is cut at once;
    both recover when the first ones finish. An idle kept-alive connection is closed."""
    cfg = service_kit.config(store=str(service_kit.root / "limits.db"), max_concurrent=1,
                             max_connections=4, idle_timeout_seconds=1.0)
    cfg.write_text(cfg.read_text().replace("pbkdf2_iterations = 50",
                                           "pbkdf2_iterations = 40000"))
    n = service_kit.start(cfg)
    try:
        _org(n, "limits")
        slow = start_threads(1, lambda i: _dek(n, "limits", purpose="decrypt", version=1,
                                               fragment="slow"))
        deadline = time.monotonic() + 30
        while _metric(n, "kms_http_inflight") < 1:
            assert time.monotonic() < deadline and slow.threads[0].is_alive()
            time.sleep(0.01)
        status, body = _dek(n, "limits", purpose="encrypt")
        assert (status, body["error"]) == (503, "overloaded")
        assert n.last_headers["Retry-After"] == "1"
        assert slow.join(60)[0][0] == 200
        assert _dek(n, "limits", purpose="encrypt")[0] == 200
        # four idle connections held open; the fifth is cut before it can say anything
        ctx = n.tls.context("data")
        held = []
        try:
            for _ in range(4):
                raw = socket.create_connection(("127.0.0.1", n.port), timeout=10)
                held.append(ctx.wrap_socket(raw, server_hostname="localhost"))
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                answer = _handshake(n, ctx)
                assert answer == b"", answer
                raise ConnectionResetError("cut")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 30
        while True:   # the server notices the closed ones; then a new client is served
            try:
                if n.call("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "connections never freed"
            time.sleep(0.05)
        # a kept-alive connection left idle is closed by the node (idle timeout 1 s here)
        with socket.create_connection(("127.0.0.1", n.port), timeout=15) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                first = s.recv(4096)
                assert first.startswith(b"HTTP/1.1 200")
                rest = b""
                try:
                    while chunk := s.recv(4096):   # until the node closes (socket timeout 15 s)
                        rest += chunk
                except (ConnectionError, ssl.SSLError):
                    pass
                assert b"HTTP/1.1" not in rest
    finally:
        assert n.stop() == 0


def test_cli_audit_verify_needs_no_config_and_other_commands_do(tmp_path):
    def kms(*args):
        return run_cli("kms", *args, timeout=60)
    proc = kms("audit", "verify", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "cannot read audit log" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = kms("status")
    assert proc.returncode == 2 and "--config NODE.toml is required" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = kms("audit", "verify", str(empty))
    assert proc.returncode == 0 and "0 records" in proc.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_a_wrong_pin_stops_serve_with_one_clear_line_and_no_pin(service_kit, workers):
    cfg = service_kit.config()
    env = {**service_kit.env(), "HSM_PIN": "not-the-pin-1234"}
    proc = run_cli("kms", "--config", cfg, "serve", "--port", "0", "--workers", workers,
                   env=env)
    assert proc.returncode == 2, proc.stderr
    assert "CKR_PIN_INCORRECT" in proc.stderr and "Traceback" not in proc.stderr
    assert "not-the-pin-1234" not in proc.stderr + proc.stdout
    assert service_kit.kit.regionals["eu"].user_pin.reveal() not in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- customer keys
def test_byok_upload_over_the_admin_route_is_unwrapped_and_checked_in_the_hsm(node, local,
                                                                              tmp_path):
    """The customer's two files, as `kms byok wrap` writes them, uploaded over mTLS: the node
    unwraps and checks them inside its HSM; the DEK it then serves is the one the node library
    derives; a hash that does not match is refused (4xx) and stores nothing."""
    import base64
    import hashlib

    from kms.customer_keys import byok
    _org(node, "byok-http", secret=False)
    cert = tmp_path / "byok-http.pem"
    byok.certificate(local, "byok-http", cert)          # the KMS side: key pair + certificate
    secret = hashlib.sha256(b"customer secret for the service").digest()
    a, b = byok.wrap(cert, tmp_path / "wrapped", secret=secret)   # the customer side, no HSM
    body = {"secret": a.read_text().strip(), "hash": b.read_text().strip()}
    bad = dict(body, hash=base64.b64encode(hashlib.sha256(b"other").digest()).decode())
    status, err = node.call("POST", "/v1/tenants/byok-http/byok-upload", bad, who="admin")
    assert 400 <= status < 500 and "hash" in err["message"].lower(), (status, err)
    assert local.store.secrets("byok-http") == []
    status, up = node.call("POST", "/v1/tenants/byok-http/byok-upload", body, who="admin")
    assert status == 201 and up["version"] == 1 and up["derivation"] == "PBKDF2", up
    status, got = _dek(node, "byok-http", key_type="field", purpose="encrypt")
    assert status == 200, got
    assert base64.b64decode(got["dek"]) == local.dek_for_encrypt("byok-http", "field")[2]
    # The data plane may not upload.
    status, _ = node.call("POST", "/v1/tenants/byok-http/byok-upload", body, who="data")
    assert status == 403
    status, err = node.call("POST", "/v1/tenants/byok-http/byok-upload",
                            dict(body, secret="%%%"), who="admin")
    assert status == 400 and err["error"] == "bad_request"


def test_ekm_rotation_over_the_admin_route_serves_the_customers_dek(service_kit, local,
                                                                    tmp_path):
    """EKM through the service: the admin route rotates with source "ekm" (AWS KMS
    GenerateDataKeyWithoutPlaintext on a real moto server over TLS), and the DEK served over
    mTLS is the one the customer's own AWS Decrypt of the stored blob gives."""
    import base64
    import json as jsonlib

    import boto3

    from kms.customer_keys import ekm
    from tests import localtls
    localtls.set_aws_env()          # the node started below inherits the test credentials
    pki = localtls.make_pki(tmp_path / "moto-pki")
    proc, url = localtls.start_moto(pki)
    try:
        client = boto3.client("kms", endpoint_url=url, verify=str(pki.ca),
                              region_name="eu-west-1")
        arn = client.create_key(Description="root key of ekm-http")["KeyMetadata"]["Arn"]
        node = service_kit.start(service_kit.config())
        try:
            _org(node, "ekm-http", secret=False)
            ekm.register(local, "ekm-http", arn, endpoint_url=url, ca_bundle=str(pki.ca))
            status, bad = node.call("POST", "/v1/tenants/ekm-http/rotate",
                                    {"source": "aws"}, who="admin")
            assert status == 400, bad
            status, row = node.call("POST", "/v1/tenants/ekm-http/rotate", {"source": "ekm"},
                                    who="admin")
            assert status == 200 and row["version"] == 1, row
            status, got = _dek(node, "ekm-http", key_type="field", purpose="encrypt")
            assert status == 200 and got["derivation"] == "NONE", got
            stored = local.store.get("ekm-http", "field", 1)
            descriptor = jsonlib.loads(local._tenant_secret(stored))
            customer = client.decrypt(
                CiphertextBlob=base64.b64decode(descriptor["blob"]), KeyId=descriptor["key_id"],
                EncryptionContext=ekm.context("ekm-http", "field", 1))["Plaintext"]
            assert base64.b64decode(got["dek"]) == customer
        finally:
            node.stop()
    finally:
        localtls.stop(proc)
