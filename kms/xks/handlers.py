"""The four operations and the order of the checks in front of them.

Every request to the XKS listener goes through :meth:`Proxy.dispatch`, which decides in this
order, each refusal the specification's error (``kms.xks.errors``) and an audit line:

1. the path: ``[/prefix]/kms/xks/v1/health`` or ``.../keys/<id>/{metadata,encrypt,decrypt}`` under
   a configured prefix, else ``InvalidUriPathException`` (404); a method other than POST is 405;
2. the key store's mTLS (when it names ``mtls_subject``): a client certificate (chained to
   ``client_ca`` by the TLS layer) with exactly that subject CN, else the connection is cut;
3. SigV4: the header's credential, scope and date first, then the body (bounded) and the
   signature over the request as received (``AuthenticationFailedException``, 401);
4. the key store's quota (``ThrottlingException``, 429; after authentication, so nobody without a
   credential can use up a key store's quota) and its state (``InvalidStateException``);
5. the body: JSON, required fields, base64, sizes (``ValidationException``, or
   ``UnsupportedOperationException`` past the sizes the specification requires us to accept);
6. the key: its id (``ValidationException``), whether this key store serves it
   (``KeyNotFoundException``);
7. secondary authorisation from ``requestMetadata`` (``AccessDeniedException``; never for health);
8. a disabled key: GetKeyMetadata says ``keyStatus: DISABLED``, Encrypt and Decrypt are
   ``InvalidStateException``;
9. the operation in the token, on a thread pool with a deadline (``DependencyTimeoutException``).

The audit line carries the key store, the operation, the principal, ``kmsRequestId``,
``kmsOperation``, the KMS key ARN, the access key id and the time taken: never plaintext, AAD,
ciphertext or key material.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from hsm.keys import xks as tokenkeys
from hsm.core.errors import DecryptionFailed, HsmError, ObjectNotFound

from . import sigv4
from .config import API_PATH, KeyStore, XksConfig
from .errors import METHOD_NOT_ALLOWED, XksError, response, validation

log = logging.getLogger("kms.xks")

_ROUTE = re.compile(r"^(?P<prefix>(?:/[A-Za-z0-9_-]+)*?)" + re.escape(API_PATH)
                    + r"/(?:(?P<health>health)|keys/(?P<key>[^/]*)/(?P<op>metadata|encrypt|"
                      r"decrypt))$")
PING = "/kms/xks/ping"          # load balancers' health check: GET, no token call, no auth
METRICS = "/kms/xks/metrics"    # Prometheus text, to client certificates metrics_subjects names
MAX_PLAINTEXT = 4300            # the sizes the specification requires; more is refused
MAX_AAD = 8192
MAX_ARN = 2048
MAX_METADATA = 20
HEALTH_MAX_AGE = 60.0           # the specification: a cached health result at most a minute old
MODEL = "hsm-suite XKS proxy 1.0 (PKCS#11)"


class TokenBucket:
    """``rate`` requests per second with a burst of ``rate`` (at least 1), per worker."""

    def __init__(self, rate: float):
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.at = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Store:
    """One key store as this worker serves it: its configuration, quota and resolved keys."""
    config: KeyStore
    credentials: dict[str, sigv4.Credential]
    bucket: TokenBucket
    keys: dict[str, tokenkeys.XksKey | None]   # None: configured, not on the token


@dataclass
class Call:
    """What the audit line of one request says."""
    store: str | None = None
    op: str = "unknown"
    principal: str | None = None
    access_key: str | None = None
    key: str | None = None
    request_id: str | None = None
    metadata: dict | None = None


class Proxy:
    def __init__(self, cfg: XksConfig, token, *, worker: int = 0, metrics=None, audit=None):
        self.cfg, self.token, self.worker = cfg, token, worker
        self.metrics, self.audit = metrics, audit
        self.pool = ThreadPoolExecutor(cfg.limit("executor_threads"),
                                       thread_name_prefix="xks-token")
        self.stores: dict[str, Store] = {}
        self.inflight = 0
        self.health_key: tokenkeys.XksKey | None = None
        self.health: tuple[str, float] = ("UNAVAILABLE", float("-inf"))
        p11 = token.p11token
        self.ekm_vendor = str(p11.manufacturer_id).strip() or "unknown"
        self.ekm_model = f"{str(p11.model).strip()} ({token.module.path.rsplit('/', 1)[-1]})"
        self.ekm_id = f"{token.label}/{token.serial}"

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Resolve every configured key once (blocking: before serving) and make the health
        check's test key; a key weaker than the XKS policy stops the start."""
        self.stores = self._resolve(self.cfg.keystores)
        self.health_key = tokenkeys.health_key(self.token)
        self._check_health()

    def _resolve(self, keystores) -> dict[str, Store]:
        stores = {}
        for ks in keystores:
            keys: dict[str, tokenkeys.XksKey | None] = {}
            for key_id in ks.keys:
                try:
                    keys[key_id] = tokenkeys.describe(self.token, key_id)
                except ObjectNotFound:
                    log.warning("key store %s: XKS key %r is not on token %r; answering "
                                "KeyNotFoundException", ks.name, key_id, self.token.label)
                    keys[key_id] = None
            stores[ks.prefix] = Store(ks, {c.access_key_id: c for c in ks.credentials},
                                      TokenBucket(ks.requests_per_second), keys)
        return stores

    def reload(self, keystores) -> None:
        """SIGHUP: new credentials, keys, quotas and rules take effect without a restart."""
        self.stores = self._resolve(keystores)

    def _check_health(self) -> None:
        try:
            ok = self.health_key is not None and tokenkeys.self_test(self.token, self.health_key)
        except HsmError as exc:
            log.warning("health check: %s", exc)
            ok = False
        self.health = ("ACTIVE" if ok else "UNAVAILABLE", time.monotonic())

    async def health_loop(self, stop: asyncio.Event) -> None:
        """The deep check (AES-GCM round trip on the test key) every health_interval_seconds,
        so GetHealthStatus answers from a result never older than a minute without the token."""
        every = min(self.cfg.limit("health_interval_seconds"), HEALTH_MAX_AGE / 2)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await asyncio.get_running_loop().run_in_executor(self.pool, self._check_health)
            except Exception as exc:   # never stops serving; the status says UNAVAILABLE
                log.warning("health check failed: %s", type(exc).__name__)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    async def call(self, fn, *args):
        """A token call on the pool, bounded by token_timeout_seconds."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.wait_for(fut, self.cfg.limit("token_timeout_seconds"))
        except asyncio.TimeoutError:
            raise XksError("DependencyTimeoutException",
                           "the key manager did not answer in time") from None

    # ------------------------------------------------------------------ the pipeline
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Every request, with the connection guard told when it starts and ends (a request
        being served is not a slow header; kms.xks.guard)."""
        guard = request.protocol
        if hasattr(guard, "request_started"):
            guard.request_started()
        try:
            return await self._dispatch(request)
        finally:
            if hasattr(guard, "request_finished"):
                guard.request_finished()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        call = Call()
        raw_path = request.rel_url.raw_path
        try:
            if raw_path == PING and request.method in ("GET", "HEAD"):
                return web.json_response({"status": "ok"})
            if raw_path == METRICS and request.method == "GET":
                call.op = "metrics"
                return self._metrics(request)
            store, op, key_id = self._route(raw_path, request.rel_url.raw_query_string)
            call.store, call.op, call.key = store.config.name, op, key_id
            if request.method != "POST":
                raise XksError(METHOD_NOT_ALLOWED, "XKS operations are POST", status=405,
                               headers={"Allow": "POST"})
            self._mtls(request, store)
            if self.inflight >= self.cfg.limit("max_concurrent"):
                raise XksError("ThrottlingException", "the proxy is at its concurrency limit")
            self.inflight += 1
            try:
                resp = await asyncio.wait_for(self._serve(request, store, op, key_id, call),
                                              self.cfg.limit("request_timeout_seconds"))
            finally:
                self.inflight -= 1
            self._record(call, "ok", 200, t0)
            return resp
        except XksError as refused:
            self._record(call, refused.name, refused.status, t0, refused.detail)
            return response(refused)
        except asyncio.TimeoutError:
            late = XksError("DependencyTimeoutException", "the request took too long")
            self._record(call, late.name, late.status, t0)
            return response(late)
        except Exception as exc:
            log.error("xks %s failed: %s", call.op, type(exc).__name__, exc_info=True)
            failed = XksError("InternalException", "internal error (see the proxy's log)")
            self._record(call, failed.name, failed.status, t0)
            return response(failed)
        finally:
            if self.metrics is not None:
                self.metrics.latency.labels(f"xks.{call.op}").observe(time.perf_counter() - t0)

    def _route(self, raw_path: str, query: str) -> tuple[Store, str, str | None]:
        m = _ROUTE.match(raw_path)
        store = self.stores.get(m["prefix"]) if m else None
        if m is None or store is None or query:
            raise XksError("InvalidUriPathException",
                           f"no XKS key store answers {raw_path[:200]!r}"
                           + (" (XKS requests have no query string)" if query else ""))
        return store, ("health" if m["health"] else m["op"]), m["key"]

    def _metrics(self, request: web.Request) -> web.Response:
        """The worker's Prometheus metrics, only to a client certificate (verified by the TLS
        layer against client_ca) whose subject CN ``metrics_subjects`` names."""
        if self.metrics is None or not self.cfg.metrics_subjects or \
                _peer_cn(request) not in self.cfg.metrics_subjects:
            raise XksError("AccessDeniedException", "the metrics need a client certificate "
                           "that xks.metrics_subjects names")
        from kms.server.metrics import CONTENT_TYPE
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _mtls(self, request: web.Request, store: Store) -> None:
        """A key store that requires AWS's client certificate: the TLS layer verified the chain
        against client_ca; the subject CN must be exactly the one configured. Anything else
        ends the connection without an answer, as a refused handshake would."""
        wanted = store.config.mtls_subject
        if wanted is None:
            return
        names = _peer_cns(request)
        if names != [wanted]:
            self._record(Call(store.config.name, "mtls"), "AuthenticationFailedException", 0,
                         time.perf_counter(),
                         f"client certificate CN {names[:1]} is not {wanted!r}; connection cut")
            if request.transport is not None:
                request.transport.abort()
            raise XksError("AuthenticationFailedException", "client certificate refused")

    async def _serve(self, request, store: Store, op: str, key_id, call: Call):
        try:
            signed = sigv4.authenticate_headers(request.headers, store.credentials,
                                                store.config.region, time.time())
            call.access_key = signed.credential.access_key_id
            body = await _read(request, self.cfg.limit("max_body_bytes"))
            sigv4.verify(signed, request.method, request.rel_url.raw_path, request.headers, body)
        except sigv4.AuthFailure as exc:
            raise XksError("AuthenticationFailedException", "SigV4 authentication failed",
                           detail=f"SigV4: {exc}") from None
        if not store.bucket.take():
            raise XksError("ThrottlingException", f"key store {store.config.name} is over its "
                           f"quota of {store.config.requests_per_second:g} requests/s")
        if not store.config.enabled:
            raise XksError("InvalidStateException", f"key store {store.config.name} is disabled")
        meta, doc = _parse(body, op, call)
        if op == "health":
            return web.json_response(await self._health())
        key = self._key(store, key_id, call)
        self._authorise(store, op, key_id, meta)
        disabled = key_id in store.config.disabled_keys
        if op == "metadata":      # a disabled key says so; AWS KMS then refuses CreateKey
            return web.json_response({"keySpec": "AES_256", "keyUsage": key.usage,
                                      "keyStatus": "DISABLED" if disabled else "ENABLED"})
        if disabled:
            raise XksError("InvalidStateException", f"key {key_id!r} is disabled")
        if op == "encrypt":
            return web.json_response(await self._encrypt(key, doc))
        return web.json_response(await self._decrypt(key, doc))

    def _key(self, store: Store, key_id: str, call: Call) -> tokenkeys.XksKey:
        if not tokenkeys.KEY_ID.match(key_id) or key_id in (".", ".."):
            raise validation("externalKeyId must be 1-128 characters of A-Z a-z 0-9 . _ -")
        if key_id not in store.keys:
            raise XksError("KeyNotFoundException", f"no key {key_id!r} in this key store")
        key = store.keys[key_id]
        if key is None:
            raise XksError("KeyNotFoundException", f"key {key_id!r} is not in the key manager")
        return key

    def _authorise(self, store: Store, op: str, key_id: str, meta: dict) -> None:
        """Secondary authorisation: with no rules every authenticated request is allowed (the
        specification's default); with rules, one must allow the principal, key, KMS operation
        and (if the rule names any) the calling AWS service."""
        rules = store.config.rules
        if not rules:
            return
        principal = meta.get("awsPrincipalArn", "")
        kms_op = meta.get("kmsOperation", "")
        via = meta.get("kmsViaService")
        for rule in rules:
            if _any(principal, rule.principals) and _any(key_id, rule.keys) and \
                    _any(kms_op, rule.kms_operations) and \
                    (rule.via_services is None or (via is not None
                                                   and _any(via, rule.via_services))):
                return
        if self.metrics is not None:
            self.metrics.refused.labels("xks").inc()
        raise XksError("AccessDeniedException",
                       f"no rule of key store {store.config.name} allows principal "
                       f"{principal[:200]!r} to use key {key_id!r} for {kms_op[:64]!r}"
                       + (f" via {via[:64]!r}" if via else ""))

    # ------------------------------------------------------------------ operations
    async def _health(self) -> dict:
        status, at = self.health
        if time.monotonic() - at > HEALTH_MAX_AGE:   # the loop stalled: check now
            await self.call(self._check_health)
            status, _ = self.health
        return {"xksProxyFleetSize": self.cfg.fleet_size, "xksProxyVendor": self.cfg.vendor,
                "xksProxyModel": MODEL, "ekmVendor": self.ekm_vendor,
                "ekmFleetDetails": [{"id": self.ekm_id, "model": self.ekm_model,
                                     "healthStatus": status}]}

    async def _encrypt(self, key: tokenkeys.XksKey, doc: dict) -> dict:
        if not key.encrypt:
            raise XksError("InvalidKeyUsageException", f"key {key.key_id!r} may not encrypt")
        if doc.get("encryptionAlgorithm") != "AES_GCM":
            raise validation("encryptionAlgorithm must be AES_GCM")
        cdiv_algorithm = doc.get("ciphertextDataIntegrityValueAlgorithm")
        if cdiv_algorithm is not None and cdiv_algorithm != "SHA_256":
            raise validation("ciphertextDataIntegrityValueAlgorithm must be SHA_256")
        plaintext = _b64(doc, "plaintext", required=True, limit=MAX_PLAINTEXT)
        aad = _b64(doc, "additionalAuthenticatedData", limit=MAX_AAD)
        iv, ct, tag = await self._token_op(key, _encrypt_in_token, self.token, key, plaintext,
                                           aad)
        out = {"ciphertext": _e(ct), "initializationVector": _e(iv), "authenticationTag": _e(tag)}
        if cdiv_algorithm is not None:
            # Appendix C: the hash first, over what is returned, then the round trip through
            # the token, so a fault after the hash cannot produce a matching CDIV over bad data.
            out["ciphertextDataIntegrityValue"] = _e(cdiv(aad, None, iv, ct, tag))
            if key.decrypt:
                back = await self._token_op(key, _decrypt_in_token, self.token, key, iv, ct,
                                            tag, aad, None)
                if not hmac.compare_digest(back, plaintext):
                    raise XksError("InternalException", "the encryption did not round-trip")
        return out

    async def _decrypt(self, key: tokenkeys.XksKey, doc: dict) -> dict:
        if not key.decrypt:
            raise XksError("InvalidKeyUsageException", f"key {key.key_id!r} may not decrypt")
        if doc.get("encryptionAlgorithm") != "AES_GCM":
            raise validation("encryptionAlgorithm must be AES_GCM")

        def part(name, required, lengths=None, limit=None):
            try:
                value = _b64(doc, name, required=required, limit=limit)
            except XksError as err:
                if err.name == "UnsupportedOperationException":
                    raise
                raise XksError("InvalidCiphertextException", err.message) from None
            if value is not None and lengths and len(value) not in lengths:
                raise XksError("InvalidCiphertextException",
                               f"{name} must be {' or '.join(map(str, lengths))} bytes")
            return value
        ct = part("ciphertext", True, limit=MAX_PLAINTEXT)
        iv = part("initializationVector", True, (12, 16))
        tag = part("authenticationTag", True, (16,))
        aad = part("additionalAuthenticatedData", False, limit=MAX_AAD)
        meta = _b64(doc, "ciphertextMetadata", limit=MAX_METADATA, over="ValidationException")
        try:
            plaintext = await self._token_op(key, _decrypt_in_token, self.token, key, iv, ct,
                                             tag, aad, meta)
        except DecryptionFailed:
            raise XksError("InvalidCiphertextException", "the ciphertext, IV, tag or AAD is "
                           "not what this key encrypted") from None
        return {"plaintext": _e(plaintext)}

    async def _token_op(self, key: tokenkeys.XksKey, fn, *args):
        """A key that vanished from the token since start (destroyed by someone holding the
        PIN) is KeyNotFoundException, not an internal error."""
        try:
            return await self.call(fn, *args)
        except ObjectNotFound:
            raise XksError("KeyNotFoundException",
                           f"key {key.key_id!r} is no longer in the key manager") from None

    # ------------------------------------------------------------------ audit
    def _record(self, call: Call, result: str, status: int, t0: float, why: str | None = None):
        if self.metrics is not None:
            self.metrics.requests.labels(f"xks.{call.op}", "POST", str(status)).inc()
        if why and status >= 400:
            log.info("xks %s %s: %s %s", call.store, call.op, result, why)
        if self.audit is None:
            return
        meta = call.metadata or {}
        parts = [f"key={call.key}" if call.key else None,
                 f"kmsOperation={str(meta.get('kmsOperation'))[:64]}"
                 if "kmsOperation" in meta else None,
                 f"kmsKeyArn={str(meta.get('kmsKeyArn'))[:MAX_ARN]}" if "kmsKeyArn" in meta
                 else None,
                 f"via={str(meta.get('kmsViaService'))[:64]}" if "kmsViaService" in meta
                 else None,
                 f"accessKeyId={call.access_key}" if call.access_key else None,
                 f"ms={(time.perf_counter() - t0) * 1000:.2f}",
                 why[:300] if why and status >= 400 else None]
        self.audit.append(client=call.principal, op=f"xks.{call.op}", org=call.store,
                          result=result, status=status,
                          request_id=call.request_id or f"xks-{uuid.uuid4().hex[:16]}",
                          worker=self.worker, detail=" ".join(p for p in parts if p))


# ---------------------------------------------------------------------- token calls (pool)
def token_aad(aad: bytes | None, metadata: bytes | None) -> bytes:
    """The AAD given to the token: 2-byte big-endian length of the caller's AAD, the AAD, 1-byte
    length of the ciphertext metadata, the metadata (the specification's Encrypt section), so an
    AAD cannot pass for metadata or the reverse. This proxy returns no ciphertextMetadata."""
    aad, metadata = aad or b"", metadata or b""
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


def cdiv(aad: bytes | None, metadata: bytes | None, iv: bytes, ct: bytes, tag: bytes) -> bytes:
    """Appendix C: SHA-256 over AAD || ciphertextMetadata || IV || ciphertext || tag."""
    return hashlib.sha256((aad or b"") + (metadata or b"") + iv + ct + tag).digest()


def _encrypt_in_token(token, key, plaintext: bytes, aad: bytes | None):
    return tokenkeys.encrypt(token, key, plaintext, token_aad(aad, None))


def _decrypt_in_token(token, key, iv, ct, tag, aad, metadata) -> bytes:
    return tokenkeys.decrypt(token, key, iv, ct, tag, token_aad(aad, metadata))


# ---------------------------------------------------------------------- parsing
async def _read(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise XksError("UnsupportedOperationException", f"request body over {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise XksError("UnsupportedOperationException",
                       f"request body over {limit} bytes") from None


_META_REQUIRED = {"health": ("kmsRequestId", "kmsOperation"),
                  "metadata": ("awsPrincipalArn", "kmsOperation", "kmsRequestId"),
                  "encrypt": ("awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"),
                  "decrypt": ("awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId")}


def _parse(body: bytes, op: str, call: Call) -> tuple[dict, dict]:
    """(requestMetadata, whole document). Unknown fields are accepted (AWS KMS may add
    requestMetadata fields, Appendix B); GetHealthStatus never answers ValidationException."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    meta = doc.get("requestMetadata") if isinstance(doc, dict) else None
    if isinstance(meta, dict):
        call.metadata = meta
        rid, principal = meta.get("kmsRequestId"), meta.get("awsPrincipalArn")
        call.request_id = rid[:256] if isinstance(rid, str) else None
        call.principal = principal[:MAX_ARN] if isinstance(principal, str) else None
    if op == "health":
        return (meta if isinstance(meta, dict) else {}), (doc if isinstance(doc, dict) else {})
    if not isinstance(doc, dict):
        raise validation("the request body is not a JSON object")
    if not isinstance(meta, dict):
        raise validation("requestMetadata is missing")
    for name in _META_REQUIRED[op]:
        if not isinstance(meta.get(name), str):
            raise validation(f"requestMetadata.{name} is missing or not a string")
    for name in ("awsPrincipalArn", "kmsKeyArn"):
        if isinstance(meta.get(name), str) and len(meta[name]) > MAX_ARN:
            raise XksError("UnsupportedOperationException",
                           f"requestMetadata.{name} is longer than {MAX_ARN} characters")
    for name in ("kmsViaService", "awsSourceVpc", "awsSourceVpce"):
        if name in meta and not isinstance(meta[name], str):
            raise validation(f"requestMetadata.{name} must be a string")
    return meta, doc


def _b64(doc: dict, name: str, *, required: bool = False, limit: int | None = None,
         over: str = "UnsupportedOperationException") -> bytes | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise validation(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise validation(f"{name} must be a Base64 string")
    if limit is not None and len(value) > 4 * ((limit + 2) // 3):
        raise XksError(over, f"{name} is longer than {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise validation(f"{name} is not standard Base64") from None
    if limit is not None and len(data) > limit:
        raise XksError(over, f"{name} is longer than {limit} bytes")
    return data


def _e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _peer_cns(request: web.Request) -> list[str]:
    """The subject CNs of the client certificate the TLS layer verified (none: [])."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    return [v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"]


def _peer_cn(request: web.Request) -> str | None:
    names = _peer_cns(request)
    return names[0] if len(names) == 1 else None


def _any(value: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def build(proxy: Proxy) -> web.Application:
    """The XKS listener's application: one catch-all route, so every path and method gets the
    specification's answer (aiohttp's own 404/405 would not carry an errorName)."""
    app = web.Application(client_max_size=proxy.cfg.limit("max_body_bytes"))
    app["xks"] = proxy
    app.router.add_route("*", "/{tail:.*}", proxy.dispatch)
    return app


__all__ = ["API_PATH", "Proxy", "build", "cdiv", "token_aad"]
