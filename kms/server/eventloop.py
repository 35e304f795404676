"""The worker's event loop: uvloop by default, asyncio's own on request.

uvloop (libuv; its TLS transport in Cython) measured 16% more cache-hit DEK fetches a second
against the same node on asyncio's loop (``benchmarks/test_kms_service.py``, 2026-12-05: 19.0-
19.3x PyKMIP against 16.3-16.7x, interleaved runs), and as much on ``/healthz``, so the
ratios against the node's own floor do not move. ``[service] event_loop = "asyncio"`` keeps
the standard library's loop (a platform without uvloop wheels, or to rule the loop out while
debugging); both run the same test suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

KINDS = ("uvloop", "asyncio")


def run(main: Coroutine[Any, Any, Any], kind: str = "uvloop") -> Any:
    """Run ``main`` to completion on a new event loop of ``kind`` (one of :data:`KINDS`)."""
    if kind == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    if kind == "asyncio":
        return asyncio.run(main)
    raise ValueError(f"unknown event loop {kind!r} (known: {', '.join(KINDS)})")
