"""The HTTP stack's own floor for a DEK-shaped request, against the same stack's ``GET /healthz``.

Diagnostic script, not a benchmark test (pytest does not collect it)::

    python3 benchmarks/stack_floor.py [ROUNDS] [SECONDS] [CONNECTIONS]

Issue 19 asks for a cache-hit ``POST /v1/dek`` at no more than 1.3x the cost of the node's
``GET /healthz``. This measures how much of that ratio the server stack takes by itself, before
any work of the node: one server process (no Kms node, no token, no store, no audit log) serves
on 127.0.0.1 the way a kms worker does, with ``kms.server.worker.tls_context`` (mTLS, the
client certificate verified against the test CA of ``tests.service_kit.make_tls``), an aiohttp
``AppRunner`` whose connections are ``kms.server.guard.GuardedHandler`` (the worker's own
protocol: connection budget, per-client connection cap, header deadline), with the options
``kms.server.worker._serve`` gives it. A ``kms.server.app.Service`` without a node holds what
the guard and the middleware consult (policy, admission, metrics). Three listening sockets:

* **bare** (the guard, no middleware; each handler calls the guard's
  ``request_started``/``request_finished`` as the middleware would):
  ``GET /healthz`` answers ``{"status":"ok","worker":0}``; ``POST /post`` reads the body
  (``request.read()``), parses it with the node's ``kms.server.app.parse_json`` and answers a
  DEK-shaped JSON (org, key_type, version, derivation, a base64 32-byte DEK made once) with the
  node's ``_ok`` (orjson); ``POST /post-wait`` does the same and, before answering, waits once
  the way the audit commit makes a request wait: a future of the loop, resolved by a callback
  scheduled once per loop turn for every request that waits in that turn (``AuditLog.commit``
  + ``_settle``, without hashing, writing, signing, or the writer thread's wake-up);
* **framed** (the node's own ``_frame`` middleware: request id, role check from the
  certificate, admission, timeout, metrics): ``GET /healthz`` is the node's own handler,
  ``POST /v1/dek`` is the post-wait handler (so the middleware treats it as the DEK route:
  role ``data``, admission, in-flight count);
* **framed-nowait**: ``POST /v1/dek`` without the wait.

The load is the benchmark's (``_service_load.LoadPool``): 4 client processes, CONNECTIONS
(default 16, as ``test_kms_service.py``) kept-alive mTLS connections each per socket, one
request outstanding per connection, pre-built requests (``{"org": ..., "purpose": "encrypt"}``
for 8 orgs, as the benchmark sends). Variants are interleaved: ROUNDS (default 6) rounds of one
SECONDS-long block (default 1) per variant, the order rotating each round, after one warm-up
round. The server's CPU (user + system, and system alone) and context switches are read from
``/proc`` around each block. Printed per variant: req/s (median block), server and client CPU
µs per request, p50/p99, server context switches per request; then the ratios floor req/s /
variant req/s (median of per-round ratios, and pooled over all rounds) and the server CPU µs
per request beyond the floor. The server runs on the worker's default loop (uvloop);
``STACK_FLOOR_EVENT_LOOP=asyncio`` on asyncio's. ``STACK_FLOOR_LOOP=1`` (asyncio's loop) also
counts the server loop's turns and the events each turn handles (a wrapper around its
selector: ~1 µs a turn).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LIMITS = {"max_concurrent_per_client": 256, "requests_per_second_per_client": 100_000,
          "max_connections_per_client": 256, "max_concurrent": 256}   # as test_kms_service.py
ORGS = [f"bench-{i}" for i in range(8)]
LIFETIME_S = 900          # the server stops by itself after this, whatever happens to its parent


# --------------------------------------------------------------------------- the server process
class _Turn:
    """The audit commit's wait without the audit: every request that waits in one turn of the
    loop gets a future; one callback, scheduled by the first of them, resolves them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiters: list[asyncio.Future] = []

    def wait(self) -> asyncio.Future:
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        if len(self.waiters) == 1:
            self.loop.call_soon(self._settle)
        return waiter

    def _settle(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _handlers(turn: _Turn, dek_b64: str):
    from aiohttp import web
    from kms.server.app import _ok, parse_json

    def answer(body: object) -> dict:
        # The shape and sizes of a cache-hit DEK answer (kms.server.app.dek); the object
        # check is the node's (kms.server.app._json)
        if not isinstance(body, dict):
            raise web.HTTPBadRequest()
        return {"org": body["org"], "key_type": "field", "version": 1, "derivation": "PBKDF2",
                "dek": dek_b64}

    # The node's handlers, without the node's work; the bare variants call the guard themselves
    # (the node's middleware does it for the framed ones)
    async def framed_healthz(request):
        return _ok({"status": "ok", "worker": 0})

    async def framed_post(request):
        body = parse_json(await request.read())
        return _ok(answer(body))

    async def framed_post_wait(request):
        body = parse_json(await request.read())
        await turn.wait()
        return _ok(answer(body))

    def guarded(handler):
        async def bare(request):
            guard = request.protocol
            guard.request_started()
            try:
                return await handler(request)
            finally:
                guard.request_finished()
        return bare
    healthz, post, post_wait = map(guarded, (framed_healthz, framed_post, framed_post_wait))
    return healthz, post, post_wait, framed_post, framed_post_wait


async def _serve(tls_dir: Path) -> None:
    from aiohttp import web
    from kms.server import app as apps
    from kms.server import settings as settings_mod
    from kms.server.guard import ConnectionBudget, GuardedHandler
    from kms.server.metrics import Metrics
    from kms.server.worker import tls_context
    from tests.service_kit import DEFAULT_CLIENTS

    limits = {k: v[1] for k, v in settings_mod._LIMITS.items()} | LIMITS
    s = settings_mod.ServiceSettings(
        certificate=tls_dir / "server.pem", private_key=tls_dir / "server.key",
        client_ca=tls_dir / "ca.pem", limits=limits,
        clients=settings_mod.parse_clients(tls_dir / "stack_floor", DEFAULT_CLIENTS))
    tls = tls_context(s)
    svc = apps.Service(None, s, worker=0, metrics=Metrics(0))   # no node: policy, admission
    loop = asyncio.get_running_loop()
    turn = _Turn(loop)
    dek_b64 = base64.b64encode(os.urandom(32)).decode()
    healthz, post, post_wait, framed_post, framed_post_wait = _handlers(turn, dek_b64)

    def application(framed: bool, routes) -> web.Application:
        app = web.Application(middlewares=[apps._frame] if framed else [],
                              client_max_size=s.limit("max_body_bytes"))
        app["svc"] = svc
        app["limits"] = s.limits
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        return app
    apps_ = {
        "bare": application(False, [("GET", "/healthz", healthz), ("POST", "/post", post),
                                     ("POST", "/post-wait", post_wait)]),
        "framed": application(True, [("GET", "/healthz", apps.healthz),
                                     ("POST", "/v1/dek", framed_post_wait)]),
        "framed-nowait": application(True, [("POST", "/v1/dek", framed_post)]),
    }
    budget = ConnectionBudget(s.limit("max_connections"))
    ports, runners, servers = {}, [], []
    for name, app in apps_.items():
        # As kms.server.worker._serve builds its listener (that function also builds the
        # node's app and starts the node's timers, so it is not called here)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=s.limit("shutdown_timeout_seconds"))
        await runner.setup()
        runners.append(runner)

        def protocol(manager=runner.server):
            return GuardedHandler(manager, loop=loop,
                                  header_timeout=s.limit("header_timeout_seconds"),
                                  budget=budget, svc=svc,
                                  keepalive_timeout=s.limit("idle_timeout_seconds"),
                                  access_log=None, max_line_size=8190, max_field_size=8190,
                                  max_headers=64, lingering_time=0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        servers.append(await loop.create_server(
            protocol, sock=sock, ssl=tls, backlog=1024,
            ssl_handshake_timeout=s.limit("handshake_timeout_seconds")))
        ports[name] = sock.getsockname()[1]
    if os.environ.get("STACK_FLOOR_LOOP"):
        _count_selects(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(json.dumps(ports), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), LIFETIME_S)
    except asyncio.TimeoutError:
        pass
    for server in servers:
        server.close()
    for runner in runners:
        await runner.cleanup()


def _count_selects(loop) -> None:
    """STACK_FLOOR_LOOP=1: count the loop's turns (selector calls) and the events they return;
    SIGUSR1 prints the counts so far as a JSON line (the wrapper costs ~1 µs a turn)."""
    counts = {"turns": 0, "events": 0}
    selector = loop._selector
    select = selector.select

    def counted(timeout=None):
        ready = select(timeout)
        counts["turns"] += 1
        counts["events"] += len(ready)
        return ready
    selector.select = counted
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(counts), flush=True))


# --------------------------------------------------------------------------- the driver
def _cpu(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _switches(pid: int) -> int:
    """The process's context switches so far (its threads' included): voluntary ones are the
    loop going to sleep in epoll_wait with nothing to do."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class _Server:
    """The server process and what can be read of it between blocks."""

    def __init__(self, tls_dir: Path):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve",
                                      str(tls_dir)], stdout=subprocess.PIPE, text=True)
        self.counting = bool(os.environ.get("STACK_FLOOR_LOOP"))
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.stop()
            raise SystemExit("stack_floor: the server process did not start")
        self.ports = json.loads(line)

    def counters(self) -> dict[str, float]:
        pid = self.proc.pid
        user, system = _cpu(pid)
        out = {"cpu": user + system, "sys": system, "switches": _switches(pid)}
        if self.counting and self.proc.stdout is not None:
            self.proc.send_signal(signal.SIGUSR1)
            out.update(json.loads(self.proc.stdout.readline()))
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def main(rounds: int, seconds: float, connections: int) -> None:
    from _service_load import LoadPool, http_request
    from tests.service_kit import make_tls
    load_before = os.getloadavg()[0]
    tls = make_tls(Path(tempfile.mkdtemp(prefix="kms-stack-floor-")) / "tls")
    server = _Server(tls.dir)
    dek = [http_request("POST", "/v1/dek", json.dumps({"org": o, "purpose": "encrypt"})
                        .encode()) for o in ORGS]
    floor = [http_request("GET", "/healthz")]
    variants = {           # name: (socket, pre-built requests)
        "healthz": ("bare", floor),
        "post": ("bare", [r.replace(b"/v1/dek", b"/post", 1) for r in dek]),
        "post-wait": ("bare", [r.replace(b"/v1/dek", b"/post-wait", 1) for r in dek]),
        "framed-healthz": ("framed", floor),
        "framed-post": ("framed-nowait", dek),
        "framed-post-wait": ("framed", dek),
    }
    cert, key = tls.clients["data"]
    blocks: dict[str, list] = {k: [] for k in variants}
    names = list(variants)
    try:
        pool = LoadPool(4, cert, key, tls.ca, connections=connections)
        try:
            for r in range(-1, rounds):          # round -1: warm-up, not kept
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    where, requests = variants[name]
                    before = server.counters()
                    t0 = time.perf_counter()
                    block = pool.run("127.0.0.1", server.ports[where], requests, seconds)
                    elapsed = time.perf_counter() - t0
                    after = server.counters()
                    if block.bad:
                        raise SystemExit(f"stack_floor: {name}: {block.bad} requests failed")
                    if r >= 0:
                        blocks[name].append(_Block(block, elapsed, {
                            k: after[k] - before[k] for k in after}))
        finally:
            pool.close()
    finally:
        server.stop()
    report(blocks, rounds, seconds, connections, load_before)


class _Block:
    def __init__(self, block, elapsed: float, server: dict[str, float]):
        self.rps, self.n, self.elapsed = block.rps, len(block.latencies), elapsed
        self.latencies, self.client_us = block.latencies, block.client_cpu_us_per_request
        self.server = server


def report(blocks: dict[str, list[_Block]], rounds: int, seconds: float, connections: int,
           load_before: float) -> None:
    def rps(name):
        return statistics.median(b.rps for b in blocks[name])

    def pooled_rps(name):
        return sum(b.n for b in blocks[name]) / sum(b.elapsed for b in blocks[name])

    def per_request(name, what):
        return sum(b.server[what] for b in blocks[name]) / sum(b.n for b in blocks[name])

    print(f"{rounds} rounds x {seconds:g} s per variant, 4 client processes x {connections} "
          f"connections; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    counting = "turns" in next(iter(blocks.values()))[0].server
    print(f"{'variant':18} {'req/s':>7} {'server µs/req':>14} {'of it sys':>9} "
          f"{'client µs/req':>14} {'p50 ms':>7} {'p99 ms':>7} {'switches/req':>12}"
          + (f" {'turns/req':>9} {'events/turn':>11}" if counting else ""))
    for name in blocks:
        lat = [x for b in blocks[name] for x in b.latencies]
        line = (f"{name:18} {rps(name):7.0f} {1e6 * per_request(name, 'cpu'):14.0f} "
                f"{1e6 * per_request(name, 'sys'):9.0f} "
                f"{statistics.median(b.client_us for b in blocks[name]):14.0f} "
                f"{1000 * _pct(lat, 0.5):7.2f} {1000 * _pct(lat, 0.99):7.2f} "
                f"{per_request(name, 'switches'):12.2f}")
        if counting:
            line += (f" {per_request(name, 'turns'):9.2f} "
                     f"{per_request(name, 'events') / per_request(name, 'turns'):11.1f}")
        print(line)
    print(f"{'floor / variant':36} {'req/s ratio':>11} {'pooled':>7} {'server CPU µs beyond':>21}")
    for floor, name in (("healthz", "post"), ("healthz", "post-wait"),
                        ("framed-healthz", "framed-post"),
                        ("framed-healthz", "framed-post-wait"),
                        ("healthz", "framed-healthz"), ("healthz", "framed-post-wait")):
        paired = statistics.median(a.rps / b.rps for a, b in zip(blocks[floor], blocks[name]))
        beyond = 1e6 * (per_request(name, "cpu") - per_request(floor, "cpu"))
        print(f"{floor + ' / ' + name:36} {paired:11.2f} "
              f"{pooled_rps(floor) / pooled_rps(name):7.2f} {beyond:21.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from kms.server import eventloop
        # the worker's default loop; asyncio's to count its turns (STACK_FLOOR_LOOP) or when
        # STACK_FLOOR_EVENT_LOOP=asyncio says so
        kind = "asyncio" if os.environ.get("STACK_FLOOR_LOOP") else \
            os.environ.get("STACK_FLOOR_EVENT_LOOP", "uvloop")
        eventloop.run(_serve(Path(sys.argv[2])), kind)
    else:
        args = sys.argv[1:]
        main(int(args[0]) if args else 6, float(args[1]) if len(args) > 1 else 1.0,
             int(args[2]) if len(args) > 2 else 16)
