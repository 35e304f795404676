"""A worker process for the multi-process HMAC throughput benchmark (started with 'spawn').

Each worker is its own PKCS#11 application: it loads SoftHSM2 through ``hsm.core.module`` (OS-locking
``C_Initialize``), opens the token the parent created with ``Token.open(label, pin=Pin(...))``,
makes its own session HMAC key and warms up. Then it serves trials: for each command it optionally
waits on the shared barrier (so concurrent workers start together), signs ``n`` times with
``hsm.core.ops.hmac_sha256`` and reports its start and end on CLOCK_MONOTONIC (system-wide on Linux, so
the parent can compute the wall span across workers). A "spin" command runs a pure-Python loop
instead, without touching the token: the control that shows how many cores the machine really
gives two processes at that moment.

This module must not import pytest or the benchmark modules: the spawned child imports it by name
(and _benchlib, which imports neither).
"""

from __future__ import annotations

import os

from _benchlib import run_worker


def worker_main(index: int, label: str, pin_value: str, softhsm_conf: str, commands, results,
                barrier, warmup_ops: int) -> None:
    def setup(token, ref):
        from hsm.core import ops

        data = os.urandom(32)
        hmac_sha256 = ops.hmac_sha256
        for _ in range(warmup_ops):
            hmac_sha256(token, ref, data)

        def hmac(n: int) -> None:
            for _ in range(n):
                hmac_sha256(token, ref, data)
        return {"hmac": hmac}

    run_worker(index, label, pin_value, softhsm_conf, commands, results, barrier,
               "throughput-worker", setup)
