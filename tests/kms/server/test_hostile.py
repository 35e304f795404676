"""The service under hostile TLS clients, on real `kms serve` processes: certificates the policy
does not name, named clients flooding connections and slow bodies, identity types that spell
another identity, and JSON that parses but is no input (issue 17, items 1-3).

The stated bound (docs/service-hardening.md): while the attackers below run, every DEK fetch of
an authorised client completes, 200, within ``FETCH_BOUND_S`` = 5 s of its start (on an idle
node it takes a few milliseconds; 5 s is generous for a shared 2-core machine, and far below the
30 s a held slot cost before).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest

from kms.errors import ConfigError
from kms.server import auditchain
from tests.helpers import run_cli, start_threads
from tests.service_kit import ADMIN_ID, node_fixtures

FETCH_BOUND_S = 5.0
LIMITS = dict(max_connections=8, max_connections_per_client=2, max_concurrent=4,
              max_concurrent_per_client=2, header_timeout_seconds=2.0,
              body_timeout_seconds=2.0, audited_refusals_per_second=2.0)

node, local = node_fixtures(lambda kit: kit.config(**LIMITS))


def _org(node, name):
    status, body = node.call("POST", "/v1/tenants", {"org": name}, who="admin")
    assert status == 201, body


def _open(node, who: str):
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    try:
        return node.tls.context(who).wrap_socket(raw, server_hostname="localhost")
    except (OSError, ssl.SSLError):
        raw.close()
        raise


def _attacker(node, who: str, stop: threading.Event, seen: list[bytes]) -> None:
    """Keep opening connections that send a POST header and one body byte, and hold them
    until the node answers or cuts them; what the node answered is collected in ``seen``."""
    held = []
    try:
        while not stop.is_set():
            try:
                s = _open(node, who)
                s.sendall(b"POST /v1/dek HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          b"\r\nContent-Length: 100\r\n\r\n{")
                s.settimeout(0.05)
                held.append(s)
            except (OSError, ssl.SSLError):
                seen.append(b"cut")
            for s in list(held):
                try:
                    answer = s.recv(4096)
                except (socket.timeout, ssl.SSLWantReadError):
                    continue
                except (OSError, ssl.SSLError):
                    answer = b""
                seen.append(answer[:12] or b"closed")
                held.remove(s)
                s.close()
            time.sleep(0.02)
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("who", ["unauthorised", "acme"])
def test_more_connections_than_max_connections_with_slow_bodies_starve_no_one(node, who):
    """An unnamed certificate (``unauthorised``) and a named one (``acme``: data role, acme-*
    orgs) each run 6 threads opening connections with a one-byte body, far more than the node's
    ``max_connections`` = 8, for the whole test. Meanwhile 12 DEK fetches of the ``data`` client
    all answer 200, each within FETCH_BOUND_S."""
    _org(node, f"victim-{who}")
    stop, seen = threading.Event(), []
    attackers = start_threads(6, lambda i: _attacker(node, who, stop, seen))
    try:
        time.sleep(1.0)   # the attackers hold what they can
        started, fetches = time.monotonic(), 0
        # 12 fetches at least, and for longer than the body timeout (2 s): the slow bodies
        # are answered meanwhile
        while fetches < 12 or time.monotonic() - started < 3.5:
            fetches += 1
            t0 = time.monotonic()
            status, body = node.call("POST", "/v1/dek", {"org": f"victim-{who}", "purpose": "encrypt"},
                                     timeout=FETCH_BOUND_S)
            took = time.monotonic() - t0
            assert status == 200, body
            assert took < FETCH_BOUND_S, took
            status, _ = node.call("GET", "/readyz", timeout=FETCH_BOUND_S)
            assert status == 200
    finally:
        stop.set()
        attackers.join(30)
    answers = [a for a in seen if a.startswith(b"HTTP/1.1")]
    if who == "unauthorised":
        # answered 403 right after the request line (the body byte never read), or cut
        assert answers and all(a.startswith(b"HTTP/1.1 403") for a in answers), answers[:5]
    else:
        # its requests: 408 (body not whole in 2 s), never 200; beyond its 2 connections cut
        assert answers and {a[:12] for a in answers} <= {b"HTTP/1.1 408"}, \
            set(answers)
    assert b"cut" in seen or b"closed" in seen   # over max_connections_per_client: aborted


def test_an_unnamed_certificate_never_reaches_a_handler_even_a_probe(node):
    for path in ("/healthz", "/readyz", "/openapi.json", "/v1/status"):
        status, body = node.call("GET", path, who="unauthorised")
        assert (status, body["error"]) == (403, "forbidden"), (path, body)
    # one request line and the connection is closed: no second request on it
    s = _open(node, "unauthorised")
    with s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 403")


def test_a_role_is_refused_before_the_body_is_read(node):
    """The data client asks an admin route with a body it never finishes: 403 at once (no
    wait for the body), and the connection is closed."""
    s = _open(node, "data")
    with s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 403") and time.monotonic() - t0 < 1.9


def test_refusals_of_one_client_reach_the_audit_log_at_a_bounded_rate(node):
    """200 refused requests from one named client with a 255-character org, and 200 from an
    unnamed certificate, within a few seconds: at most ``audited_refusals_per_second`` (2) a
    second of each are recorded one by one, the rest as counted aggregates; the audit log grows
    by a few kB, not by 400 records."""
    log = node.config.parent / "audit" / "audit-w0.jsonl"
    before = log.stat().st_size
    t0 = time.monotonic()
    for _ in range(200):
        status, _ = node.call("POST", "/v1/dek", {"org": "x" * 255, "purpose": "encrypt"},
                              who="acme")
        assert status == 403
        assert node.call("GET", "/healthz", who="unauthorised")[0] == 403
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while True:   # the aggregates are written every 10 s
        with open(log, "rb") as f:
            f.seek(before)
            records = [json.loads(line) for line in f.read().splitlines()]
        counted = sum(int(r["detail"].split()[0]) for r in records
                      if r["op"] == "authz.aggregate")
        single = sum(1 for r in records if r["op"] == "authz")
        if counted + single >= 400:     # every refusal accounted for
            break
        assert time.monotonic() < deadline, f"{counted} + {single} refusals in the log"
        time.sleep(0.2)
    for client in ("spiffe://test/acme-only", "uri:spiffe://test/nobody"):
        single = [r for r in records if r["op"] == "authz" and r["client"] == client]
        assert 1 <= len(single) <= 2 * (elapsed + 12) + 2, len(single)
        assert all(len(r.get("org") or "") <= 64 for r in single)
    assert log.stat().st_size - before < 40_000
    assert auditchain.verify(log).intact


# ----------------------------------------------------------------------------- identity types
@pytest.fixture(scope="module")
def impostors(service_kit):
    """Certificates of the test CA that spell the admin's SAN URI as their CN (no SAN), or as
    a DNS SAN."""
    from kms.server.pki import Authority
    tls = service_kit.tls
    ca = Authority.load(tls.dir)
    tls.clients["cn-admin"] = ca.write(tls.dir, "cn-admin", *ca.issue(ADMIN_ID))
    tls.clients["dns-admin"] = ca.write(tls.dir, "dns-admin", *ca.issue("x", dns=(ADMIN_ID,)))
    return tls


@pytest.mark.parametrize("who", ["cn-admin", "dns-admin"])
def test_a_cn_or_dns_name_spelling_the_admin_uri_is_not_the_admin(node, impostors, who):
    status, body = node.call("POST", "/v1/tenants", {"org": f"impostor-{who}"}, who=who)
    assert (status, body["error"]) == (403, "forbidden")
    assert node.call("POST", "/v1/tenants", {"org": f"impostor-{who}"}, who="admin")[0] == 201


def test_typed_identities_match_only_their_type(service_kit, impostors):
    cfg = service_kit.config(clients=[
        {"identity": "cn:" + ADMIN_ID, "roles": ["admin"]},
        {"identity": "dns:" + ADMIN_ID, "roles": ["status"]},
        {"identity": "uri:spiffe://test/encryption-service", "roles": ["data"]}])
    n = service_kit.start(cfg)
    try:
        assert n.call("POST", "/v1/tenants", {"org": "typed"}, who="cn-admin")[0] == 201
        assert n.call("POST", "/v1/tenants", {"org": "typed2"}, who="dns-admin")[0] == 403
        assert n.call("GET", "/v1/status", who="dns-admin")[0] == 200
        assert n.call("POST", "/v1/tenants", {"org": "typed3"}, who="admin")[0] == 403
    finally:
        n.kill()


def test_an_untyped_identity_that_is_not_a_uri_is_refused_at_start(service_kit):
    cfg = service_kit.config(clients=[
        {"identity": "spiffe://test/encryption-service", "roles": ["data"]},  # read as uri:
        {"identity": "monitor.test", "roles": ["status"]}])
    with pytest.raises(ConfigError, match='write "uri:monitor.test".*"dns:monitor.test".*'
                                          '"cn:monitor.test"'):
        from kms.node import config as configs
        configs.load(cfg)
    proc = run_cli("kms", "--config", cfg, "serve", "--port", "0", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and f"{cfg}:" in line[0] and "has no type" in line[0], proc.stderr


def test_a_limit_out_of_range_names_the_file_and_line(service_kit):
    cfg = service_kit.config(max_concurrent_per_client=0)
    proc = run_cli("kms", "--config", cfg, "serve", "--port", "0", timeout=60)
    lineno = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1)
                  if text.startswith("max_concurrent_per_client"))
    assert proc.returncode == 2 and f"{cfg}:{lineno}: service.max_concurrent_per_client must " \
        "be >= 1" in proc.stderr, proc.stderr


def test_an_unknown_event_loop_is_refused_in_one_line(service_kit):
    cfg = service_kit.config(event_loop="trio")
    proc = run_cli("kms", "--config", cfg, "serve", "--port", "0", timeout=60)
    lineno = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1)
                  if text.startswith("event_loop"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"kms: error: {cfg}:{lineno}: service.event_loop must be 'uvloop' "
                                   "or 'asyncio', not 'trio'"), proc.stderr


# ----------------------------------------------------------------------------- bad input
DEEP = b"[" * 5000 + b"]" * 5000
JSON_CASES = [
    (json.dumps({"org": "\ud800", "purpose": "encrypt"}).encode(), 400, "invalid_unicode"),
    (b'{"org": "a", "purpose": "encrypt", "fragment": "\\udfff"}', 400, "invalid_unicode"),
    (DEEP, 400, "too_deep"),
    (b'{"org": ' + b"[" * 20 + b"]" * 20 + b"}", 400, "too_deep"),
    (b'{"org": "a", "purpose": "decrypt", "version": ' + b"9" * 5000 + b"}", 400,
     "malformed_json"),
    (b'{"org": "a", "purpose": "decrypt", "version": 1e999}', 400, "non_finite_number"),
    (b'{"org": "a", "purpose": "decrypt", "version": NaN}', 400, "non_finite_number"),
    (b'{"org": "a", "purpose": "decrypt", "version": -Infinity}', 400, "non_finite_number"),
    (b'{"org": "a", "purpose": "decrypt", "version": 99999999999999999999999}', 400,
     "bad_request"),
    (b'{"org": "a", "org": "b", "purpose": "encrypt"}', 400, "duplicate_key"),
]


@pytest.mark.parametrize("raw,status,code", JSON_CASES,
                         ids=[c[2] + f"-{i}" for i, c in enumerate(JSON_CASES)])
def test_json_that_parses_but_is_no_input_gets_a_4xx_with_a_code(node, raw, status, code):
    got, body = node.call("POST", "/v1/dek", raw=raw, headers={
        "Content-Type": "application/json"})
    assert (got, body["error"]) == (status, code), body


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_by_its_content_type_is_415(node, ctype):
    got, body = node.call("POST", "/v1/dek", {"org": "a", "purpose": "encrypt"},
                          headers={"Content-Type": ctype})
    assert (got, body["error"]) == (415, "unsupported_media_type")


def test_malformed_http_is_one_log_line_and_dropped_bodies_log_no_500(node):
    before = node.stderr()
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"POST /v1/dek HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
        s = _open(node, "data")
        with s:
            s.sendall(raw)
            answer = s.recv(4096)
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer
        assert b"bad_http_request" in answer
    for _ in range(20):       # a body promised and never sent: the client hangs up
        s = _open(node, "data")
        with s:
            s.sendall(b"POST /v1/dek HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"o")
            time.sleep(0.01)
    time.sleep(1.0)
    new = node.stderr()[len(before):] if node.stderr().startswith(before[:100]) else \
        node.stderr()
    assert "Traceback" not in new and " failed: " not in new, new
    assert new.count("bad HTTP request") >= 3
    assert node.call("GET", "/readyz")[0] == 200
