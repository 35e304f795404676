"""Routes and handlers: the JSON API over one started ``kms.node.node.Kms`` node.

Every request is authorised from the client certificate the TLS layer verified, read once per
connection by the guard (``kms.server.guard``); no header is ever read as an identity. A
certificate the policy does not name is answered 403 by the guard and never reaches this app.
For a named client the middleware checks the route's role, the client's rate and its requests in
flight *before* the request takes a concurrency slot or a body byte is read; the org and key type
are checked once the body (bounded in size and in time) is parsed. Node calls block (token,
store), so they run on a small thread pool; the event loop only parses, authorises, audits and
answers. Inputs are checked strictly (content type, duplicate keys, nesting depth, non-finite
numbers, lone surrogates, unknown fields, wrong types, bad base64 → 4xx with a code) before the
node sees them. Every key operation and admin action is audited (client, operation, org, key
type, version, result, request id), never a key; refusals at a bounded rate per client. A DEK or
a successful admin answer is sent only once its record is durable (``Service.commit``); error
answers are recorded without waiting; while the audit log cannot be written DEK and admin
requests are refused with 503 ``audit_unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from aiohttp import web

from kms import key_rules as policy

from aiohttp import ClientConnectionError

from . import authz
from .admission import UNNAMED, Admission
from .audit import AuditUnavailable
from .deadlines import Deadlines
from .errors import HttpError, classify
from .metrics import CONTENT_TYPE

log = logging.getLogger("kms.server")

OPENAPI = Path(__file__).with_name("openapi.json")
_ORG = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]{1,255}$")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_JSON_DEPTH = 8        # the API's bodies are flat objects; anything deeper is refused
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MISSING = object()


def _audit_down() -> HttpError:
    return HttpError(503, "audit_unavailable", "the audit log cannot be written: no key material "
                     "is served until it can", {"Retry-After": "1"})


# --------------------------------------------------------------------------- input checks
def _b64_field(body: dict, name: str, *, length: int | None = None) -> bytes:
    """A required base64 string field, decoded strictly; ``length`` bytes when given."""
    try:
        value = base64.b64decode(_field(body, name, str), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "bad_request", f"{name} must be base64") from None
    if length is not None and len(value) != length:
        raise HttpError(400, "bad_request",
                        f"{name} must be {length} bytes (base64 of {length} bytes)")
    return value


def _field(body: dict, name: str, kind, *, default=_MISSING, choices=None):
    if name not in body:
        if default is _MISSING:
            raise HttpError(400, "bad_request", f"missing field {name!r}")
        return default
    value = body[name]     # present: of its type, never null (null is not "absent")
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise HttpError(400, "bad_request", f"field {name!r} must be {kind.__name__}")
    if choices is not None and value not in choices:
        raise HttpError(400, "bad_request", f"field {name!r} must be one of {', '.join(choices)}")
    return value


def _org(value) -> str:
    if not isinstance(value, str) or not _ORG.match(value):
        raise HttpError(400, "bad_request", "org must be 1-255 characters, no control characters")
    return value


def _version(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFFFFFF:
        raise HttpError(400, "bad_request", "version must be an integer >= 1")
    return value


def _depth_ok(raw: bytes, limit: int) -> bool:
    """Whether no array/object in ``raw`` nests deeper than ``limit`` (json.loads would recurse
    once per level, up to a RecursionError: this scan does not)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:        # backslash
                escaped = True
            elif byte == 0x22:        # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):    # [ {
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


class _BadJson(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _BadJson("duplicate_key", f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _constant(name):
    raise _BadJson("non_finite_number", f"{name} is not a JSON number this API accepts")


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadJson("non_finite_number", "a number too large for a double")
    return value


def _utf8_ok(value) -> bool:
    """No lone surrogate (valid JSON ``"\\ud800"``, but no Unicode text) anywhere in ``value``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_utf8_ok(k) and _utf8_ok(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8_ok(v) for v in value)
    return True


def _flat_object(raw: bytes) -> dict | None:
    """``raw`` parsed by orjson, if it is what the strict parser below would make of it: an
    object of strings, integers, booleans and nulls whose keys are all different (one ``:`` in
    the body per key: a repeated key, which orjson keeps quietly, has a second one, and so
    does a string holding a colon, which then goes the strict way). Anything else - other
    values, an orjson error, a big integer (orjson makes it a float) - is None, and the strict
    parser gives its answer and its error codes. A fifth of its cost on a DEK request."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict or raw.count(b":") != len(body):
        return None
    for value in body.values():
        if value is not None and type(value) not in (str, int, bool):
            return None
    return body


def parse_json(raw: bytes) -> object:
    """The body as JSON, or HttpError 400 with a code saying what is wrong with it."""
    if not _depth_ok(raw, MAX_JSON_DEPTH):
        raise HttpError(400, "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    body = _flat_object(raw)
    if body is not None:
        return body
    try:
        # UTF-8 without a BOM, as clients send it, decoded here (json.loads(bytes) would
        # first guess the encoding); anything else (a BOM, UTF-16/32, not text) as before
        text: str | bytes = raw
        if not raw.startswith(b"\xef\xbb\xbf"):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
        body = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant,
                          parse_float=_finite)
    except _BadJson as exc:
        raise HttpError(400, exc.code, str(exc)) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HttpError(400, "malformed_json", "the request body is not valid JSON") from None
    # A lone surrogate can only come from a \\uD800-\\uDFFF escape (UTF-8 cannot carry one):
    # walk the parsed body only when the raw one has such an escape.
    if _SURROGATE_ESCAPE.search(raw) and not _utf8_ok(body):
        raise HttpError(400, "invalid_unicode", "the request body holds a lone UTF-16 "
                        "surrogate (\\ud800-\\udfff), which is not text")
    return body


def _content_type_ok(request: web.Request) -> bool:
    """JSON bodies only; a request with no Content-Type is read as JSON (older clients)."""
    given = request.headers.get("Content-Type")
    if given is None or given == "application/json":
        return True
    mime = given.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/")
                                          and mime.endswith("+json"))


async def _json(request: web.Request, allowed: tuple[str, ...]) -> dict:
    if not _content_type_ok(request):
        raise HttpError(415, "unsupported_media_type", "the request body must be "
                        "application/json")
    limits = request.app["limits"]
    try:
        if request.content.is_eof():
            # The body came whole with the header: taken as it lies in the buffer, no timer
            # and no await (read() costs a few µs more a request, measured).
            raw = request.content.read_nowait()
            if len(raw) > limits["max_body_bytes"]:
                raise web.HTTPRequestEntityTooLarge(limits["max_body_bytes"], len(raw))
        else:
            async with asyncio.timeout(limits["body_timeout_seconds"]):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "body_too_large",
                        f"request body over {limits['max_body_bytes']} bytes") from None
    except asyncio.TimeoutError:
        raise HttpError(408, "body_timeout", "the request body did not arrive within "
                        f"{limits['body_timeout_seconds']:g} s") from None
    body = parse_json(raw) if raw else {}
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            unknown = sorted(set(body) - set(allowed))
            raise HttpError(400, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    return body


def _peer(request: web.Request) -> tuple[tuple, str]:
    """The verified peer's typed names and its client key (policy identity or UNNAMED), read
    once per TLS connection by the guard (its certificate cannot change: renegotiation is off,
    see worker.tls_context). Without the guard (an app run on another protocol) read here."""
    proto = request.protocol
    client = getattr(proto, "client", None)
    if client is not None:
        return getattr(proto, "peer_names"), client
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    names = authz.identities(ssl_object.getpeercert() if ssl_object is not None else None)
    named = request.app["svc"].policy.client(names)
    return names, named.identity if named is not None else UNNAMED


# --------------------------------------------------------------------------- the service
class Service:
    """State shared by the handlers of one worker: node, policy, audit, metrics, pool."""

    def __init__(self, kms, settings, *, worker: int, metrics, audit=None, notifier=None):
        self.kms, self.settings, self.worker = kms, settings, worker
        self.policy = authz.Policy(settings.clients)
        self.admission = Admission(settings.limits)
        self.metrics, self.audit, self.notifier = metrics, audit, notifier
        self.pool = ThreadPoolExecutor(settings.limit("executor_threads"),
                                       thread_name_prefix="kms-node")
        self.inflight = 0
        # the header and request time limits, swept (kms.server.deadlines)
        self.deadlines = Deadlines(settings.limit("header_timeout_seconds"),
                                   settings.limit("request_timeout_seconds"))
        # read when scraped: an inc() and a dec() per request took a lock each (measured)
        metrics.inflight.set_function(lambda: self.inflight)
        self.ready = True  # false once draining

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def dek_call(self, hit, fn, *args):
        """A DEK from the node: its hit-only lookup ``hit(*args)`` on the event loop itself (no
        HSM, no store: the hop to the pool and back costs more than the work, about a third of
        the worker's CPU per request, measured), else ``fn(*args)`` on the pool."""
        found = hit(*args)
        if found is not None:
            self.metrics.inline.inc()
            return found
        return await self.call(fn, *args)

    def authorise(self, request, role: str, org=None, key_type=None) -> str | None:
        names, _client = _peer(request)
        decision = self.policy.decide(names, role, org, key_type)
        request["client"] = decision.identity
        if not decision.allowed:
            self.metrics.refused.labels(role).inc()
            self.refusal(request, org=org, key_type=key_type, detail=f"role {role}")
            raise HttpError(403, "forbidden", decision.reason)
        return decision.identity

    def refusal(self, request, *, org=None, key_type=None, status=403, result="forbidden",
                detail=None) -> None:
        """Audit a refusal, at most ``audited_refusals_per_second`` per client: beyond it the
        refusal is only counted, and ``flush_refusals`` records the counts."""
        _names, client = _peer(request)
        if not self.admission.record_refusal(client):
            self.metrics.refusals_unrecorded.inc()
            return
        self.record(request, "authz", org=org if org is None else org[:64],
                    key_type=key_type, result=result, status=status, detail=detail)

    def refuse_unnamed(self, names, request_id: str) -> None:
        """The guard refused a certificate the policy does not name (before any request)."""
        self.metrics.refused.labels("none").inc()
        if not self.admission.record_refusal(UNNAMED):
            self.metrics.refusals_unrecorded.inc()
            return
        if self.audit is not None:
            self.audit.append(client=authz.shown(names), op="authz", result="forbidden",
                              status=403, request_id=request_id, worker=self.worker,
                              detail="not named by the policy")

    def flush_refusals(self) -> None:
        """One aggregate record per client whose refusals were only counted (called on a
        timer), so the audit log accounts for every refusal at a bounded rate."""
        pending, self.admission.unrecorded = dict(self.admission.unrecorded), \
            type(self.admission.unrecorded)(int)
        if self.audit is None:
            return
        for client, count in pending.items():
            self.audit.append(client=client, op="authz.aggregate", result="forbidden",
                              status=403, worker=self.worker,
                              detail=f"{count} refusals counted, not recorded one by one")

    def record(self, request, op: str, *, org=None, key_type=None, version=None,
               result="ok", status=200, detail=None) -> None:
        if self.audit is not None:
            self.audit.append(client=request.get("client"), op=op, org=org, key_type=key_type,
                              version=version, result=result, status=status,
                              request_id=request["request_id"], worker=self.worker,
                              detail=detail)

    def audit_ready(self) -> None:
        """Refuse at once (503 audit_unavailable) when the audit log cannot be written: no key
        material and no admin change without its record."""
        if self.audit is not None and not self.audit.available:
            try:
                self.audit.refuse()
            except AuditUnavailable:
                raise _audit_down() from None

    async def commit(self, request, op: str, *, org=None, key_type=None, version=None,
                     result="ok", status=200) -> None:
        """Record durably (fsynced under a signed checkpoint) before the answer is sent."""
        if self.audit is None:
            return
        try:
            await self.audit.commit(client=request.get("client"), op=op, org=org,
                                    key_type=key_type, version=version, result=result,
                                    status=status, request_id=request["request_id"],
                                    worker=self.worker)
        except AuditUnavailable:
            raise _audit_down() from None


def _ok(data: dict, status: int = 200) -> web.Response:
    # orjson: a third of json_response's cost for a DEK answer (measured); UTF-8, no spaces.
    # Anything it refuses (an integer over 64 bits in an exported document) goes through json.
    try:
        body = orjson.dumps(data)
    except TypeError:
        body = json.dumps(data).encode()
    return web.Response(body=body, status=status, content_type="application/json",
                        charset="utf-8")


def _error_response(err: HttpError, request_id: str) -> web.Response:
    return web.json_response({"error": err.code, "message": err.message,
                              "request_id": request_id}, status=err.status,
                             headers={**err.headers, "X-Request-Id": request_id})


# --------------------------------------------------------------------------- middleware
def _failure(exc: Exception, rid: str, route: str) -> web.Response:
    err = classify(exc)
    if err.status >= 500 and not isinstance(exc, HttpError):
        # Once, with the request id and (for a bug) the traceback; never to the client.
        log.error("request %s %s failed: %s", rid, route, type(exc).__name__,
                  exc_info=err.code == "internal")
    return _error_response(err, rid)


@web.middleware
async def _frame(request: web.Request, handler):
    """Request id, slow-client guard, load shedding, timeout, error JSON, metrics."""
    svc: Service = request.app["svc"]
    given = request.headers.get("X-Request-Id", "")
    # 16 random hex digits, as uuid4().hex[:16] gave, at a fifth of its cost
    request["request_id"] = rid = given if _REQUEST_ID.match(given) else os.urandom(8).hex()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource \
        else "unmatched"
    guard = request.protocol
    if hasattr(guard, "request_started"):
        guard.request_started()
    t0 = time.perf_counter()
    limited = route.startswith("/v1/")
    admitted: str | None = None
    try:
        _names, client = _peer(request)
        role = ROLES.get(route)
        if role is not None or client == UNNAMED:
            # Identity and role, before a slot is taken or a body byte read (the org and key
            # type are checked once the body is parsed). UNNAMED only without the guard,
            # which answers those itself.
            svc.authorise(request, role or "status")
        if limited:
            refused = svc.admission.begin(client)
            if refused is not None:
                svc.metrics.client_limited.labels(refused.code).inc()
                request["client"] = client
                svc.refusal(request, status=refused.status, result=refused.code,
                            detail=refused.message)
                raise HttpError(refused.status, refused.code, refused.message,
                                {"Retry-After": refused.retry_after or "1"})
            admitted = client
        if limited and svc.inflight >= svc.settings.limit("max_concurrent"):
            svc.metrics.shed.inc()
            raise HttpError(503, "overloaded", "this worker is at its concurrent-request limit",
                            {"Retry-After": "1"})
        if limited:
            svc.inflight += 1
        # The request timeout: a deadline the worker's sweep enforces (kms.server.deadlines),
        # not a timer per request (asyncio.timeout cost 11-21 µs of a request, measured).
        task = asyncio.current_task()
        assert task is not None
        svc.deadlines.begin(task, svc.settings.limit("request_timeout_seconds"))
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            if svc.deadlines.end(task):      # past its limit, not the server shutting down
                task.uncancel()
                raise asyncio.TimeoutError from None
            raise
        finally:
            svc.deadlines.end(task)
            if limited:
                svc.inflight -= 1
        resp.headers["X-Request-Id"] = rid
    except web.HTTPException as exc:   # routing: 404 / 405 / 413 from aiohttp itself
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        resp = _error_response(HttpError(exc.status, code, exc.reason, allow), rid)
    except asyncio.TimeoutError:
        resp = _error_response(HttpError(408, "timeout", "request took too long"), rid)
    except (ConnectionError, ClientConnectionError) as exc:
        if request.transport is not None and not request.transport.is_closing():
            resp = _failure(exc, rid, route)   # not the client's connection: the node's
        else:
            # The client went away mid-request (its body never came whole): nothing to
            # answer, nothing to log as a failure of the node.
            resp = _error_response(HttpError(400, "connection_lost", "the client closed the "
                                             "connection"), rid)
            resp.force_close()
    except Exception as exc:
        resp = _failure(exc, rid, route)
    finally:
        if admitted is not None:
            svc.admission.end(admitted)
        if hasattr(guard, "request_finished"):
            guard.request_finished()
    if not request.content.is_eof():
        resp.force_close()   # answered before its body was read whole: do not read the rest
    svc.metrics.observe(route, request.method, resp.status, time.perf_counter() - t0)
    return resp


# --------------------------------------------------------------------------- probes, docs
async def healthz(request):
    return _ok({"status": "ok", "worker": request.app["svc"].worker})


async def readyz(request):
    svc: Service = request.app["svc"]
    checks = await svc.call(_readiness, svc)
    ok = svc.ready and all(checks.values())
    return _ok({"ready": ok, "worker": svc.worker, "checks": checks}, 200 if ok else 503)


def _readiness(svc: Service) -> dict:
    kms = svc.kms
    checks = {"draining": not svc.ready}
    try:
        checks["token_logged_in"] = bool(kms.token._logged_in())
    except Exception:
        checks["token_logged_in"] = False
    try:
        kms.store.schema_version()
        checks["store_reachable"] = True
    except Exception:
        checks["store_reachable"] = False
    try:
        checks["releases_held"] = bool(kms.releases)
    except Exception:
        checks["releases_held"] = False
    if svc.notifier is not None:
        checks["invalidation_listening"] = svc.notifier.listening
    checks.pop("draining")
    return checks


async def openapi(request):
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def metrics(request):
    svc: Service = request.app["svc"]
    svc.authorise(request, "status")
    return web.Response(body=svc.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def status(request):
    svc: Service = request.app["svc"]
    svc.authorise(request, "status")
    data = await svc.call(svc.kms.status)
    data["worker"] = svc.worker
    return _ok(data)


# --------------------------------------------------------------------------- data plane
async def dek(request):
    svc: Service = request.app["svc"]
    body = await _json(request, ("org", "key_type", "purpose", "version", "fragment"))
    org = _org(_field(body, "org", str))
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    purpose = _field(body, "purpose", str, choices=("encrypt", "decrypt"))
    fragment = _field(body, "fragment", str, default=None)
    if fragment is not None and not 1 <= len(fragment) <= 255:
        raise HttpError(400, "bad_request", "fragment must be 1-255 characters")
    svc.authorise(request, "data", org, key_type)
    svc.audit_ready()
    op = f"dek.{purpose}"
    version = None
    try:
        if purpose == "encrypt":
            if "version" in body:
                raise HttpError(400, "bad_request", "version is only for purpose decrypt")
            version, derivation, key = await svc.dek_call(
                svc.kms.cached_dek_for_encrypt, svc.kms.dek_for_encrypt, org, key_type, fragment)
            out = {"org": org, "key_type": key_type, "version": version,
                   "derivation": derivation}
        else:
            version = _version(_field(body, "version", int))
            key = await svc.dek_call(svc.kms.cached_dek_for_decrypt, svc.kms.dek_for_decrypt,
                                     org, key_type, version, fragment)
            out = {"org": org, "key_type": key_type, "version": version}
    except Exception as exc:
        err = classify(exc)
        # An error answer carries no key material: recorded in the next batch, not waited for.
        svc.record(request, op, org=org, key_type=key_type, version=version, result=err.code,
                   status=err.status)
        raise err from None
    await svc.commit(request, op, org=org, key_type=key_type, version=version)
    out["dek"] = base64.b64encode(key).decode()
    return _ok(out)


# --------------------------------------------------------------------------- admin
async def _admin(request, op: str, org: str, key_type, fn, *args, status: int = 200,
                 version=None):
    """Authorise, run ``fn`` on the pool, audit the outcome either way (the node announces
    its changes to the other nodes itself: Kms.announce)."""
    svc: Service = request.app["svc"]
    svc.authorise(request, "admin", org, key_type)
    svc.audit_ready()
    try:
        result = await svc.call(fn, *args)
    except Exception as exc:
        err = classify(exc)
        svc.record(request, op, org=org, key_type=key_type, version=version, result=err.code,
                   status=err.status)
        raise err from None
    row_version = getattr(result, "version", version)
    await svc.commit(request, op, org=org, key_type=key_type, version=row_version,
                     status=status)
    return result


async def tenant_create(request):
    svc: Service = request.app["svc"]
    body = await _json(request, ("org", "org_type", "key_type", "secret"))
    org = _org(_field(body, "org", str))
    org_type = _field(body, "org_type", str, default="production", choices=policy.ORG_TYPES)
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    secret = _field(body, "secret", bool, default=True)

    def create():
        svc.kms.create_tenant(org, org_type)
        return svc.kms.generate_secret(org, key_type) if secret else None
    row = await _admin(request, "tenant.create", org, key_type, create, status=201)
    out = {"org": org, "org_type": org_type}
    if row is not None:
        out.update(key_type=row.key_type, version=row.version, state=row.state)
    return _ok(out, 201)


async def tenant_rotate(request):
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])
    body = await _json(request, ("key_type", "source"))
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    # "ekm": a new version from the org's AWS KMS root key (GenerateDataKeyWithoutPlaintext).
    source = _field(body, "source", str, default="hsm", choices=("hsm", "ekm"))
    if source == "ekm":
        from kms.customer_keys import ekm
        rotate = lambda: ekm.rotate(svc.kms, org, key_type)  # noqa: E731
    else:
        rotate = lambda: svc.kms.rotate(org, key_type)  # noqa: E731
    row = await _admin(request, "tenant.rotate", org, key_type, rotate)
    return _ok({"org": org, "key_type": key_type, "version": row.version, "state": row.state})


async def tenant_upload(request):
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])
    body = await _json(request, ("key_type", "material", "derivation"))
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    derivation = _field(body, "derivation", str, default="PBKDF2", choices=policy.DERIVATIONS)
    material = _b64_field(body, "material", length=32)
    row = await _admin(request, "tenant.upload", org, key_type,
                       lambda: svc.kms.upload_secret(org, key_type, material,
                                                     derivation=derivation), status=201)
    return _ok({"org": org, "key_type": key_type, "version": row.version, "state": row.state},
               201)


async def tenant_byok_upload(request):
    """BYOK as the customer sends it: the secret RSA-OAEP-wrapped to the org's BYOK certificate
    and the SHA-256 of the plaintext, both base64 (the two files `kms byok wrap` writes)."""
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])
    body = await _json(request, ("key_type", "secret", "hash", "derivation", "oaep"))
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    derivation = _field(body, "derivation", str, default="PBKDF2", choices=policy.DERIVATIONS)
    oaep = _field(body, "oaep", str, default="sha1", choices=("sha1", "sha256", "sha512"))
    ciphertext = _b64_field(body, "secret")
    digest = _b64_field(body, "hash", length=32)   # a SHA-256
    from kms.customer_keys import byok
    row = await _admin(request, "tenant.byok_upload", org, key_type,
                       lambda: byok.upload_wrapped(svc.kms, org, key_type, ciphertext, digest,
                                                   derivation=derivation, oaep=oaep),
                       status=201)
    return _ok({"org": org, "key_type": key_type, "version": row.version, "state": row.state,
                "derivation": row.derivation}, 201)


async def tenant_destroy(request):
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])
    body = await _json(request, ("key_type", "version"))
    key_type = _field(body, "key_type", str, default="field", choices=policy.KEY_TYPES)
    version = _version(_field(body, "version", int))
    row = await _admin(request, "tenant.destroy", org, key_type, svc.kms.destroy, org,
                       key_type, version, version=version)
    return _ok({"org": org, "key_type": key_type, "version": row.version, "state": row.state})


async def tenant_list(request):
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])
    rows = await _admin(request, "tenant.list", org, None, svc.kms.secrets, org)
    return _ok({"org": org, "secrets": [
        {"key_type": r.key_type, "version": r.version, "state": r.state, "source": r.source,
         "derivation": r.derivation, "release": r.release, "created_at": r.created_at,
         "usable_from": r.usable_from, "destroyed_at": r.destroyed_at} for r in rows]})


async def tenant_export(request):
    """The tenant's backup (rows still wrapped, the whole encrypted in the HSM), as JSON."""
    svc: Service = request.app["svc"]
    org = _org(request.match_info["org"])

    def export():
        with tempfile.TemporaryDirectory(prefix="kms-export-") as tmp:
            path = svc.kms.export_backup(org, Path(tmp) / "backup.json")
            return json.loads(path.read_text())
    doc = await _admin(request, "tenant.export", org, None, export)
    return _ok(doc)


# The role each route needs; the probes and this API's description need a named client only.
ROLES = {"/metrics": "status", "/v1/status": "status", "/v1/dek": "data",
         "/v1/tenants": "admin", "/v1/tenants/{org}": "admin",
         "/v1/tenants/{org}/rotate": "admin", "/v1/tenants/{org}/upload": "admin",
         "/v1/tenants/{org}/byok-upload": "admin", "/v1/tenants/{org}/destroy": "admin",
         "/v1/tenants/{org}/export": "admin"}

# Every route, once: the app is built from this table and a test compares it with openapi.json.
ROUTES = (
    ("GET", "/healthz", healthz), ("GET", "/readyz", readyz), ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi), ("GET", "/v1/status", status),
    ("POST", "/v1/dek", dek), ("POST", "/v1/tenants", tenant_create),
    ("GET", "/v1/tenants/{org}", tenant_list),
    ("POST", "/v1/tenants/{org}/rotate", tenant_rotate),
    ("POST", "/v1/tenants/{org}/upload", tenant_upload),
    ("POST", "/v1/tenants/{org}/byok-upload", tenant_byok_upload),
    ("POST", "/v1/tenants/{org}/destroy", tenant_destroy),
    ("GET", "/v1/tenants/{org}/export", tenant_export),
)


def build(svc: Service) -> web.Application:
    app = web.Application(middlewares=[_frame],
                          client_max_size=svc.settings.limit("max_body_bytes"))
    app["svc"] = svc
    app["limits"] = svc.settings.limits
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
