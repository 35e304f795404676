"""Cache-only keys: the customer hosts the DEK; the KMS fetches it on demand, opens it inside the
HSM, and keeps it only in the encrypted key cache.

Fetch: ``GET <url>/<kid>?requestId=<nonce>`` over HTTPS (client certificate and/or basic auth
when registered), a fresh 32-hex-character nonce each time, answer ``{"kid", "jwe"}``; the JWE
(compact, RSA-OAEP + A256GCM, ``jti`` = the nonce) is parsed and its header validated with
jwcrypto, and decrypted by the token with the org's BYOK seed key (``hsm.keys.byok.decrypt_jwe``).

Every fetch runs under ``kms.customer_keys.outbound``: one total deadline (``FETCH_TIMEOUT_S``, 3
s: connect,
TLS, headers and body together), no redirect followed (a 3xx is ``REDIRECT``; the registered
credential goes only to the registered URL), at most ``[service] outbound_per_org`` fetches per
org at once per worker (one more is ``BUSY`` at once, and does not count as a failure).

Failure policy: a failed fetch makes the key unavailable; operations under it fail with "key
unavailable" and do not call the key service again until the next retry time: once a minute for
the first 5 minutes, then every 5 minutes until 24 h after the first failure, then not at all
(re-register the key). A success makes it active again. The cache's 72 h flush applies as to
every DEK. Nothing about the DEK is written anywhere; errors carry only the event code.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from hsm.keys import byok as hbyok

from kms.customer_keys import outbound
from kms.errors import KeyUnavailable, KmsError

KIND = "cache-only"
FETCH_TIMEOUT_S = 3.0
FAST_RETRY_S, FAST_PERIOD_S = 60.0, 300.0
SLOW_RETRY_S, GIVE_UP_AFTER_S = 300.0, 24 * 3600.0
_KID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ALLOWED_HEADER = {"alg", "enc", "kid", "jti", "typ", "cty"}
MAX_BODY = 64 * 1024


def check_kid(kid: str) -> str:
    if not _KID.match(kid or ""):
        raise KmsError(f"kid must be 1-128 characters of [A-Za-z0-9._-], not {kid!r}")
    return kid


def register(kms, org_id: str, key_type: str, url: str, kid: str, *,
             client_cert: str | None = None, client_key: str | None = None,
             ca: str | None = None, basic_auth_env: str | None = None):
    """A new version of the org's ``key_type`` key served by the customer's key service (the
    previous one archived, rate limit included, exactly as a rotation)."""
    check_kid(kid)
    parsed = urllib.parse.urlsplit(url)
    if parsed.username is not None or parsed.password is not None:
        # Never echoed: the URL holds a password. It would be stored in the row and shown by
        # every status; credentials go in --basic-auth-env instead.
        raise KmsError("the key service URL carries a user or password (user:password@); "
                       "refused, and not stored", hint="give the URL without them and the "
                       "credentials in an environment variable named by --basic-auth-env")
    if parsed.scheme != "https" or not parsed.netloc or parsed.query or parsed.fragment:
        raise KmsError(f"the key service URL must be https://host[:port][/path], not {url!r}")
    try:
        parsed.port
    except ValueError:
        raise KmsError(f"the key service URL {url!r} has a port outside 1-65535") from None
    if (client_cert is None) != (client_key is None):
        raise KmsError("--client-cert and --client-key go together")
    for option, path in (("--client-cert", client_cert), ("--client-key", client_key),
                         ("--ca", ca)):
        if path is not None and not Path(path).is_file():
            raise KmsError(f"{option} {path} is not a file", hint="fix the path; nothing was "
                                                                  "registered")
    if basic_auth_env is not None and not re.match(r"^[A-Z_][A-Z0-9_]*$", basic_auth_env):
        raise KmsError("--basic-auth-env names an environment variable (USER:PASSWORD in it)")
    spec = kms.customer_key(org_id, "byok") or {}
    if "seed" not in spec:
        raise KmsError(f"org {org_id} has no BYOK seed certificate for the key service to "
                       "wrap to", hint=f"`kms byok certificate --org {org_id}` and give the "
                       "certificate to the key service")
    from kms.customer_keys.ekm import read_ca
    # The CA's bytes go into the descriptor, which the HSM authenticates: not its path.
    descriptor = {"kind": KIND, "url": url.rstrip("/"), "kid": kid,
                  "byok_spki_sha256": spec["seed"]["spki_sha256"], "client_cert": client_cert,
                  "client_key": client_key, "ca": ca,
                  "ca_pem": read_ca(ca) if ca else None, "basic_auth_env": basic_auth_env}
    return kms.add_remote(org_id, key_type, lambda version: descriptor)


# ----------------------------------------------------------------------------- availability
@dataclass
class _Outage:
    since: float
    next_retry: float | None
    code: str


class Availability:
    """Per key version: when it failed first, when to try again (the failure policy)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._down: dict[tuple, _Outage] = {}

    @staticmethod
    def next_retry(since: float, now: float) -> float | None:
        elapsed = now - since
        if elapsed >= GIVE_UP_AFTER_S:
            return None
        return now + (FAST_RETRY_S if elapsed < FAST_PERIOD_S else SLOW_RETRY_S)

    def check(self, key: tuple, now: float) -> None:
        """Raise KeyUnavailable while ``key`` is down and no retry is due."""
        with self._lock:
            outage = self._down.get(key)
        if outage is None:
            return
        if outage.next_retry is None:
            raise KeyUnavailable(f"key unavailable: {key[0]} {key[1]} v{key[2]}: the key service "
                                 f"has failed for 24 h ({outage.code}); retries stopped",
                                 code=outage.code, hint="re-register the key "
                                 "(`kms cache-only add`) once the service is back")
        if now < outage.next_retry:
            raise KeyUnavailable(f"key unavailable: {key[0]} {key[1]} v{key[2]} ({outage.code});"
                                 f" next retry in {outage.next_retry - now:.0f} s",
                                 code=outage.code)

    def failed(self, key: tuple, now: float, code: str) -> None:
        with self._lock:
            since = self._down[key].since if key in self._down else now
            self._down[key] = _Outage(since, self.next_retry(since, now), code)

    def succeeded(self, key: tuple) -> None:
        with self._lock:
            self._down.pop(key, None)

    def down(self) -> dict[tuple, _Outage]:
        with self._lock:
            return dict(self._down)


def _availability(kms) -> Availability:
    av = getattr(kms, "_cache_only_availability", None)
    if av is None:
        av = kms._cache_only_availability = Availability()
    return av


# ----------------------------------------------------------------------------- fetch
def _refuse(code: str, what: str) -> KeyUnavailable:
    return KeyUnavailable(f"key unavailable: {what} ({code})", code=code)


def _ssl_context(d: dict) -> ssl.SSLContext:
    # The sealed CA bytes; a descriptor from before sealing that kept only the path was
    # upgraded at the KMS's start (kms.node.node: _upgrade_blob).
    ctx = ssl.create_default_context(cadata=d["ca_pem"]) if d.get("ca_pem") else \
        ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if d.get("client_cert"):
        ctx.load_cert_chain(d["client_cert"], d["client_key"])
    return ctx


def fetch(descriptor: dict, nonce: str, *, timeout: float = FETCH_TIMEOUT_S) -> dict:
    """One GET under one total deadline of ``timeout`` seconds; the parsed JSON answer, or
    KeyUnavailable with the event code."""
    url = f"{descriptor['url']}/{urllib.parse.quote(descriptor['kid'])}?requestId={nonce}"
    if not url.startswith("https://"):
        raise _refuse("UNREACHABLE", "the key service URL is not https")
    headers = {"Accept": "application/json"}
    if descriptor.get("basic_auth_env"):
        cred = os.environ.get(descriptor["basic_auth_env"])
        if not cred or ":" not in cred:
            raise _refuse("AUTHENTICATION_FAILURE", f"${descriptor['basic_auth_env']} is not "
                          "set to USER:PASSWORD")
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    try:
        ctx = _ssl_context(descriptor)
        answer = outbound.request("GET", url, headers=headers, context=ctx, deadline_s=timeout,
                                  max_body=MAX_BODY)
    except (OSError, ssl.SSLError) as exc:      # the client certificate or CA file
        raise _refuse("UNREACHABLE", f"the key service is unreachable "
                      f"({type(exc).__name__})") from None
    except outbound.OutboundFailure as exc:
        raise _refuse("UNREACHABLE", f"the key service is unreachable ({exc.reason}, "
                      f"{timeout:g} s deadline)") from None
    status, body = answer.status, answer.body
    if 300 <= status < 400:
        raise _refuse("REDIRECT", f"the key service answered HTTP {status} (a redirect, not "
                      "followed: register the URL that serves the key)")
    if status in (401, 403):
        raise _refuse("AUTHENTICATION_FAILURE_RESPONSE", f"the key service answered HTTP {status}")
    if status in (404, 410):
        raise _refuse("DESTROY_HTTP_CODE", f"the key service answered HTTP {status}")
    if status != 200:
        raise _refuse("ERROR_HTTP_CODE", f"the key service answered HTTP {status}")
    if not body.strip():
        raise _refuse("EMPTY_RESPONSE", "the key service answered an empty body")
    if len(body) > MAX_BODY:
        raise _refuse("ILLEGAL_RESPONSE", "the key service's answer is too large")
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise _refuse("ILLEGAL_RESPONSE", "the key service's answer is not a JSON object") \
            from None
    return doc


def parse_jwe(doc: dict, kid: str, nonce: str) -> dict:
    """Validate the answer's structure and header with jwcrypto; the raw JWE parts."""
    from jwcrypto import jwe as jwcrypto_jwe
    from jwcrypto.common import JWException
    if doc.get("kid") != kid:
        raise _refuse("KID_MISMATCH", "the answer's kid is not the requested one")
    compact = doc.get("jwe")
    if not isinstance(compact, str) or not compact:
        raise _refuse("EMPTY_RESPONSE", "the answer has no jwe")
    token = jwcrypto_jwe.JWE()
    try:
        token.deserialize(compact)
    except (JWException, ValueError, TypeError):
        raise _refuse("ILLEGAL_JWE", "the jwe is not a compact JWE") from None
    if compact.count(".") != 4 or "unprotected" in token.objects or "header" in token.objects:
        raise _refuse("ILLEGAL_JWE", "the jwe is not a compact JWE with one recipient")
    try:
        header = json.loads(token.objects["protected"])
    except (KeyError, ValueError):
        raise _refuse("ILLEGAL_JWE", "the JWE has no protected header") from None
    if header.get("alg") != "RSA-OAEP" or header.get("enc") != "A256GCM":
        raise _refuse("INCORRECT_ALGORITHM_IN_JWE_HEADER",
                      "the JWE is not alg RSA-OAEP with enc A256GCM")
    if header.get("kid") != kid:
        raise _refuse("KID_MISMATCH", "the JWE header's kid is not the requested one")
    if "jti" not in header:
        raise _refuse("MISSING_JTI", "the JWE header has no jti (replay detection)")
    if header["jti"] != nonce:
        raise _refuse("JTI_MISMATCH", "the JWE header's jti is not this request's nonce "
                      "(a replayed answer?)")
    extra = set(header) - _ALLOWED_HEADER
    if "crit" in header or extra:
        raise _refuse("ILLEGAL_PARAMETERS_IN_JWE_HEADER",
                      f"the JWE header has parameters this KMS does not accept: {sorted(extra)}")
    return jwe_parts(compact, token.objects)


def jwe_parts(compact: str, parts: dict) -> dict:
    """The parts the token opens, from a compact JWE jwcrypto deserialised into ``parts``."""
    if len(parts.get("iv", b"")) != 12 or len(parts.get("tag", b"")) != 16:
        raise _refuse("ILLEGAL_JWE", "the JWE's IV is not 96 bits or its tag not 128 bits")
    # AAD = ASCII(BASE64URL(protected header)) exactly as sent (RFC 7516 5.2 step 14).
    return {"encrypted_key": parts["encrypted_key"], "iv": parts["iv"],
            "ciphertext": parts["ciphertext"], "tag": parts["tag"],
            "aad": compact.split(".", 1)[0].encode("ascii")}


def dek(kms, row, descriptor: dict) -> bytes:
    """The DEK of a cache-only row on a cache miss, under the failure policy."""
    av = _availability(kms)
    key = (row.org_id, row.key_type, row.version)
    now = kms.clock()
    av.check(key, now)
    nonce = os.urandom(16).hex()
    try:
        held = outbound.gate(kms)(row.org_id)
    except outbound.Busy:
        raise KeyUnavailable(f"key unavailable: {row.org_id} {row.key_type} v{row.version}: "
                             "this org's key service calls are at their limit; retry (BUSY)",
                             code="BUSY") from None
    try:
        with held:
            doc = fetch(descriptor, nonce, timeout=FETCH_TIMEOUT_S)
        parts = parse_jwe(doc, descriptor["kid"], nonce)
        try:
            plain = hbyok.decrypt_jwe(kms.token, row.org_id, **parts)
        except hbyok.ByokRefused as exc:
            text = str(exc)
            code = ("TAG_MISMATCH" if "tag does not verify" in text else
                    "INCORRECT_ALGORITHM_IN_JWE_HEADER" if "not 256 bits" in text or
                    "not AES-256-GCM" in text else "ILLEGAL_JWE")
            raise _refuse(code, f"the JWE does not open with org {row.org_id}'s BYOK key") \
                from None
        if len(plain) != 32:
            raise _refuse("INCORRECT_DATA_ENCRYPTION_KEY_SIZE",
                          f"the JWE payload is {len(plain)} bytes, not a 32-byte DEK")
    except KeyUnavailable as exc:
        av.failed(key, now, exc.code or "ERROR")
        raise
    av.succeeded(key)
    return plain


def retry_due(kms) -> dict[tuple, bool]:
    """Retry every unavailable key whose retry time has come (the node calls this from a timer,
    once a minute); returns {key: now available}."""
    out = {}
    now = kms.clock()
    for key, outage in _availability(kms).down().items():
        if outage.next_retry is None or now < outage.next_retry:
            continue
        try:
            kms.cache.invalidate(key[0], key[1], key[2])
            kms.dek_for_decrypt(key[0], key[1], key[2])
            out[key] = True
        except KmsError:
            out[key] = False
    return out
