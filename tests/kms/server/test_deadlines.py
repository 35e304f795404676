"""The header limit as the worker's sweep enforces it (kms.server.deadlines, issue 19), timed
on real TLS connections to a real node on its default loop (uvloop): a connection that never
sends, one that sends one byte, one that sends one byte after a full request and response, and
an unnamed certificate that reads its 403 but never answers the TLS close are each cut no
sooner than header_timeout_seconds and no later than header_timeout_seconds plus the sweep's
period (plus scheduling slack)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.service_kit import node_fixtures

HEADER_S = 0.6            # the sweep's period is a quarter of it: 0.15 s
SLACK_S = 0.6             # the client's and a shared machine's own delays

node, local = node_fixtures(lambda kit: kit.config(header_timeout_seconds=HEADER_S,
                                                   idle_timeout_seconds=30))


def _wait_cut(sock: socket.socket, wait: float = 10) -> float:
    """Seconds until the peer closes or resets the TCP connection under ``sock``."""
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    raw.settimeout(wait)
    t0 = time.monotonic()
    try:
        while raw.recv(4096):
            pass
    except ConnectionResetError:
        pass
    finally:
        raw.close()
    return time.monotonic() - t0


def _tls(node, who):
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    return node.tls.context(who).wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("shape", ["never_sends", "one_byte", "one_byte_after_a_response"])
def test_a_named_client_slow_with_its_header_is_cut_at_the_limit(node, shape):
    with _tls(node, "data") as s:
        if shape == "one_byte":
            s.sendall(b"G")
        elif shape == "one_byte_after_a_response":
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_S * 2)          # idle between requests: the idle limit's, not this
            s.sendall(b"G")
        took = _wait_cut(s)
    assert HEADER_S - 0.05 <= took <= HEADER_S + HEADER_S / 4 + SLACK_S, (shape, took)


def test_an_unnamed_client_that_never_closes_after_its_403_is_cut_at_the_limit(node):
    with _tls(node, "unauthorised") as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        took = _wait_cut(s)        # the server's close_notify came; ours never does
    assert took <= HEADER_S + HEADER_S / 4 + SLACK_S, took
    assert node.call("GET", "/healthz")[0] == 200


def test_sigterm_with_requests_past_their_limit_answers_408_and_exits_0(service_kit):
    """Four slow cache misses (50,000 PBKDF2 iterations against request_timeout 0.3 s) are in
    flight when SIGTERM arrives: the sweep still runs while the worker drains, each is answered
    408 `timeout` (none hangs, none is a 500), the node exits 0 and its audit log verifies."""
    import signal
    import threading

    from tests.helpers import run_cli
    cfg = service_kit.config(store=str(service_kit.root / "late-drain.db"),
                             request_timeout_seconds=0.3)
    cfg.write_text(cfg.read_text().replace("pbkdf2_iterations = 50",
                                           "pbkdf2_iterations = 50000"))
    n = service_kit.start(cfg)
    status, body = n.call("POST", "/v1/tenants", {"org": "late"}, who="admin")
    assert status == 201, body
    results: list = []

    def fetch(i):
        results.append(n.call("POST", "/v1/dek", {"org": "late", "purpose": "decrypt",
                                                  "version": 1, "fragment": f"f{i}"}))
    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    n.signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert n.proc.wait(60) == 0
    assert sorted((s, b["error"]) for s, b in results) == [(408, "timeout")] * 4, results
    proc = run_cli("kms", "audit", "verify", cfg.parent / "audit" / "audit-w0.jsonl",
                   timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.xfail(strict=True, raises=TimeoutError, reason=(
    "known gap, older than issue 19: the guard arms the header limit on a byte that arrives "
    "while no request is handled; a next header begun in the same read as the current request "
    "is left to the idle limit (aiohttp's keep-alive, idle_timeout_seconds)"))
def test_a_next_header_begun_during_a_request_is_held_to_the_limit(node):
    """The first byte of the next request arrives with the current one (pipelined) and
    nothing more: the header limit should run from the response, not only from a later byte."""
    with _tls(node, "data") as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nG")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        took = _wait_cut(s, 3 * HEADER_S)
    assert took <= HEADER_S + HEADER_S / 4 + SLACK_S, took
