"""Calls to services a customer runs: its cache-only key service and the AWS KMS endpoint of an
EKM org. The customer may drip, hang, redirect or lie; this module bounds what that costs.

* **One total deadline** per call: connect, TLS handshake, request, status line, headers and body
  together, enforced by cancelling the call (``asyncio.wait_for`` over aiohttp's client): when it
  passes, the socket is closed and the calling thread is free again. A per-read timeout (what
  urllib and botocore offer) is not one: a byte every second keeps such a call alive forever.
* **No redirect is followed**: a 3xx is handed back to the caller, which refuses it with its own
  code. So a request (and the credential in it) goes only to the URL it was registered with,
  over the TLS connection verified for that host.
* **Per-org concurrency**: at most ``limit`` calls for one org run at once in a process
  (``Gate``), and at most ``total`` (half the worker's pool threads) for all orgs together; one
  more is refused at once (``BUSY``) rather than queued. So a slow customer holds at most
  ``limit`` of a worker's pool threads, slow customers together at most half of them, each for at
  most the deadline: the other half always serves the DEKs in the node's store and ``/readyz``.
* The answer's body is read up to ``max_body`` + 1 bytes and no further.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass


class OutboundFailure(Exception):
    """The call did not produce an HTTP answer: ``reason`` is ``TimeoutError``, ``SSLError``
    or ``ConnectionError`` (what the caller names in its one-line refusal)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Busy(Exception):
    """The org already has ``limit`` calls in flight in this process."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    location: str | None = None


async def _call(method: str, url: str, headers: dict, body: bytes | None,
                context: ssl.SSLContext, max_body: int) -> Answer:
    import aiohttp
    connector = aiohttp.TCPConnector(ssl=context, force_close=True, limit=1)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     trust_env=False, skip_auto_headers=("User-Agent",)) as s:
        async with s.request(method, url, headers=headers, data=body, allow_redirects=False,
                             compress=None) as resp:
            data = await resp.content.read(max_body + 1)
            return Answer(resp.status, data, resp.headers.get("Location"))


def _run(coro):
    """Run ``coro`` to completion in this thread (pool threads have no event loop). Called from
    a thread that runs one (a DEK fetch answered inline that missed the cache), it runs in a
    short-lived thread instead: asyncio.run cannot nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: dict = {}

    def target():
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            out["error"] = exc
    t = threading.Thread(target=target, name="kms-outbound", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def request(method: str, url: str, *, headers: dict, context: ssl.SSLContext,
            deadline_s: float, max_body: int, body: bytes | None = None) -> Answer:
    """One HTTP request under one total deadline, redirects not followed (see the module)."""
    import aiohttp

    async def bounded():
        return await asyncio.wait_for(_call(method, url, headers, body, context, max_body),
                                      deadline_s)
    try:
        return _run(bounded())
    except asyncio.TimeoutError:
        raise OutboundFailure("TimeoutError") from None
    except (aiohttp.ClientSSLError, ssl.SSLError):
        raise OutboundFailure("SSLError") from None
    except (aiohttp.ClientError, OSError, ValueError):
        raise OutboundFailure("ConnectionError") from None


class Gate:
    """Calls in flight per org, in one process (all threads of a worker)."""

    def __init__(self, limit: int, total: int):
        self.limit, self.total = limit, total
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._all = 0

    def __call__(self, org: str) -> _Held:
        with self._lock:
            if self._busy.get(org, 0) >= self.limit or self._all >= self.total:
                raise Busy(org)
            self._busy[org] = self._busy.get(org, 0) + 1
            self._all += 1
        return _Held(self, org)

    def release(self, org: str) -> None:
        with self._lock:
            self._all -= 1
            self._busy[org] -= 1
            if not self._busy[org]:
                del self._busy[org]


class _Held:
    def __init__(self, gate: Gate, org: str):
        self.gate, self.org = gate, org

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.gate.release(self.org)
        return False


DEFAULT_PER_ORG, DEFAULT_TOTAL = 2, 4


def gate(kms) -> Gate:
    """The node's gate: ``[service] outbound_per_org`` calls per org (default 2), and half of
    ``executor_threads`` (at least 1) for all orgs together."""
    found = getattr(kms, "_outbound_gate", None)
    if found is None:
        service = getattr(kms.config, "service", None)
        if service is not None:
            found = Gate(service.limit("outbound_per_org"),
                         max(1, service.limit("executor_threads") // 2))
        else:
            found = Gate(DEFAULT_PER_ORG, DEFAULT_TOTAL)
        kms._outbound_gate = found
    return found
