"""Limits below HTTP: slow request headers cut, connections per worker bounded.

aiohttp closes *idle* keep-alive connections (``keepalive_timeout``) but has no deadline for a
request whose header arrives one byte at a time (slowloris). ``GuardedHandler`` adds one: from a
connection's first byte (or the first byte after a response) the request's header must be
complete within ``header_timeout``, else the connection is aborted. The app's middleware calls
``request_started``/``request_finished`` around each request. A worker holding
``max_connections`` connections aborts new ones at once (the other workers sharing the socket
keep accepting), so one client opening thousands cannot exhaust a worker's descriptors.

Identity comes first. ``connection_made`` runs once the TLS handshake verified the client
certificate; the guard reads its names there and asks the policy:

* a certificate the policy does not name never reaches aiohttp: the guard reads its request
  line (nothing more), answers 403 ``forbidden`` itself and closes the connection. All unnamed
  certificates together hold at most ``max_connections_per_client`` connections, and each at
  most until its request line or ``header_timeout``;
* a named client holds at most ``max_connections_per_client`` connections (more are aborted at
  once); the app's middleware then checks its role, rate and in-flight requests before a request
  takes a slot or a body byte is read (``kms.server.admission``).

A malformed HTTP request is answered 400 ``bad_http_request`` and logged as one line, without a
traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import authz
from .admission import UNNAMED

log = logging.getLogger("kms.server")
_MAX_REQUEST_LINE = 8190


class ConnectionBudget:
    def __init__(self, limit: int):
        self.limit, self.open, self.refused, self.cut = limit, 0, 0, 0


class GuardedHandler(RequestHandler):
    __slots__ = ("_kms_deadline", "_kms_header_timeout", "_kms_busy", "_kms_budget",
                 "_kms_counted", "_kms_svc", "_kms_unnamed", "_kms_line", "peer_names",
                 "client")

    def __init__(self, manager, *, header_timeout: float, budget: ConnectionBudget, svc, **kw):
        super().__init__(manager, **kw)
        # the time (Deadlines.now) by which a request header must be complete (None: not waiting for
        # one); enforced by the worker's sweep (kms.server.deadlines), not a timer per request
        self._kms_deadline: float | None = None
        self._kms_header_timeout = header_timeout
        self._kms_busy = False
        self._kms_budget = budget
        self._kms_counted = False
        self._kms_svc = svc              # kms.server.app.Service: policy, admission, audit
        self._kms_unnamed: asyncio.Transport | None = None
        self._kms_line = b""
        self.peer_names: tuple = ()      # the verified client certificate's typed names
        self.client: str | None = None   # its policy entry's identity, or admission.UNNAMED

    def connection_made(self, transport) -> None:
        budget = self._kms_budget
        if budget.open >= budget.limit:
            budget.refused += 1
            transport.abort()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        names = authz.identities(ssl_object.getpeercert() if ssl_object is not None else None)
        svc = self._kms_svc
        named = svc.policy.client(names)
        client = named.identity if named is not None else UNNAMED
        if not svc.admission.connect(client):
            svc.metrics.client_cut.inc()
            transport.abort()
            return
        budget.open += 1
        self._kms_counted = True
        svc.deadlines.watch(self)
        self.peer_names, self.client = names, client
        if named is None:
            # Never handed to aiohttp: no parser, no request object, no slot, no body.
            self._kms_unnamed = transport
        else:
            super().connection_made(transport)
        self._kms_arm()

    def connection_lost(self, exc) -> None:
        self._kms_disarm()
        self._kms_svc.deadlines.unwatch(self)
        if self._kms_counted:
            self._kms_budget.open -= 1
            self._kms_counted = False
            self._kms_svc.admission.disconnect(self.client)
            if self._kms_unnamed is not None:
                self._kms_unnamed = None
            else:
                super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._kms_counted:
            return
        if self._kms_unnamed is not None:
            self._kms_unnamed_data(data)
            return
        if self._kms_deadline is None and not self._kms_busy:
            self._kms_arm()
        super().data_received(data)

    def eof_received(self):
        if self._kms_unnamed is not None:
            return None
        return super().eof_received()

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        """A request aiohttp could not parse: one log line, a JSON 400, the connection closed."""
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log.warning("bad HTTP request from %s: %s", request.remote,
                    (str(exc) if exc is not None else message or "?").splitlines()[0][:200])
        rid = uuid.uuid4().hex[:16]
        resp = web.json_response({"error": "bad_http_request", "message":
                                  "the request is not well-formed HTTP/1.1",
                                  "request_id": rid}, status=status,
                                 headers={"X-Request-Id": rid})
        resp.force_close()
        return resp

    # ------------------------------------------------------------------ unnamed clients
    def _kms_unnamed_data(self, data: bytes) -> None:
        transport = self._kms_unnamed
        if transport is None or transport.is_closing():
            return
        self._kms_line += data[:_MAX_REQUEST_LINE]
        if b"\n" not in self._kms_line and len(self._kms_line) < _MAX_REQUEST_LINE:
            return
        self._kms_disarm()
        rid = uuid.uuid4().hex[:16]
        self._kms_svc.refuse_unnamed(self.peer_names, rid)
        body = json.dumps({"error": "forbidden", "message": "the client certificate is not "
                           "named by the policy", "request_id": rid}).encode()
        transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json; "
                        b"charset=utf-8\r\nContent-Length: " + str(len(body)).encode() +
                        b"\r\nX-Request-Id: " + rid.encode() + b"\r\nConnection: close\r\n\r\n"
                        + body)
        transport.close()
        self._kms_arm()   # a client that does not read the answer is aborted at the timeout

    # ------------------------------------------------------------------ called by the app
    def request_started(self) -> None:
        self._kms_busy = True
        self._kms_disarm()

    def request_finished(self) -> None:
        self._kms_busy = False

    # ------------------------------------------------------------------ internals
    def _kms_arm(self) -> None:
        self._kms_deadline = self._kms_svc.deadlines.now() + self._kms_header_timeout

    def _kms_disarm(self) -> None:
        self._kms_deadline = None

    def deadline_passed(self, now: float) -> None:
        """The worker's sweep (kms.server.deadlines): abort if the header is overdue."""
        if self._kms_deadline is not None and now >= self._kms_deadline:
            self._kms_expire()

    def _kms_expire(self) -> None:
        self._kms_deadline = None
        transport = self._kms_unnamed or self.transport
        if not self._kms_busy and transport is not None:
            self._kms_budget.cut += 1
            transport.abort()
