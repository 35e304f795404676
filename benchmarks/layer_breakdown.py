"""Where the layer's time goes on one HMAC-SHA256 sign: a ladder of variants, interleaved.

Diagnostic script, not a benchmark test (pytest does not collect it)::

    python3 benchmarks/layer_breakdown.py [ROUNDS]

It makes its own SoftHSM2 configuration and token in a temporary directory and loads the module
only through ``hsm.core.module`` (OS-locking init). Starting from the raw python-pkcs11 call it adds the
layer's pieces one at a time (key lookup, pool acquire, pool release, ``Token.run``, ``hsm.core.ops``),
single pieces on top of rung 1 (``os.getpid()``, two ``time.monotonic()``, one lock round trip:
rows "1p"), and a sketch of a lean hot path (row "5") for comparison. Every round runs a batch
of BATCH calls of every variant in shuffled order; the table shows per-call medians and the
increment over the raw call. The same Python pieces timed in a tight loop look several times
cheaper than they are here, between two token calls (cold caches): measure them in place.

It touches Token internals (``_acquire``, ``_release``, ``_idle``, ``_lock``) on purpose; rungs whose
internals no longer exist are skipped.
"""

from __future__ import annotations

import collections
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BATCH = 20


def main(rounds: int) -> None:
    from hsm.core.softhsm import init_token_in_process, write_config

    base = Path(tempfile.mkdtemp(prefix="hsm-breakdown-"))
    os.environ["SOFTHSM2_CONF"] = str(write_config(base / "softhsm2.conf", base / "tokens"))

    import pkcs11
    from pkcs11 import KeyType, Mechanism, MechanismFlag

    from hsm.core import module as modules, ops
    from hsm.core.errors import SESSION_LOST
    from hsm.core.pin import Pin
    from hsm.core.token import Token

    mod = modules.load(modules.DEFAULT_MODULE)
    so_pin, user_pin = Pin(secrets.token_hex(8)), Pin(secrets.token_hex(8))
    init_token_in_process(mod, "breakdown", so_pin, user_pin)
    tok = Token.open("breakdown", pin=user_pin)
    ops.generate_session_key(tok, KeyType.GENERIC_SECRET, 256, "k",
                             capabilities=MechanismFlag.SIGN)
    ref = ops.secret("k")
    data = os.urandom(32)
    mech = Mechanism.SHA256_HMAC
    with tok.lease() as lease:
        key = lease.key(ref)

    def fn(lease_):
        return lease_.key(ref).sign(data, mechanism=mech)

    v: dict[str, object] = {}
    v["0 raw key.sign"] = lambda: key.sign(data, mechanism=mech)
    v["1 + Lease.key(ref) lookup"] = lambda: lease.key(ref).sign(data, mechanism=mech)
    if all(hasattr(tok, a) for a in ("_acquire", "_release", "_idle", "_lock")):
        def acq_rel():
            lease_ = tok._acquire()
            lease_.key(ref).sign(data, mechanism=mech)
            tok._release(lease_)

        def acq_only():
            lease_ = tok._acquire()
            lease_.key(ref).sign(data, mechanism=mech)
            tok._idle.append(lease_)

        def rel_only():
            lease_ = tok._idle.pop()
            lease_.key(ref).sign(data, mechanism=mech)
            tok._release(lease_)

        def lock_only():
            lease.key(ref).sign(data, mechanism=mech)
            with tok._lock:
                pass
        v["2a + Token._acquire (append back raw)"] = acq_only
        v["2b + Token._release (pop raw)"] = rel_only
        v["2 + _acquire + _release"] = acq_rel
        v["1p rung 1 + one threading.Lock round trip"] = lock_only
    v["3 + Token.run (prebuilt fn)"] = lambda: tok.run("C_Sign(SHA256_HMAC)", fn, "k")
    v["4 hsm.core.ops.hmac_sha256 (the layer)"] = lambda: ops.hmac_sha256(tok, ref, data)

    def getpid_only():
        os.getpid()
        lease.key(ref).sign(data, mechanism=mech)

    def mono_only():
        time.monotonic()
        lease.key(ref).sign(data, mechanism=mech)
        time.monotonic()
    v["1p rung 1 + os.getpid()"] = getpid_only
    v["1p rung 1 + 2x time.monotonic()"] = mono_only

    idle = collections.deque([lease])

    def lean():
        lease_ = idle.pop()
        try:
            result = fn(lease_)
        except SESSION_LOST:
            raise
        except pkcs11.PKCS11Error:
            idle.append(lease_)
            raise
        idle.append(lease_)
        return result
    v["5 sketch: lean run (deque pop/append, try, lookup)"] = lean

    names = list(v)
    for _ in range(3):
        for f in v.values():
            for _ in range(200):
                f()
    res: dict[str, list[float]] = {k: [] for k in names}
    rng = range(BATCH)
    perf = time.perf_counter
    for _ in range(rounds):
        random.shuffle(names)
        for k in names:
            f = v[k]
            t0 = perf()
            for _ in rng:
                f()
            res[k].append((perf() - t0) / BATCH * 1e6)
    base_us = statistics.median(res["0 raw key.sign"])
    print(f"HMAC-SHA256 sign of 32 bytes, {rounds} rounds x {BATCH} calls per variant, "
          f"loadavg {os.getloadavg()[0]:.2f}")
    print(f"{'variant':52s} {'median us':>10s} {'+us':>8s} {'ratio':>7s}")
    for k in sorted(res):
        m = statistics.median(res[k])
        print(f"{k:52s} {m:10.3f} {m - base_us:+8.3f} {m / base_us:7.3f}")
    tok.close()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 400)
