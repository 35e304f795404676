"""SigV4 verification of a request *as received* (the specification's Appendix A).

A verifier cannot re-sign the request with botocore: its signer stamps the current time and
picks its own header set. So the canonical request is rebuilt from what arrived: the method, the
raw path, the empty query, exactly the headers the client listed in ``SignedHeaders`` (each value
trimmed, inner whitespace collapsed, repeated headers joined with ``,``), and the SHA-256 of the
received body; then the string to sign with the request's own ``X-Amz-Date`` and credential
scope, the signing key derived from the secret of the access key id it names, and a
constant-time comparison. The AWS documentation "Create a canonical request for IAM" is the
reference; the one helper taken from botocore is ``normalize_url_path`` (dot segments), so the
canonical URI is the one AWS SDKs sign. The tests sign with botocore and curl.

The checks that need no body run first (:func:`authenticate_headers`): the header parses, the
service is ``kms-xks-proxy``, the region is the key store's, the access key id is one of its
credentials, ``host`` and ``x-amz-date`` are signed and the date is within five minutes of ours
(replay window). Only then is the body read and the signature computed (:func:`verify`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import quote

from botocore.utils import normalize_url_path

from hsm.core.pin import Pin

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms-xks-proxy"
MAX_SKEW_SECONDS = 300
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/"
    r"(?P<service>[^/,\s]+)/(?P<term>[^/,\s]+),\s*SignedHeaders=(?P<headers>[a-z0-9;_-]+),"
    r"\s*Signature=(?P<signature>[0-9a-f]{64})$")


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret: Pin | None    # never printed, never pickled; None: not read (config checks only)


class AuthFailure(Exception):
    """Why a signature was not accepted (logged and audited; the client gets only the name)."""


@dataclass(frozen=True)
class SignedRequest:
    """What the Authorization header claims, once its credential and date were accepted."""
    credential: Credential
    amz_date: str
    scope: str
    signed_headers: tuple[str, ...]
    signature: str


def authenticate_headers(headers, credentials: dict[str, Credential], region: str,
                         now: float) -> SignedRequest:
    """Everything that can be checked before the body is read; raises :class:`AuthFailure`."""
    values = headers.getall("Authorization", [])
    if len(values) != 1:
        raise AuthFailure("no Authorization header" if not values else
                          "more than one Authorization header")
    m = _AUTH.match(values[0].strip())
    if not m:
        raise AuthFailure("the Authorization header is not AWS4-HMAC-SHA256 "
                          "Credential=.../SignedHeaders=.../Signature=...")
    if m["service"] != SERVICE:
        raise AuthFailure(f"credential scope names service {m['service']!r}, not {SERVICE}")
    if m["term"] != "aws4_request":
        raise AuthFailure("credential scope does not end in aws4_request")
    if m["region"] != region:
        raise AuthFailure(f"credential scope names region {m['region']!r}, this key store "
                          f"expects {region!r}")
    credential = credentials.get(m["akid"])
    if credential is None or credential.secret is None:
        raise AuthFailure(f"unknown access key id {m['akid'][:32]!r}")
    signed = tuple(m["headers"].split(";"))
    if "host" not in signed or "x-amz-date" not in signed:
        raise AuthFailure("SignedHeaders must include host and x-amz-date")
    if list(signed) != sorted(set(signed)):
        raise AuthFailure("SignedHeaders must be sorted and unique")
    dates = headers.getall("X-Amz-Date", [])
    if len(dates) != 1:
        raise AuthFailure("exactly one X-Amz-Date header is required")
    amz_date = dates[0].strip()
    try:
        stamp = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise AuthFailure("X-Amz-Date is not YYYYMMDD'T'HHMMSS'Z'") from None
    if abs(stamp.timestamp() - now) > MAX_SKEW_SECONDS:
        raise AuthFailure(f"X-Amz-Date {amz_date} is more than {MAX_SKEW_SECONDS} s from the "
                          "proxy's clock")
    if amz_date[:8] != m["date"]:
        raise AuthFailure("the credential scope's date is not X-Amz-Date's day")
    scope = f"{m['date']}/{m['region']}/{m['service']}/aws4_request"
    return SignedRequest(credential, amz_date, scope, signed, m["signature"])


def canonical_request(method: str, raw_path: str, headers, signed_headers: tuple[str, ...],
                      body: bytes) -> str:
    # The canonical URI as AWS SDKs make it for every service but S3: dot segments removed and
    # the path URI-encoded once more (botocore's normalize_url_path, then quote(safe="/~")).
    # XKS paths are A-Z a-z 0-9 / - _ . so this changes only paths that are refused anyway.
    # XKS has no query parameters: the query is "".
    lines = [method, quote(normalize_url_path(raw_path), safe="/~"), ""]
    for name in signed_headers:
        values = headers.getall(name, [])
        if not values:
            raise AuthFailure(f"signed header {name!r} is not in the request")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    payload_hash = hashlib.sha256(body).hexdigest()
    claimed = headers.getall("x-amz-content-sha256", [])
    if claimed and claimed != [payload_hash]:
        raise AuthFailure("x-amz-content-sha256 is not the SHA-256 of the body")
    lines += ["", ";".join(signed_headers), payload_hash]
    return "\n".join(lines)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def signature(secret: Pin | None, scope: str, amz_date: str, canonical: str) -> str:
    if secret is None:
        raise AuthFailure("the credential's secret was not loaded")
    date, region, service, term = scope.split("/")
    key = _hmac(("AWS4" + secret.reveal()).encode("utf-8"), date)
    for part in (region, service, term):
        key = _hmac(key, part)
    to_sign = "\n".join((ALGORITHM, amz_date, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()))
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(signed: SignedRequest, method: str, raw_path: str, headers, body: bytes) -> None:
    """Raises :class:`AuthFailure` unless the request's signature is the one its credential
    makes over the request as received (body included)."""
    canonical = canonical_request(method, raw_path, headers, signed.signed_headers, body)
    expected = signature(signed.credential.secret, signed.scope, signed.amz_date, canonical)
    if not hmac.compare_digest(expected, signed.signature):
        raise AuthFailure("signature does not match")
