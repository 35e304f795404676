"""Per-org key-encryption keys at scale: 10,000 orgs (``HSM_BENCH_SCALE`` scales it, at least
1,000), so 10,000 KEK token objects, in one SoftHSM2 token.

SoftHSM2 2.6.1 walks every object on each ``C_FindObjects``, so the node finds all KEKs with one
search at start and keeps their handles; this measures what that design costs and what it saves:

* ``start``: ``Kms.start()`` on the 10,000-org store (release import, the one KEK search, the
  sweep), and the one search alone (``find_all``);
* ``find_one``: one KEK found by label, what a node pays once per generation another node made;
* ``rotate`` / ``destroy``: one change of one org (new KEK, re-wrap, seal, commit, old KEK
  destroyed), against ``kek_gen``: generating one token KEK alone;
* ``hit``: ``Kms.dek_for_decrypt`` with the DEK cached (one indexed read of the org's
  generation and seal, then the cache), against ``cache_get`` (``KeyCache.get`` alone);
* ``miss``: the same with the org's cache entries dropped (KEK unwrap, release unwrap, PBKDF2
  with 1,000 iterations), against ``derive`` (``derive_dek`` alone);
* node B (a second process on the same store and token) asking for DEKs while this process
  replaces keys: its hit latency, and its first request after each of A's changes (the org's
  new generation read, verified, its KEK found by label).

Variants are interleaved round by round (``_benchlib.Interleaved``); ratios are of medians
measured in the same run. Summary: ``var/bench/kms_org_keys.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from time import perf_counter

import pytest

from hsm import orgkek
from kms.node import derive, sealing
from kms.node.node import Kms
from kms.store.records import checksum

from _benchlib import Interleaved, make_bench_kit, median, scaled, versus

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
from tests.kms_kit import Clock, kms_config  # noqa: E402

ORGS = scaled(10_000, 1_000)
SERVED = 40                 # orgs with a tenant secret (the rest hold only their KEK)
BATCH = 500                 # orgs created per store transaction in the setup
ROUNDS = scaled(30, 8)
DAY = 86400.0


def _bulk_orgs(node: Kms, names: list[str]) -> None:
    """Setup only: orgs made through the store's own sealing path (a KEK each, sealed), many
    per transaction so that 10,000 of them take minutes, not an hour of commits."""
    for start in range(0, len(names), BATCH):
        sealers = []

        def body(conn, chunk=names[start:start + BATCH]):
            for org in chunk:
                created = time.time()
                node.store._x(conn, "INSERT INTO orgs (org_id, org_type, created_at, checksum) "
                                    "VALUES (?, ?, ?, ?)",
                              (org, "production", created,
                               checksum("orgs", (org, "production", created))))
                sealer = sealing.Sealer(node._seals(), org)
                node.store._reseal(conn, org, sealer)
                sealers.append(sealer)
        node.store.db.write("bulk orgs", body)


_NODE_B = textwrap.dedent("""
    import json, os, sys, time
    from kms.node import config as configs
    from kms.node.node import Kms
    from hsm.pin import Pin
    from tests.kms_kit import Clock
    spec = json.loads(sys.argv[1])
    clock = Clock()
    clock.now = spec["now"]
    node = Kms(configs.load(spec["config"]), pin=Pin(os.environ["NODE_PIN"]), clock=clock)
    node.start()
    print("ready", flush=True)
    for line in sys.stdin:
        org = line.strip()
        t0 = time.perf_counter()
        try:
            node.dek_for_encrypt(org)
            out = "ok"
        except Exception as exc:
            out = type(exc).__name__
        print(out, time.perf_counter() - t0, flush=True)
    node.close()
""")


@pytest.fixture(scope="module")
def org_keys_case(bench_token_factory, tmp_path_factory):
    t0 = perf_counter()
    root, kit, kit_s = make_bench_kit(tmp_path_factory, bench_token_factory, "kms-org-keys",
                                      ("eu",))
    release = kit.run_release()
    cfg = kms_config(kit, root, release.output_dir, pbkdf2_iterations=1000)
    clock = Clock()
    node = Kms(cfg, pin=kit.regionals["eu"].user_pin, clock=clock)
    node.start()
    served = [f"served-{i:03d}" for i in range(SERVED)]
    for org in served:
        node.create_tenant(org, "production")
        node.generate_secret(org)
    t1 = perf_counter()
    node._seals().keks.refresh_before_write = False     # setup only: this process alone
    _bulk_orgs(node, [f"org-{i:05d}" for i in range(ORGS - SERVED)])
    node._seals().keks.refresh_before_write = True
    bulk_s = perf_counter() - t1
    assert len(orgkek.find_all(node.token)) == ORGS
    yield {"kit": kit, "cfg": cfg, "node": node, "clock": clock, "served": served,
           "setup_s": perf_counter() - t0, "bulk_s": bulk_s, "kit_s": kit_s}
    node.close()


def test_org_keys_at_scale(benchmark, org_keys_case, bench_reports):
    case = org_keys_case
    node: Kms = case["node"]
    clock: Clock = case["clock"]
    served: list[str] = case["served"]
    token = node.token
    benchmark.group = f"kms org keys: {ORGS} orgs in one token"
    turn = {"i": 0}

    def org() -> str:
        turn["i"] += 1
        return served[turn["i"] % len(served)]

    def timed(fn) -> float:
        t0 = perf_counter()
        fn()
        return perf_counter() - t0

    def hit() -> float:
        o = org()
        node.dek_for_decrypt(o, "field", node._view(o).active("field", clock()).version)
        return timed(lambda: node.dek_for_decrypt(
            o, "field", node._views[o].active("field", clock()).version))

    def cache_get() -> float:
        o = org()
        v = node._view(o).active("field", clock()).version
        node.dek_for_decrypt(o, "field", v)
        return timed(lambda: node.cache.get(o, ("field", v, None)))

    def miss() -> float:
        o = org()
        v = node._view(o).active("field", clock()).version
        node.cache.invalidate(o)
        return timed(lambda: node.dek_for_decrypt(o, "field", v))

    rel = node.current_release()
    secret = os.urandom(32)

    def derive_only() -> float:
        ctx = derive.KeyContext(f"floor-{turn['i']}", "field", 1)
        turn["i"] += 1
        return timed(lambda: derive.derive_dek(token, rel.seed, rel.kdf_salt, secret, ctx, 1000))

    def rotate() -> float:
        clock.now += DAY
        return timed(lambda: node.rotate(org()))

    def destroy() -> float:
        o = org()
        live = [r for r in node.secrets(o) if r.state == "ARCHIVED"]
        if not live:
            clock.now += DAY
            node.rotate(o)
            live = [r for r in node.secrets(o) if r.state == "ARCHIVED"]
        return timed(lambda: node.destroy(o, "field", live[0].version))

    gen_i = {"i": 0}

    def kek_gen() -> float:
        gen_i["i"] += 1
        label = f"bench-floor {gen_i['i']}"
        t = timed(lambda: orgkek.generate(token, label))
        orgkek.destroy(token, orgkek.find(token, label), label)   # untimed: keep the count
        return t

    def find_one() -> float:
        label = node._seals().keks.label(served[0], node.store.org_head(served[0])[0])
        return timed(lambda: orgkek.find(token, label))

    def find_all() -> float:
        return timed(lambda: orgkek.find_all(token))

    inter = Interleaved("kms_org_keys", {
        "hit": hit, "cache_get": cache_get, "miss": miss, "derive": derive_only,
        "rotate": rotate, "destroy": destroy, "kek_gen": kek_gen, "find_one": find_one,
        "find_all": find_all})
    inter.warmup(1)
    inter.run(benchmark, "hit", ROUNDS)

    node_b = _node_b_while_a_replaces(case)
    kek_objects = len(orgkek.find_all(token))
    # Last: a second node started in this process re-imports the releases and so replaces
    # the first one's session objects (it is not used after this).
    starts = []
    for _ in range(3):
        t0 = perf_counter()
        other = Kms(case["cfg"], pin=case["kit"].regionals["eu"].user_pin, clock=clock)
        other.start()
        starts.append(perf_counter() - t0)
        other._store.close()
    ms = 1e3
    summary = {
        "orgs": ORGS, "kek_objects": kek_objects,
        "setup_s": case["setup_s"], "bulk_create_s": case["bulk_s"],
        "bulk_create_ms_per_org (setup: no search before each KEK write)":
            case["bulk_s"] / (ORGS - SERVED) * ms,
        "start_median_s": statistics.median(starts), "starts_s": starts,
        "find_all_median_ms": median(inter.samples["find_all"]) * ms,
        "find_one_median_ms": median(inter.samples["find_one"]) * ms,
        "hit": versus(inter, "hit", "cache_get", 30.0, unit="us", extra_key="overhead_us"),
        "miss": versus(inter, "miss", "derive", 1.5, unit="ms", extra_key="overhead_ms"),
        "rotate": versus(inter, "rotate", "kek_gen", 10.0, unit="ms"),
        "destroy": versus(inter, "destroy", "kek_gen", 10.0, unit="ms"),
        "node_b": node_b,
    }
    benchmark.extra_info.update(summary)
    bench_reports("kms_org_keys").record("org_keys", summary)


def _node_b_while_a_replaces(case) -> dict:
    """Node B serves the served orgs (warm: hits) while node A (this process) rotates them one
    by one: B's hit latency with A idle and with A rotating, and B's first request after each
    of A's changes to the org it asks for."""
    node: Kms = case["node"]
    kit, clock, served = case["kit"], case["clock"], case["served"]
    env = {**os.environ, **kit.regionals["eu"].env, "PYTHONPATH": str(_ROOT),
           "NODE_PIN": kit.regionals["eu"].user_pin.reveal()}
    b = subprocess.Popen([sys.executable, "-c", _NODE_B, json.dumps(
        {"config": str(case["cfg"].path), "now": clock() + 1000 * DAY})], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert b.stdout.readline().strip() == "ready"

        def ask(org: str) -> float:
            b.stdin.write(org + "\n")
            b.stdin.flush()
            out, seconds = b.stdout.readline().split()
            assert out == "ok", out
            return float(seconds)
        for org in served:
            ask(org)                                   # warm B's views and cache
        idle = [ask(org) for org in served for _ in range(3)]
        after_change, busy = [], []
        for org in served[:scaled(20, 5)]:
            clock.now += DAY
            node.rotate(org)                           # A: new KEK, old one destroyed
            after_change.append(ask(org))              # B: new generation, KEK found by label
            busy += [ask(o) for o in served[:5] if o != org]
        us = 1e6
        return {"hit_idle_median_us": statistics.median(idle) * us,
                "hit_while_a_rotates_median_us": statistics.median(busy) * us,
                "first_request_after_a_change_median_ms": statistics.median(after_change) * 1e3,
                "first_request_after_a_change_max_ms": max(after_change) * 1e3,
                "changes": len(after_change)}
    finally:
        b.stdin.close()
        b.wait(timeout=120)
