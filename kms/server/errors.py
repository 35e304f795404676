"""KMS errors -> HTTP status and a JSON body ``{"error": code, "message": ...}``.

The messages are the project's own one-line messages (they never carry a PIN or key material:
``hsm.errors`` builds them from labels and codes). Anything not recognised here is answered 500
``internal`` with no detail; the traceback goes to the worker's log, never to the client.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time

from hsm.byok import ByokRefused
from hsm.errors import HsmError
from kms.errors import (ConfigError, CorruptRecord, KeyDestroyed, KeyUnavailable, KmsError,
                        PolicyViolation, RateLimited, ReleaseNotHeld, UnknownTenant)


class HttpError(Exception):
    """Raised by the request validation and authorisation code: a status and a code."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# The store reports a missing version as a plain KmsError; this text is its only mark (a test
# checks the 404, so a change of wording there shows up).
_NO_VERSION = re.compile(r"has no \w+ secret v\d+")


def _store_unavailable(exc: BaseException) -> bool:
    """A driver-level connection/operational failure anywhere in the exception's chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            return True
        if type(exc).__module__.startswith("psycopg") and type(exc).__name__ in (
                "OperationalError", "InterfaceError", "ConnectionTimeout", "AdminShutdown"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def classify(exc: BaseException, *, now: float | None = None) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    msg = str(exc)
    if isinstance(exc, RateLimited):
        wait = max(1, math.ceil(exc.next_allowed - (now if now is not None else time.time())))
        return HttpError(429, "rate_limited", msg, {"Retry-After": str(wait)})
    if isinstance(exc, UnknownTenant):
        return HttpError(404, "unknown_org", msg)
    if isinstance(exc, KeyDestroyed):
        return HttpError(410, "key_destroyed", msg)
    if isinstance(exc, KeyUnavailable):  # the customer's key service or AWS KMS cannot serve
        return HttpError(503, "key_unavailable", msg, {"Retry-After": "60"})
    if isinstance(exc, ByokRefused):     # the customer's upload, checked inside the HSM
        return HttpError(422, "byok_refused", msg)
    if isinstance(exc, PolicyViolation):
        return HttpError(409, "policy_violation", msg)
    if isinstance(exc, ReleaseNotHeld):
        return HttpError(503, "release_not_held", msg)
    if isinstance(exc, CorruptRecord):
        return HttpError(500, "corrupt_record", msg)
    if isinstance(exc, KmsError) and not isinstance(exc, ConfigError):
        if _store_unavailable(exc) or "the store is closed" in msg:
            return HttpError(503, "store_unavailable", msg, {"Retry-After": "1"})
        if _NO_VERSION.search(msg):
            return HttpError(404, "unknown_version", msg)
        return HttpError(409, "conflict", msg)
    if isinstance(exc, HsmError):
        return HttpError(503, "hsm_unavailable", msg, {"Retry-After": "1"})
    return HttpError(500, "internal", "internal error (see the node's log)")
