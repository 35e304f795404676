"""A worker's time limits, checked by one periodic sweep instead of one timer per request.

Two limits hold for every request: its header must be complete within ``header_timeout_seconds``
of its first byte (slowloris, ``kms.server.guard``), and its handler must answer within
``request_timeout_seconds`` (else 408 ``timeout``, ``kms.server.app._frame``). Each was a timer
armed and cancelled per request (``loop.call_later``, ``asyncio.timeout``); measured with
``benchmarks/service_breakdown.py`` on 2026-12-05, taking the request timer out alone cut the
worker's CPU by 11 µs per ``/healthz`` and 21 µs per cache-hit DEK fetch (70 and 153 µs).
Here arming a limit is storing a number, and one callback every ``period`` seconds (at most a
quarter of the shorter limit, at most 0.25 s) acts on whatever is past its limit: the limits
hold, late by at most ``period``, never early.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

MAX_PERIOD = 0.25      # seconds between sweeps (less when a limit is shorter than 1 s)


class Watched(Protocol):
    def deadline_passed(self, now: float) -> None:
        """Called by the sweep with the time (Deadlines.now); acts if its deadline is past."""


class Deadlines:
    def __init__(self, *limits: float):
        self.period = min([MAX_PERIOD, *(limit / 4 for limit in limits)])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._requests: dict[asyncio.Task, float] = {}    # in flight -> its deadline
        self._expired: set[asyncio.Task] = set()           # cancelled by the sweep
        self._watched: set[Watched] = set()                 # connections (header limits)
        self.expired_requests = 0

    def now(self) -> float:
        """The clock every deadline here is on: ``time.monotonic`` (uvloop's ``loop.time()``
        counts whole milliseconds, which could act a limit up to 1 ms early)."""
        if self._loop is None:
            self._start()
        return time.monotonic()

    # ----------------------------------------------------------------- requests
    def begin(self, task: asyncio.Task, seconds: float) -> None:
        """``task`` (a request's handler) must end within ``seconds``, or it is cancelled."""
        self._requests[task] = self.now() + seconds

    def end(self, task: asyncio.Task) -> bool:
        """The request ended; whether the sweep cancelled it for being past its limit."""
        self._requests.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    # ----------------------------------------------------------------- connections
    def watch(self, conn: Watched) -> None:
        if self._loop is None:
            self._start()
        self._watched.add(conn)

    def unwatch(self, conn: Watched) -> None:
        self._watched.discard(conn)

    # ----------------------------------------------------------------- the sweep
    def _start(self) -> asyncio.AbstractEventLoop:
        loop = self._loop = asyncio.get_running_loop()
        self._sweep_handle = loop.call_later(self.period, self._sweep)
        return loop

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        # The next sweep first: were a connection's handler to raise below (the loop logs it),
        # every limit of this worker would otherwise stop holding from then on.
        self._sweep_handle = loop.call_later(self.period, self._sweep)
        now = time.monotonic()
        for task, deadline in list(self._requests.items()):
            if now >= deadline and task not in self._expired:
                self._expired.add(task)
                self.expired_requests += 1
                task.cancel()
        for conn in list(self._watched):
            conn.deadline_passed(now)

    def close(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
