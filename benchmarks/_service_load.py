"""Client processes for the service benchmarks, cheap per request so that they are not what is
measured.

A few client processes each keep a number of kept-alive TLS connections per server (client
certificate presented) on plain non-blocking ``ssl`` sockets under one ``selectors`` loop and,
when told to, send *pre-built* requests for a given time, **one outstanding per connection** (no
pipelining): an HTTP/1.1 request whose bytes were made once (``http_request``), or a KMIP request
message captured once from PyKMIP's own client (``kmip_get_request``). Reading an answer is a
``recv`` and a length check: an HTTP response is read to its ``Content-Length`` and must be
``200``; a KMIP response is read to its TTLV length and must carry the key's bytes. Each process
reports its own CPU time (user + system, ``time.process_time``) for the block, so the benchmark
shows what the clients cost.

Processes are spawned (not forked) so they never inherit the benchmark process's PKCS#11 state,
and this module is importable by name in the children.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import ssl
import time
from dataclasses import dataclass


def http_request(method: str, path: str, body: bytes | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def _http_length(data: bytes) -> int:
    """The whole length of the HTTP/1.1 response starting ``data`` (-1 until its head is in)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return -1
    head = data[:end].lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError("response without Content-Length")
    stop = head.find(b"\r\n", at + 2)
    return end + 4 + int(head[at + 17:stop if stop > 0 else len(head)])


def _kmip_length(data: bytes) -> int:
    """The whole length of the KMIP TTLV message starting ``data`` (-1 until its header is in)."""
    return 8 + int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1


class _Conn:
    """One kept-alive TLS connection with at most one request outstanding."""
    __slots__ = ("sock", "data", "t0", "i")

    def __init__(self, sock, i: int):
        self.sock, self.data, self.t0, self.i = sock, b"", 0.0, i


def _client(conn_pipe, cert: str, key: str, ca: str) -> None:
    """A client process's loop. Each message ``(host, port, conns, kind, requests, expect,
    seconds)``: keep ``conns`` connections to (host, port) (made once, kept across messages),
    each sending ``requests`` round-robin, one outstanding, for ``seconds``; answer (latencies,
    failed count, CPU seconds used). None ends it."""
    import selectors
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    pools: dict[tuple, list] = {}

    def connect(host, port):
        raw = socket.create_connection((host, port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_hostname=host)
        sock.setblocking(False)
        return sock
    while True:
        msg = conn_pipe.recv()
        if msg is None:
            break
        host, port, n_conns, kind, requests, expect, seconds = msg
        socks = pools.setdefault((host, port), [])
        while len(socks) < n_conns:
            socks.append(connect(host, port))
        length = _http_length if kind == "http" else _kmip_length
        sel = selectors.DefaultSelector()
        conns = [_Conn(s, j) for j, s in enumerate(socks[:n_conns])]
        lat: list[float] = []
        bad, n = 0, len(requests)
        cpu0 = time.process_time()
        end = time.perf_counter() + seconds

        def send(c: _Conn) -> None:
            c.data = b""
            c.t0 = time.perf_counter()
            req = requests[c.i % n]
            c.i += 1
            while True:
                try:
                    c.sock.send(req)     # a few hundred bytes: one TLS record, one send
                    return
                except ssl.SSLWantWriteError:
                    continue
        for c in conns:
            sel.register(c.sock, selectors.EVENT_READ, c)
            send(c)
        busy = len(conns)
        while busy:
            for k, _ in sel.select(5):
                c = k.data
                try:
                    c.data += c.sock.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                total = length(c.data)
                if total < 0 or len(c.data) < total:
                    continue
                now = time.perf_counter()
                lat.append(now - c.t0)
                ok = c.data[9:12] == b"200" if kind == "http" else expect in c.data
                if not ok:
                    bad += 1
                if now < end:
                    send(c)
                else:
                    sel.unregister(c.sock)
                    busy -= 1
        sel.close()
        conn_pipe.send((lat, bad, time.process_time() - cpu0))
    for socks in pools.values():
        for s in socks:
            s.close()


@dataclass
class Block:
    """One block of load: requests per second, every latency, failures, and what the client
    processes spent (CPU seconds over wall seconds: cores busy in the clients)."""
    rps: float
    latencies: list[float]
    bad: int
    client_cpu_cores: float
    client_cpu_us_per_request: float


class LoadPool:
    """``n`` client processes with ``connections`` kept connections each; ``run(...)`` runs
    them all at once for ``seconds``."""

    def __init__(self, n: int, cert, key, ca, *, connections: int = 1):
        self.connections = connections
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client, args=(child, str(cert), str(key), str(ca)),
                            daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, host: str, port: int, requests: list[bytes], seconds: float, *,
            kind: str = "http", expect: bytes = b"") -> Block:
        """``requests``: pre-built request messages, sent round-robin (client ``i`` starts at
        the ``i``-th); ``kind`` "http" or "kmip" (then ``expect`` is the key's bytes)."""
        t0 = time.perf_counter()
        for i, p in enumerate(self.pipes):
            p.send((host, port, self.connections, kind, requests[i:] + requests[:i], expect,
                    seconds))
        results = [p.recv() for p in self.pipes]
        elapsed = time.perf_counter() - t0
        lat = [x for r in results for x in r[0]]
        cpu = sum(r[2] for r in results)
        return Block(len(lat) / elapsed, lat, sum(r[1] for r in results), cpu / elapsed,
                     1e6 * cpu / max(1, len(lat)))

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


def kmip_get_request(port: int, uid: str, cert, key, ca) -> bytes:
    """The bytes PyKMIP's own client sends for ``Get(uid)``, captured once from a real call (so
    the raw loop sends exactly what a PyKMIP client would)."""
    import warnings
    warnings.simplefilter("ignore")
    from kmip.pie.client import ProxyKmipClient
    c = ProxyKmipClient(hostname="127.0.0.1", port=port, cert=str(cert), key=str(key),
                        ca=str(ca), config_file="/dev/null")
    c.open()
    sent: list[bytes] = []
    protocol = c.proxy.protocol
    write = protocol.write

    def capture(data):
        sent.append(bytes(data))
        return write(data)
    protocol.write = capture
    try:
        c.get(uid)
    finally:
        protocol.write = write
        c.close()
    assert len(sent) == 1, "PyKMIP sent the Get in more than one message"
    return sent[0]
