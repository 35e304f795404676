"""One worker process: its own node (token initialisation, login, session objects), on a socket.

``run(config, sock, worker)`` starts a ``kms.node.node.Kms`` (one node per process is the
supported model), serves the API on ``sock`` until SIGTERM, then drains: stop accepting, let
in-flight requests finish (bounded by ``shutdown_timeout_seconds``), close the node (destroys
its session objects, flushes its DEK cache), flush and close the audit log, return 0. SIGHUP
re-reads the client policy from the configuration file; a bad file keeps the old policy.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import ssl
import sys

from aiohttp import web

from kms.node.node import Kms

from . import app as apps
from . import eventloop
from . import settings as settings_mod
from .audit import AuditCollector, AuditLog, TokenSigner
from .guard import ConnectionBudget, GuardedHandler
from .metrics import Metrics

log = logging.getLogger("kms.server")


def tls_context(s) -> ssl.SSLContext:
    """Server side: TLS 1.2+, client certificate mandatory and verified against client_ca."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(s.certificate, s.private_key)
    ctx.load_verify_locations(cafile=str(s.client_ca))
    # No renegotiation: a connection's client certificate is fixed, so the app may read the
    # verified identity once per connection.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _notifier(kms, worker: int, metrics):
    if kms.store.kind != "postgresql":
        return None
    from kms.server import invalidation
    from kms.node import rowcache
    import os
    listener = invalidation.Listener(kms.config.store, kms.cache,
                                     name=f"{os.getpid()}-w{worker}",
                                     on_remote=metrics.remote_invalidations.inc)
    # Rows are kept only while this listener hears every change (kms.node.rowcache).
    kms.rows = rowcache.FreshRows(rowcache.ListenerWatch(listener), node_clock=kms.clock)
    kms.announce = listener.announce     # the node announces every change it commits
    return listener


async def _serve(svc: apps.Service, sock, tls: ssl.SSLContext, extra=None) -> None:
    s = svc.settings
    loop = asyncio.get_running_loop()
    log.info("worker %d: event loop %s", svc.worker, type(loop).__module__.split(".")[0])
    app = apps.build(svc)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=s.limit("shutdown_timeout_seconds"))
    await runner.setup()
    budget = ConnectionBudget(s.limit("max_connections"))
    manager = runner.server

    def protocol():
        return GuardedHandler(manager, loop=loop, header_timeout=s.limit("header_timeout_seconds"),
                              budget=budget, svc=svc,
                              keepalive_timeout=s.limit("idle_timeout_seconds"),
                              access_log=None, max_line_size=8190, max_field_size=8190,
                              max_headers=64,
                              # a body left unread (refused before it was read) is not waited
                              # for: the connection is closed after the answer
                              lingering_time=0)
    server = await loop.create_server(protocol, sock=sock, ssl=tls, backlog=1024,
                                      ssl_handshake_timeout=s.limit("handshake_timeout_seconds"))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, svc, extra)
    if extra is not None:            # the XKS listener beside the node (kms.xks.worker)
        await extra.serve()
    retries = asyncio.ensure_future(_retry_unavailable_keys(svc, stop))
    refusals = asyncio.ensure_future(_flush_refusals(svc, stop))
    print(f"kms: worker {svc.worker} serving", flush=True)
    await stop.wait()
    retries.cancel()
    refusals.cancel()
    svc.flush_refusals()
    log.info("worker %d: SIGTERM, draining", svc.worker)
    svc.ready = False
    server.close()                   # stop accepting; established connections go on
    if extra is not None:
        await extra.drain()
    await runner.cleanup()           # idle connections closed, in-flight requests finish
    server.close()
    await server.wait_closed()
    svc.deadlines.close()


async def _retry_unavailable_keys(svc: apps.Service, stop: asyncio.Event,
                                  every: float = 30.0) -> None:
    """Cache-only keys whose customer key service failed are retried on their schedule (once
    a minute for 5 minutes, then every 5 minutes for 24 h: kms.customer_keys.cache_only), even
    when no request asks for them, so a key that comes back is active again before the next
    encryption."""
    from kms.customer_keys import cache_only as cacheonly
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            return
        try:
            await svc.call(cacheonly.retry_due, svc.kms)
        except Exception as exc:  # a retry that fails says so in the log, never stops serving
            log.warning("worker %d: retrying unavailable keys failed: %s", svc.worker,
                        type(exc).__name__)


async def _flush_refusals(svc: apps.Service, stop: asyncio.Event, every: float = 10.0) -> None:
    """Refusals counted beyond the audited rate are recorded as one line per client every
    ``every`` seconds (kms.server.admission)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass
        svc.flush_refusals()


def _reload(svc: apps.Service, extra=None) -> None:
    if extra is not None:            # the XKS listener re-reads its key stores
        extra.reload()
    from .authz import Policy
    try:
        clients = settings_mod.reload_policy(svc.kms.config.path)
    except Exception as exc:  # keep serving with the old policy; say why once
        log.error("worker %d: SIGHUP: policy not reloaded: %s", svc.worker, exc)
        return
    svc.policy = Policy(clients)
    log.info("worker %d: SIGHUP: policy reloaded (%d clients)", svc.worker, len(clients))
    if svc.audit is not None:
        svc.audit.append(op="policy.reload", result="ok", worker=svc.worker,
                         detail=f"{len(clients)} clients")


def run(config, sock, worker: int = 0, started=None, extra=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"kms[w{worker}] %(levelname)s %(message)s")
    # SIGUSR1 dumps every thread's stack to stderr: how to see what a stuck worker waits for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    s = config.service
    tls = tls_context(s)
    # One session per executor thread (the KMS's, and the XKS listener's beside it: it opens
    # the same token, so it shares this pool), one for the audit writer's checkpoint signature
    # and one spare: the writer then never waits for a session a thread holds.
    threads = s.limit("executor_threads") + (
        extra.cfg.limit("executor_threads") if extra is not None else 0)
    kms = Kms(config, token_sessions=threads + 2)
    kms.start()
    if extra is not None:
        extra.open()
    audit = metrics = notifier = svc = None
    try:
        if s.audit_dir is not None:
            # Before started(): the first worker makes the token's audit key if it is absent,
            # and the supervisor starts the next one only after that.
            audit = AuditLog(s.audit_dir, worker, TokenSigner(kms.token),
                             retry_ms=s.limit("audit_batch_ms"))
            audit.append(op="worker.start", result="ok", worker=worker,
                         detail=f"releases {','.join(sorted(kms.releases)) or 'none'}; "
                                f"checkpoints signed by {audit.signer.label} "
                                f"{audit.signer.fingerprint}")
        if started is not None:
            started()      # the supervisor starts the next worker once this one is logged in
        metrics = Metrics(worker)
        metrics.watch(kms)
        if audit is not None:
            metrics.registry.register(AuditCollector(audit))
        notifier = _notifier(kms, worker, metrics)
        svc = apps.Service(kms, s, worker=worker, metrics=metrics, audit=audit,
                           notifier=notifier)
        eventloop.run(_serve(svc, sock, tls, extra), s.event_loop)
    finally:
        if svc is not None:
            svc.pool.shutdown(wait=True)
        if notifier is not None:
            notifier.close()
        if extra is not None:
            extra.close()
        if audit is not None:   # before the token closes: the last checkpoint is signed in it
            audit.append(op="worker.stop", result="ok", worker=worker)
            audit.close()
        kms.close()
    log.info("worker %d: stopped", worker)
    return 0
