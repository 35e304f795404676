"""``kms.caller.client``: the encryption service's side of the KMS API, over mutual TLS.

``KmsClient(urls, cert=, key=, ca=)``: a list of node URLs (one region), one kept-alive HTTPS
connection per node per thread, timeouts on connect and read, failover to the next node, and
bounded retries: a DEK fetch (a read) is retried on another node after a connection failure, a
timeout or a 503; an admin change is retried only when the connection could not be made (it
cannot have reached a node). Errors come back as the project's exceptions (``UnknownTenant``,
``KeyDestroyed``, ``RateLimited`` …) or ``ServiceError`` carrying the status and code.

``RemoteKeyProvider(client, ttl=5.0)`` plugs into ``kms.caller.sdk.FieldEncryptor``. It keeps the
DEKs
it fetched in its own ``kms.dek_cache.KeyCache`` (AES-256-GCM under per-org cache keys derived from
a random per-process master, never stored: the node's design without an HSM) and uses an entry
only for ``ttl`` seconds after it was fetched; then it asks a node again. That is the bound on
a destroy: ``ttl`` after a key was destroyed (default 5 s, at most ``MAX_TTL``), no encryption
or decryption by this provider uses it, because every node refuses it from the moment of the
destroy. An encrypt that reuses the current version also checks only that version's freshness.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from kms.dek_cache import KeyCache
from kms.errors import (Forbidden, KeyDestroyed, PolicyViolation, RateLimited,
                        ServiceError, Unavailable, UnknownTenant)

MAX_TTL = 300.0


_RETRYABLE_STATUS = (502, 503, 504)


def _raise_for(status: int, body: dict, headers) -> None:
    code, msg = body.get("error", ""), body.get("message", f"HTTP {status}")
    if status == 404 and code == "unknown_org":
        raise UnknownTenant(msg)
    if status == 410:
        raise KeyDestroyed(msg)
    if status == 429:
        wait = float(headers.get("Retry-After", "1"))
        raise RateLimited(msg, next_allowed=time.time() + wait)
    if status == 409 and code == "policy_violation":
        raise PolicyViolation(msg)
    if status in (401, 403):
        raise Forbidden(msg, status=status, code=code)
    if status in _RETRYABLE_STATUS:
        raise Unavailable(f"{msg} (HTTP {status} {code})", status=status, code=code)
    raise ServiceError(f"{msg} (HTTP {status} {code})", status=status, code=code)


class KmsClient:
    def __init__(self, urls, *, cert, key, ca, connect_timeout: float = 2.0,
                 read_timeout: float = 10.0, retries: int = 2):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("at least one node URL")
        self.nodes = []
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme != "https" or not parts.hostname:
                raise ValueError(f"node URL must be https://host:port, not {u!r}")
            self.nodes.append((parts.hostname, parts.port or 443))
        self.ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(str(cert), str(key))
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retries = retries
        self._local = threading.local()
        self._preferred = 0   # the node that answered last: keep using it (sticky failover)
        self.failovers = 0

    # ------------------------------------------------------------------ connections
    def _conns(self) -> dict:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connection(self, i: int) -> http.client.HTTPSConnection:
        conns = self._conns()
        conn = conns.get(i)
        if conn is None:
            host, port = self.nodes[i]
            conn = conns[i] = http.client.HTTPSConnection(host, port, context=self.ctx,
                                                          timeout=self.connect_timeout)
        return conn

    def _drop(self, i: int) -> None:
        conn = self._conns().pop(i, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for i in list(self._conns()):
            self._drop(i)

    # ------------------------------------------------------------------ requests
    def _once(self, i: int, method: str, path: str, payload: bytes | None):
        conn = self._connection(i)
        conn.sock.settimeout(self.read_timeout)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self._drop(i)
        return resp.status, data, resp.headers

    def request(self, method: str, path: str, body: dict | None = None, *,
                idempotent: bool = True) -> dict:
        payload = json.dumps(body).encode() if body is not None else None
        attempts = len(self.nodes) + self.retries
        last: Exception | None = None
        for attempt in range(attempts):
            i = (self._preferred + attempt) % len(self.nodes)
            sent = False
            if not idempotent:
                self._drop(i)   # a change goes on a fresh connection: no stale keep-alive
            try:
                conn = self._connection(i)
                if conn.sock is None:
                    conn.connect()      # under connect_timeout
                sent = True
                status, data, headers = self._once(i, method, path, payload)
            except (ConnectionError, socket.timeout, ssl.SSLError, OSError,
                    http.client.HTTPException) as exc:
                self._drop(i)
                last = exc
                # A change that may have reached a node is not repeated (it may have been
                # made); a read is repeated on the next node.
                if sent and not idempotent:
                    raise ServiceError(f"{method} {path}: the connection failed after the "
                                       f"request was sent ({type(exc).__name__}); it may or "
                                       "may not have been made") from exc
                continue
            if status in _RETRYABLE_STATUS and idempotent and attempt + 1 < attempts:
                last = ServiceError(f"HTTP {status}", status=status)
                continue
            if i != self._preferred:
                self.failovers += 1     # answered by another node than the one preferred
                self._preferred = i
            try:
                doc = json.loads(data) if data else {}
            except ValueError:
                doc = {"error": "bad_response", "message": data[:200].decode(errors="replace")}
            if status >= 400:
                _raise_for(status, doc if isinstance(doc, dict) else {}, headers)
            return doc
        raise Unavailable(f"{method} {path}: no KMS node answered after {attempts} attempts "
                          f"({type(last).__name__}: {last})", status=503, code="unavailable")

    # ------------------------------------------------------------------ the API
    def dek_for_encrypt(self, org: str, key_type: str = "field",
                        fragment: str | None = None) -> tuple[int, str, bytes]:
        body = {"org": org, "key_type": key_type, "purpose": "encrypt"}
        if fragment is not None:
            body["fragment"] = fragment
        doc = self.request("POST", "/v1/dek", body)
        return doc["version"], doc["derivation"], base64.b64decode(doc["dek"])

    def dek_for_decrypt(self, org: str, key_type: str, version: int,
                        fragment: str | None = None) -> bytes:
        body = {"org": org, "key_type": key_type, "purpose": "decrypt", "version": version}
        if fragment is not None:
            body["fragment"] = fragment
        return base64.b64decode(self.request("POST", "/v1/dek", body)["dek"])

    def create_tenant(self, org: str, org_type: str = "production", key_type: str = "field",
                      secret: bool = True) -> dict:
        return self.request("POST", "/v1/tenants", {"org": org, "org_type": org_type,
                                                    "key_type": key_type, "secret": secret},
                            idempotent=False)

    def rotate(self, org: str, key_type: str = "field") -> dict:
        return self.request("POST", f"/v1/tenants/{org}/rotate", {"key_type": key_type},
                            idempotent=False)

    def upload(self, org: str, material: bytes, key_type: str = "field",
               derivation: str = "PBKDF2") -> dict:
        return self.request("POST", f"/v1/tenants/{org}/upload",
                            {"key_type": key_type, "derivation": derivation,
                             "material": base64.b64encode(material).decode()},
                            idempotent=False)

    def destroy(self, org: str, key_type: str, version: int) -> dict:
        # Destroying twice is harmless (the store returns the destroyed row), so it may retry.
        return self.request("POST", f"/v1/tenants/{org}/destroy",
                            {"key_type": key_type, "version": version})

    def status(self) -> dict:
        return self.request("GET", "/v1/status")


class RemoteKeyProvider:
    """A ``FieldEncryptor`` provider backed by the service, with its own encrypted cache."""

    def __init__(self, client: KmsClient, *, ttl: float = 5.0, max_entries: int = 10_000,
                 clock=time.monotonic):
        if not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be between 0 and {MAX_TTL:g} seconds")
        self.client, self.ttl, self.clock = client, float(ttl), clock
        master = os.urandom(32)
        self._cache = KeyCache(lambda org, epoch: hmac.new(
            # the label names the module by its old path: changing it changes no stored byte,
            # but it is the domain separation of these keys and stays as it was
            master, b"kms.client cache key\x00" + org.encode() + b"\x00" + str(epoch).encode(),
            hashlib.sha256).digest(), max_entries=max_entries, flush_after=MAX_TTL * 12)
        self._lock = threading.Lock()
        self._fetched: dict[tuple, float] = {}     # (org, key_id) -> when fetched
        self._current: dict[tuple, tuple] = {}     # (org, key_type) -> (version, derivation, when)
        self.fetches = 0

    def _fresh(self, when: float | None) -> bool:
        return when is not None and self.clock() - when < self.ttl

    def _cached(self, org: str, key_id: tuple) -> bytes | None:
        with self._lock:
            when = self._fetched.get((org, key_id))
        return self._cache.get(org, key_id) if self._fresh(when) else None

    def _keep(self, org: str, key_id: tuple, dek: bytes, generation: int, now: float) -> None:
        if self._cache.put(org, key_id, dek, since=generation):
            with self._lock:
                self._fetched[(org, key_id)] = now

    def dek_for_encrypt(self, org_id: str, key_type: str = "field",
                        fragment: str | None = None) -> tuple[int, str, bytes]:
        with self._lock:
            cur = self._current.get((org_id, key_type))
        if cur is not None and self._fresh(cur[2]):
            dek = self._cached(org_id, (key_type, cur[0], fragment))
            if dek is not None:
                return cur[0], cur[1], dek
        now, gen = self.clock(), self._cache.generation()
        version, derivation, dek = self._fetch(lambda: self.client.dek_for_encrypt(
            org_id, key_type, fragment), org_id, key_type)
        with self._lock:
            self._current[(org_id, key_type)] = (version, derivation, now)
        self._keep(org_id, (key_type, version, fragment), dek, gen, now)
        return version, derivation, dek

    def dek_for_decrypt(self, org_id: str, key_type: str, version: int,
                        fragment: str | None = None) -> bytes:
        key_id = (key_type, version, fragment)
        dek = self._cached(org_id, key_id)
        if dek is not None:
            return dek
        now, gen = self.clock(), self._cache.generation()
        dek = self._fetch(lambda: self.client.dek_for_decrypt(org_id, key_type, version,
                                                              fragment), org_id, key_type)
        self._keep(org_id, key_id, dek, gen, now)
        return dek

    def _fetch(self, call, org_id: str, key_type: str):
        self.fetches += 1
        try:
            return call()
        except (KeyDestroyed, UnknownTenant):
            # The node refused: drop what we hold for this key type at once.
            self._cache.invalidate(org_id, key_type)
            with self._lock:
                self._current.pop((org_id, key_type), None)
            raise

    def invalidate(self, org_id: str, key_type: str | None = None) -> None:
        self._cache.invalidate(org_id, key_type)
        with self._lock:
            for k in [k for k in self._current if k[0] == org_id
                      and (key_type is None or k[1] == key_type)]:
                del self._current[k]
