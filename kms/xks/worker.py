"""The XKS listener in a worker process of ``kms serve``, alone or beside a KMS node.

``kms --config XKS.toml serve`` on a configuration whose only table is ``[xks]`` runs :func:`run`
through the same supervisor as a KMS node (``kms.server.supervisor``: one socket bound before the
fork, N workers started one after another, restarts, death with the parent, SIGTERM drain,
SIGHUP). A KMS node whose TOML also has ``[xks]`` gets, from :func:`beside`, a second socket
bound before the fork and a worker body that runs the KMS worker with a :class:`Listener` in the
same event loop (``kms.server.worker.run(extra=...)``).

A :class:`Listener` logs in once (sharing the KMS node's login when it is the same token),
resolves its keys, makes the health check's session key and serves the XKS routes behind its
own connection guard (``kms.xks.guard``: slow headers cut, connections bounded) and its own
audit file.
SIGHUP re-reads the key stores (credential rotation without a restart); a file that does not
parse keeps the old ones and says why.

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

from hsm.core import pin as pins
from hsm.core.token import Token
from kms.server.audit import AuditLog
from kms.server.metrics import Metrics, _time_token

from . import config as configs
from . import handlers
from .guard import Budget, XksGuard

log = logging.getLogger("kms.xks")


def is_xks_only(path: str | Path) -> bool:
    from suite import tomlfile
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


class Listener:
    """The XKS listener of one worker process: its token (logged in once), key stores, TLS
    context (client certificates optional), audit file and the aiohttp server on ``sock``.
    ``open`` blocks (token, keys); ``serve`` and ``close`` run in the worker's event loop, which
    is an XKS node's own or, beside a KMS node, the KMS worker's (``kms.server.worker``)."""

    def __init__(self, cfg: configs.XksConfig, sock, worker: int):
        self.cfg, self.sock, self.worker = cfg, sock, worker
        self.token: Token | None = None
        self.proxy: handlers.Proxy | None = None
        self.audit: AuditLog | None = None
        self._stop: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._health: asyncio.Future | None = None

    def open(self) -> None:
        cfg = self.cfg
        self.tls = tls_context(cfg)
        pin = pins.resolve(cfg.pin_source, default_env="HSM_PIN", token_label=cfg.token,
                           prompt=f"User PIN for {cfg.token}: ")
        self.token = Token.open(cfg.token, module=cfg.module, parameters=cfg.module_params,
                                pin=pin)
        metrics = Metrics(self.worker)
        _time_token(self.token, metrics)
        if cfg.audit_dir is not None:
            # Chained and fsynced, not signed: the XKS token may be any PKCS#11 token.
            self.audit = AuditLog(cfg.audit_dir, self.worker,
                                  retry_ms=cfg.limit("audit_batch_ms"))
        self.proxy = handlers.Proxy(cfg, self.token, worker=self.worker, metrics=metrics,
                                    audit=self.audit)
        self.proxy.start()
        if self.audit is not None:
            self.audit.append(op="worker.start", result="ok", worker=self.worker,
                              detail="xks " + ", ".join(k.name for k in cfg.keystores))

    async def serve(self) -> None:
        cfg, proxy = self.cfg, self.proxy
        assert proxy is not None
        loop = asyncio.get_running_loop()
        self._runner = runner = web.AppRunner(
            handlers.build(proxy), access_log=None, handle_signals=False,
            shutdown_timeout=cfg.limit("shutdown_timeout_seconds"))
        await runner.setup()
        budget = Budget(cfg.limit("max_connections"))
        manager = runner.server

        def protocol():
            return XksGuard(manager, loop=loop,
                                  header_timeout=cfg.limit("header_timeout_seconds"),
                                  budget=budget, keepalive_timeout=cfg.limit("idle_timeout_seconds"),
                                  access_log=None, max_line_size=8190, max_field_size=8190,
                                  max_headers=64)
        self._server = await loop.create_server(
            protocol, sock=self.sock, ssl=self.tls, backlog=1024,
            ssl_handshake_timeout=cfg.limit("handshake_timeout_seconds"))
        self._stop = asyncio.Event()
        self._health = asyncio.ensure_future(proxy.health_loop(self._stop))
        port = self.sock.getsockname()[1]
        print(f"kms: xks worker {self.worker} serving on port {port}", flush=True)

    def reload(self) -> None:
        """SIGHUP: re-read the key stores (credential rotation) in the background."""
        if self.proxy is not None:
            asyncio.ensure_future(_reload(self.proxy))

    async def drain(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._health is not None:
            await self._health
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        if self.token is not None:
            self.token.close()
        if self.audit is not None:
            self.audit.append(op="worker.stop", result="ok", worker=self.worker)
            self.audit.close()


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


async def _serve_alone(listener: Listener) -> None:
    loop = asyncio.get_running_loop()
    await listener.serve()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, listener.reload)
    await stop.wait()
    log.info("xks worker %d: SIGTERM, draining", listener.worker)
    await listener.drain()


def run(cfg: configs.XksConfig, sock, worker: int = 0, started=None) -> int:
    """An XKS node's worker (``kms serve`` on an ``[xks]``-only TOML)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"kms-xks[w{worker}] %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    listener = Listener(cfg, sock, worker)
    try:
        listener.open()
        if started is not None:
            started()
        asyncio.run(_serve_alone(listener))
    finally:
        listener.close()
    log.info("xks worker %d: stopped", worker)
    return 0


# ---------------------------------------------------------------------- beside a KMS node
def beside(config, host: str | None = None):
    """For a KMS node whose TOML also has ``[xks]``: bind the XKS socket now (before the
    supervisor forks) and return the worker body that runs the KMS worker with the XKS listener
    in the same event loop. The KMS listener keeps its mandatory client certificates; the XKS
    listener serves only the XKS routes."""
    from kms.errors import ConfigError
    from kms.server import supervisor
    xks = configs.load(config.path)     # again, now with the secret access keys
    service = config.service
    if service is not None and xks.audit_dir is not None and xks.audit_dir == service.audit_dir:
        raise ConfigError(f"{config.path}: xks.audit_dir is service.audit_dir; each listener "
                          "keeps its own hash chain", hint="give [xks] its own audit_dir")
    sock = supervisor.bind(host or xks.host, xks.port)   # its port: each worker's first line

    def run(cfg, kms_sock, worker: int = 0, started=None) -> int:
        from kms.server import worker as kms_worker
        return kms_worker.run(cfg, kms_sock, worker, started, extra=Listener(xks, sock, worker))
    return run
