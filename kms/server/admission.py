"""Who may hold what, per client, in one worker: connections, requests in flight, request rate,
and how many of its refusals reach the audit log.

A *client* is one ``[[service.clients]]`` entry (its identity as written); every certificate the
policy does not name counts as the one client ``UNNAMED`` together, so a CA that signs many
certificates does not multiply what the unnamed may hold. The guard (``kms.server.guard``) asks
``connect`` once per TLS connection, right after the handshake; the app's middleware asks
``begin`` before a request takes a concurrency slot or reads a body byte. Everything runs on the
worker's event loop: no locks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

UNNAMED = "(not named by the policy)"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``take`` says whether one was there
    (and how long until the next one when not)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Refusal:
    """What ``Admission.begin`` refused: an HTTP status, a code, a message, Retry-After."""
    status: int
    code: str
    message: str
    retry_after: str | None = None


class Admission:
    """Per-client caps of one worker (limits from ``[service]``, see settings._LIMITS)."""

    _MAX_TRACKED = 10_000   # client keys in the rate tables; beyond it they start afresh

    def __init__(self, limits: dict, clock=time.monotonic):
        self.max_connections = limits["max_connections_per_client"]
        self.max_concurrent = limits["max_concurrent_per_client"]
        self.rate = float(limits["requests_per_second_per_client"])
        self.refusal_rate = float(limits["audited_refusals_per_second"])
        self.clock = clock
        self.connections: defaultdict[str, int] = defaultdict(int)
        self.inflight: defaultdict[str, int] = defaultdict(int)
        self._rates: dict[str, TokenBucket] = {}
        self._refusal_rates: dict[str, TokenBucket] = {}
        self.unrecorded: defaultdict[str, int] = defaultdict(int)   # refusals not audited yet
        self.cut = 0      # connections aborted at the per-client cap

    # ------------------------------------------------------------------ connections
    def connect(self, client: str) -> bool:
        if self.connections[client] >= self.max_connections:
            self.cut += 1
            return False
        self.connections[client] += 1
        return True

    def disconnect(self, client: str) -> None:
        self.connections[client] -= 1
        if self.connections[client] <= 0:
            del self.connections[client]

    # ------------------------------------------------------------------ requests
    def begin(self, client: str) -> Refusal | None:
        """Take one of ``client``'s request slots, or say why not (nothing taken then)."""
        wait = self._bucket(self._rates, client, self.rate).take(self.clock())
        if wait:
            return Refusal(429, "client_rate_limited",
                           f"over {self.rate:g} requests a second for this client",
                           str(max(1, int(wait + 0.999))))
        if self.inflight[client] >= self.max_concurrent:
            return Refusal(429, "client_concurrency_limited",
                           f"this client already has {self.max_concurrent} requests in flight",
                           "1")
        self.inflight[client] += 1
        return None

    def end(self, client: str) -> None:
        self.inflight[client] -= 1
        if self.inflight[client] <= 0:
            del self.inflight[client]

    # ------------------------------------------------------------------ refusal records
    def record_refusal(self, client: str) -> bool:
        """Whether this refusal of ``client`` is audited on its own; when not, it is counted in
        ``unrecorded`` (the service writes the counts as aggregate records on a timer, so the
        log accounts for every refusal)."""
        if self._bucket(self._refusal_rates, client, self.refusal_rate).take(self.clock()):
            self.unrecorded[client] += 1
            return False
        return True

    def _bucket(self, table: dict[str, TokenBucket], client: str, rate: float) -> TokenBucket:
        bucket = table.get(client)
        if bucket is None:
            if len(table) >= self._MAX_TRACKED:
                table.clear()
            bucket = table[client] = TokenBucket(rate, max(1.0, rate), self.clock())
        return bucket
