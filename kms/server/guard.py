"""Limits below HTTP: slow request headers cut, connections per worker bounded.

aiohttp closes *idle* keep-alive connections (``keepalive_timeout``) but has no deadline for a
request whose header arrives one byte at a time (slowloris). ``GuardedHandler`` adds one: from a
connection's first byte (or the first byte after a response) the request's header must be
complete within ``header_timeout``, else the connection is aborted. The app's middleware calls
``request_started``/``request_finished`` around each request. A worker holding
``max_connections`` connections aborts new ones at once (the other workers sharing the socket
keep accepting), so one client opening thousands cannot exhaust a worker's descriptors.
"""

from __future__ import annotations

import asyncio

from aiohttp.web_protocol import RequestHandler


class ConnectionBudget:
    def __init__(self, limit: int):
        self.limit, self.open, self.refused, self.cut = limit, 0, 0, 0


class GuardedHandler(RequestHandler):
    __slots__ = ("_kms_timer", "_kms_header_timeout", "_kms_busy", "_kms_budget",
                 "_kms_counted", "peer_names")

    def __init__(self, manager, *, header_timeout: float, budget: ConnectionBudget, **kw):
        super().__init__(manager, **kw)
        self._kms_timer: asyncio.TimerHandle | None = None
        self._kms_header_timeout = header_timeout
        self._kms_busy = False
        self._kms_budget = budget
        self._kms_counted = False
        self.peer_names = None   # the verified client certificate's names (kms.server.app)

    def connection_made(self, transport) -> None:
        budget = self._kms_budget
        if budget.open >= budget.limit:
            budget.refused += 1
            transport.abort()
            return
        budget.open += 1
        self._kms_counted = True
        super().connection_made(transport)
        self._kms_arm()

    def connection_lost(self, exc) -> None:
        self._kms_disarm()
        if self._kms_counted:
            self._kms_budget.open -= 1
            self._kms_counted = False
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._kms_counted:
            return
        if self._kms_timer is None and not self._kms_busy:
            self._kms_arm()
        super().data_received(data)

    # ------------------------------------------------------------------ called by the app
    def request_started(self) -> None:
        self._kms_busy = True
        self._kms_disarm()

    def request_finished(self) -> None:
        self._kms_busy = False

    # ------------------------------------------------------------------ internals
    def _kms_arm(self) -> None:
        self._kms_disarm()
        loop = asyncio.get_running_loop()
        self._kms_timer = loop.call_later(self._kms_header_timeout, self._kms_expire)

    def _kms_disarm(self) -> None:
        if self._kms_timer is not None:
            self._kms_timer.cancel()
            self._kms_timer = None

    def _kms_expire(self) -> None:
        self._kms_timer = None
        if not self._kms_busy and self.transport is not None:
            self._kms_budget.cut += 1
            self.transport.abort()
