"""Limits below HTTP on the XKS listener: slow request headers cut, connections bounded.

The KMS listener's guard (``kms.server.guard``) starts from the client certificate's identity in
the KMS client policy; AWS KMS has none (it authenticates per request with SigV4, and presents a
certificate only to key stores configured for mTLS), so the XKS listener keeps the two limits
that need no identity: from a connection's first byte (or the first byte after an answer) the
request header must be complete within ``header_timeout``, else the connection is aborted; and
a worker holding ``max_connections`` connections aborts new ones at once. The proxy's dispatch
calls ``request_started``/``request_finished`` around each request.
"""

from __future__ import annotations

import asyncio

from aiohttp.web_protocol import RequestHandler


class Budget:
    def __init__(self, limit: int):
        self.limit, self.open, self.refused, self.cut = limit, 0, 0, 0


class XksGuard(RequestHandler):
    __slots__ = ("_xks_timer", "_xks_header_timeout", "_xks_busy", "_xks_budget",
                 "_xks_counted")

    def __init__(self, manager, *, header_timeout: float, budget: Budget, **kw):
        super().__init__(manager, **kw)
        self._xks_timer: asyncio.TimerHandle | None = None
        self._xks_header_timeout = header_timeout
        self._xks_busy = False
        self._xks_budget = budget
        self._xks_counted = False

    def connection_made(self, transport) -> None:
        if self._xks_budget.open >= self._xks_budget.limit:
            self._xks_budget.refused += 1
            transport.abort()
            return
        self._xks_budget.open += 1
        self._xks_counted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._xks_counted:
            self._xks_budget.open -= 1
            self._xks_counted = False
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._xks_counted:
            return
        if self._xks_timer is None and not self._xks_busy:
            self._arm()
        super().data_received(data)

    def request_started(self) -> None:
        self._xks_busy = True
        self._disarm()

    def request_finished(self) -> None:
        self._xks_busy = False

    def _arm(self) -> None:
        self._disarm()
        self._xks_timer = asyncio.get_running_loop().call_later(self._xks_header_timeout,
                                                                self._expire)

    def _disarm(self) -> None:
        if self._xks_timer is not None:
            self._xks_timer.cancel()
            self._xks_timer = None

    def _expire(self) -> None:
        self._xks_timer = None
        if not self._xks_busy and self.transport is not None:
            self._xks_budget.cut += 1
            self.transport.abort()
