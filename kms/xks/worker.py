"""One process of an XKS node under ``kms serve``: the token, the XKS listener, until SIGTERM.

``kms --config XKS.toml serve`` on a configuration whose only table is ``[xks]`` runs this through
the same supervisor as a KMS node (``kms.server.supervisor``: one socket bound before the fork,
N workers started one after another, restarts, death with the parent, SIGTERM drain, SIGHUP).
Each worker logs in once, resolves its keys, makes the health check's session key and serves the
XKS routes with the KMS service's connection guard (slow headers cut, connections bounded) and
audit log. SIGHUP re-reads the key stores (credential rotation without a restart); a file that
does not parse keeps the old ones and says why.

TLS: 1.2 or later, ECDHE with AES-GCM or ChaCha20 only (the specification's suites among them).
Client certificates are *optional* on this listener (AWS KMS presents one only to key stores
configured for mTLS), required at the handshake when every key store names ``mtls_subject``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from hsm import pin as pins
from hsm.token import Token
from kms.server.audit import AuditLog
from kms.server.guard import ConnectionBudget, GuardedHandler
from kms.server.metrics import Metrics, _time_token

from . import config as configs
from . import handlers

log = logging.getLogger("kms.xks")


def is_xks_only(path: str | Path) -> bool:
    from hsm import tomlfile
    from kms.errors import ConfigError
    data, _, _ = tomlfile.read(Path(path), what="node configuration", error=ConfigError)
    return configs.is_xks_only(data)


def serve(path: str | Path, *, host: str | None, port: int | None, workers: int | None) -> int:
    from kms.errors import ConfigError
    from kms.server import supervisor
    cfg = configs.load(path)
    n = workers if workers is not None else cfg.workers
    if not 1 <= n <= 64:
        raise ConfigError("--workers must be 1-64")
    return supervisor.serve(cfg, host=host or cfg.host, port=cfg.port if port is None else port,
                            workers=n, run=run)


def tls_context(cfg: configs.XksConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.load_cert_chain(cfg.certificate, cfg.private_key)
    if cfg.client_ca is not None:
        ctx.load_verify_locations(cafile=str(cfg.client_ca))
        every = all(k.mtls_subject for k in cfg.keystores)
        ctx.verify_mode = ssl.CERT_REQUIRED if every else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


async def _serve(proxy: handlers.Proxy, sock, tls: ssl.SSLContext) -> None:
    cfg = proxy.cfg
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(handlers.build(proxy), access_log=None, handle_signals=False,
                           shutdown_timeout=cfg.limit("shutdown_timeout_seconds"))
    await runner.setup()
    budget = ConnectionBudget(cfg.limit("max_connections"))
    manager = runner.server

    def protocol():
        return GuardedHandler(manager, loop=loop, header_timeout=cfg.limit("header_timeout_seconds"),
                              budget=budget, keepalive_timeout=cfg.limit("idle_timeout_seconds"),
                              access_log=None, max_line_size=8190, max_field_size=8190,
                              max_headers=64)
    server = await loop.create_server(protocol, sock=sock, ssl=tls, backlog=1024,
                                      ssl_handshake_timeout=cfg.limit("handshake_timeout_seconds"))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(proxy)))
    health = asyncio.ensure_future(proxy.health_loop(stop))
    print(f"kms: xks worker {proxy.worker} serving", flush=True)
    await stop.wait()
    await health
    log.info("xks worker %d: SIGTERM, draining", proxy.worker)
    server.close()
    await runner.cleanup()
    await server.wait_closed()


async def _reload(proxy: handlers.Proxy) -> None:
    try:
        keystores = configs.reload_keystores(proxy.cfg.path)
        await asyncio.get_running_loop().run_in_executor(proxy.pool, proxy.reload, keystores)
    except Exception as exc:   # keep serving the old key stores; say why once
        log.error("xks worker %d: SIGHUP: key stores not reloaded: %s", proxy.worker, exc)
        return
    log.info("xks worker %d: SIGHUP: %d key store(s) reloaded", proxy.worker, len(keystores))
    if proxy.audit is not None:
        proxy.audit.append(op="xks.reload", result="ok", worker=proxy.worker,
                           detail=f"{len(keystores)} key stores")


def run(cfg: configs.XksConfig, sock, worker: int = 0, started=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"kms-xks[w{worker}] %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    tls = tls_context(cfg)
    pin = pins.resolve(cfg.pin_source, default_env="HSM_PIN", token_label=cfg.token,
                       prompt=f"User PIN for {cfg.token}: ")
    token = Token.open(cfg.token, module=cfg.module, parameters=cfg.module_params, pin=pin)
    audit = proxy = None
    try:
        metrics = Metrics(worker)
        _time_token(token, metrics)
        if cfg.audit_dir is not None:
            audit = AuditLog(cfg.audit_dir / f"audit-w{worker}.jsonl",
                             batch_ms=cfg.limit("audit_batch_ms"))
        proxy = handlers.Proxy(cfg, token, worker=worker, metrics=metrics, audit=audit)
        proxy.start()
        if audit is not None:
            audit.append(op="worker.start", result="ok", worker=worker,
                         detail="xks " + ", ".join(k.name for k in cfg.keystores))
        if started is not None:
            started()
        asyncio.run(_serve(proxy, sock, tls))
    finally:
        if proxy is not None:
            proxy.close()
        token.close()
        if audit is not None:
            audit.append(op="worker.stop", result="ok", worker=worker)
            audit.close()
    log.info("xks worker %d: stopped", worker)
    return 0
