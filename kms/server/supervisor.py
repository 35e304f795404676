"""``kms serve``: bind one listening socket, run N worker processes on it, pass signals on.

The parent binds the socket and forks the workers *before* it has touched a PKCS#11 module, a
thread or an event loop, so each child starts clean and initialises, logs in and imports its own
session objects (``worker.run``). All workers accept on the same socket (the kernel hands each
connection to one of them). Each child asks the kernel for SIGKILL when the parent dies
(``PR_SET_PDEATHSIG``): a node killed with -9 leaves no worker behind. SIGTERM/SIGINT go to every
worker (each drains) and the parent exits 0 once all did; SIGHUP goes to every worker (policy
reload). A worker that dies unexpectedly is restarted with the same id, at most
``_MAX_RESTARTS`` times in a row within a minute. With one worker there is no parent: the
process is the worker.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import select
import signal
import socket
import sys
import time

from . import preflight

_MAX_RESTARTS = 5
_START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:  # in use, not this host's address, privileged: one line, exit 2
        sock.close()
        raise preflight.listen_error(host, port, exc) from None
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        print(f"kms: note: binding {host}, not loopback", file=sys.stderr)
    sock.setblocking(False)
    return sock


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a killed parent may leave workers that finish their connections


def _spawn(config, sock, worker: int, parent: int, run=None) -> tuple[int, bool]:
    """Fork worker ``worker`` and wait (bounded) until it has logged in and imported its
    releases: workers start one after another, so no two log in to the token at once (SoftHSM2
    answers concurrent C_Login from two processes with CKR_GENERAL_ERROR)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        try:
            # a byte (started), EOF (it died first) or nothing within the bound
            readable, _, _ = select.select([ready_r], [], [], _START_TIMEOUT_S)
            started = bool(readable) and os.read(ready_r, 1) == b"1"
        finally:
            os.close(ready_r)
        return pid, started
    os.close(ready_r)
    code = 1
    try:
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        from . import worker as workers
        def announce_ready() -> None:
            os.write(ready_w, b"1")
            os.close(ready_w)

        code = (run or workers.run)(config, sock, worker, started=announce_ready)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # one line, like the CLI; the parent decides what next
        print(f"kms: worker {worker}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(config, *, host: str, port: int, workers: int, run=None) -> int:
    """``run(config, sock, worker, started=None)`` is the worker's body: a KMS node's by
    default, ``kms.xks.worker.run`` for an XKS node."""
    preflight.check_port(port)
    service = getattr(config, "service", None)
    if service is not None:   # a KMS node: its [service] TLS files, before "listening"
        preflight.tls_files(service.certificate, service.private_key, service.client_ca)
    else:                     # an XKS node: the same keys at the top of its file
        preflight.tls_files(config.certificate, config.private_key, config.client_ca,
                            names=("certificate", "private_key", "client_ca"))
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    print(f"kms: listening on https://{host}:{bound} ({workers} worker"
          f"{'s' if workers > 1 else ''}, region {config.region})", flush=True)
    if workers == 1:
        from . import worker as single
        return (run or single.run)(config, sock, 0)
    parent = os.getpid()
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # stacks to stderr, see worker
    children: dict[int, int] = {}   # pid -> worker id
    stopping = False
    worst = 0

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def start(w: int) -> bool:
        pid, started = _spawn(config, sock, w, parent, run)
        children[pid] = w
        if stopping:      # SIGTERM arrived while it was starting: it stops too
            os.kill(pid, signal.SIGTERM)
        return started
    for w in range(workers):
        if not stopping and not start(w):
            # A worker that cannot start (wrong PIN, no token, bad bundle...) said why on
            # stderr; the others would fail the same way: stop now, do not retry.
            print(f"kms: worker {w} did not start; stopping", file=sys.stderr, flush=True)
            stopping = True
            forward(signal.SIGTERM, None)
            worst = 2
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        w = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, abs(code))
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        print(f"kms: worker {w} exited ({code}); "
              f"{'restarting' if len(restarts) <= _MAX_RESTARTS else 'giving up'}",
              file=sys.stderr, flush=True)
        if len(restarts) > _MAX_RESTARTS:
            stopping = True
            worst = max(worst, 1)
            forward(signal.SIGTERM, None)
            continue
        start(w)
    sock.close()
    return worst
