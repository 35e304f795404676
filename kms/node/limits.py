"""Every number a node configuration may set, with the finite range it must lie in and why.

A value outside its range is refused at load with ``file:line: key = value: must be ... (why)``:
``pbkdf2_iterations = 1000000000000`` would be bound into every row it makes (encrypt then hangs),
``cache_flush_hours = inf`` would switch the 72 h flush off, ``nan`` slips past every comparison.
TOML has ``inf`` and ``nan`` literals, so every float is checked to be finite first.

The minimums the parsers already check stay where they are; this table adds the upper bound, the
finiteness and the reason, in one place an operator (and ``docs/troubleshooting.md``) can read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from kms.errors import ConfigError


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    why: str


# Top-level keys of a node configuration.
NODE: dict[str, Range] = {
    "pbkdf2_iterations": Range(1, 100_000, "each iteration is one C_Sign inside the token "
                               "(~10 µs on SoftHSM2): 100,000 is about a second per cache-miss "
                               "DEK, and the count is bound into every row it makes"),
    "cache_max_entries": Range(1, 10_000_000, "each entry holds an encrypted DEK in memory; "
                               "10 million is a few GB"),
    "cache_flush_hours": Range(1 / 60, 72, "the design's hard flush is 72 h: no DEK stays "
                               "cached longer (and a minute at least, or the cache is useless)"),
}

# Keys of [service].
SERVICE: dict[str, Range] = {
    "port": Range(0, 65535, "a TCP port (0: any free one)"),
    "workers": Range(1, 64, "one process each, with its own token login and session objects"),
    "max_body_bytes": Range(256, 16 << 20, "the largest request is a BYOK upload of a few KB"),
    "header_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "idle_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "request_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "handshake_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "shutdown_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "max_concurrent": Range(1, 10_000, "requests in flight per worker; more are answered 503"),
    "max_connections": Range(1, 100_000, "open connections per worker (file descriptors)"),
    "executor_threads": Range(1, 64, "a worker's token calls do not scale with threads "
                              "(SoftHSM2 serialises them): more threads only add memory; "
                              "scale with workers"),
    "audit_batch_ms": Range(1, 10_000, "audit records wait at most this long in memory "
                            "before they are written and fsynced"),
    "body_timeout_seconds": Range(0.1, 3600, "seconds to an hour"),
    "max_connections_per_client": Range(1, 100_000, "open connections per client and worker "
                                        "(file descriptors)"),
    "max_concurrent_per_client": Range(1, 10_000, "requests in flight per client and worker"),
    "requests_per_second_per_client": Range(0.1, 1_000_000, "a worker answers tens of "
                                            "thousands of requests a second at most"),
    "audited_refusals_per_second": Range(0.1, 10_000, "refusals written to the audit log per "
                                         "client and second; beyond it, one aggregate line"),
    "outbound_per_org": Range(1, 64, "calls to one org's key service or AWS KMS at once per "
                              "worker; the worker's pool threads bound them anyway"),
}


def line_of(text: str, key: str, section: str | None = None) -> int | None:
    """The line ``key = ...`` is on (in ``[section]`` when given), for ``file:line``."""
    current = None
    pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]").strip()
            continue
        if current == section and pattern.match(line):
            return number
    return None


def _show(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def check(path: Path, text: str, table: dict, ranges: dict[str, Range],
          section: str | None = None) -> None:
    """Refuse the first value of ``table`` outside its range (types are checked already)."""
    for key, rng in ranges.items():
        value = table.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        line = line_of(text, key, section)
        where = f"{path}:{line}" if line else str(path)
        name = f"{section}.{key}" if section else key
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {name} = {value} is not a finite number",
                              hint=f"give {_show(rng.low)} to {_show(rng.high)} ({rng.why})")
        if not rng.low <= value <= rng.high:
            raise ConfigError(f"{where}: {name} = {_show(value)} is outside "
                              f"{_show(rng.low)} to {_show(rng.high)}", hint=rng.why)

