"""Client processes for the service benchmarks: each keeps one mTLS keep-alive connection per
server and runs a request loop for a given time when told to; spawned (not forked) so they never
inherit the benchmark process's PKCS#11 state, and importable by name in the children."""

from __future__ import annotations

import http.client
import multiprocessing as mp
import ssl
import time


def _serve(conn_pipe, connect, requester) -> None:
    """A client process's loop: for each ``(host, port, method, path, body, seconds)`` it is
    sent, keep one connection per server (``connect(host, port)``), make requests back to back
    for ``seconds`` with ``requester(conn, method, path, body)`` (a call that makes one request
    and says whether it succeeded), and send back (latencies, failed count). None ends it."""
    conns: dict[tuple, object] = {}
    while True:
        msg = conn_pipe.recv()
        if msg is None:
            break
        host, port, method, path, body, seconds = msg
        conn = conns.get((host, port))
        if conn is None:
            conn = conns[(host, port)] = connect(host, port)
        once = requester(conn, method, path, body)
        lat, bad = [], 0
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            if not once():
                bad += 1
            lat.append(time.perf_counter() - t0)
        conn_pipe.send((lat, bad))
    for c in conns.values():
        c.close()


def _client_loop(conn_pipe, cert: str, key: str, ca: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)

    def connect(host, port):
        return http.client.HTTPSConnection(host, port, context=ctx, timeout=30)

    def requester(conn, method, path, body):
        headers = {"Content-Type": "application/json"} if body else {}

        def once() -> bool:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        return once

    _serve(conn_pipe, connect, requester)


def _kmip_loop(conn_pipe, cert: str, key: str, ca: str) -> None:
    """The same loop with PyKMIP's client: one kept connection, ``Get`` of one key id."""
    import warnings
    warnings.simplefilter("ignore")
    from kmip.pie.client import ProxyKmipClient

    def connect(host, port):
        c = ProxyKmipClient(hostname=host, port=port, cert=cert, key=key, ca=ca,
                            config_file="/dev/null")
        c.open()
        return c

    def requester(c, _method, uid, _body):
        return lambda: len(c.get(uid).value) == 32

    _serve(conn_pipe, connect, requester)


class LoadPool:
    """``n`` client processes; ``run(host, port, method, path, body, seconds)`` runs them all at
    once and returns (requests per second over the block, all latencies, failed count).
    ``kmip=True``: PyKMIP clients, ``path`` is the key's unique id."""

    def __init__(self, n: int, cert, key, ca, *, kmip: bool = False):
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_kmip_loop if kmip else _client_loop,
                            args=(child, str(cert), str(key), str(ca)), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, host: str, port: int, method: str, path: str, body: bytes | None,
            seconds: float):
        t0 = time.perf_counter()
        for p in self.pipes:
            p.send((host, port, method, path, body, seconds))
        results = [p.recv() for p in self.pipes]
        elapsed = time.perf_counter() - t0
        lat = [x for r in results for x in r[0]]
        return len(lat) / elapsed, lat, sum(r[1] for r in results)

    def close(self) -> None:
        for p in self.pipes:
            try:
                p.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
