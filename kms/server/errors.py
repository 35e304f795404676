"""KMS errors -> HTTP status and a JSON body ``{"error": code, "message": ...}``.

The messages are the project's own one-line messages (they never carry a PIN or key material:
``hsm.core.errors`` builds them from labels and codes). Anything not recognised here is answered 500
``internal`` with no detail; the traceback goes to the worker's log, never to the client.
"""

from __future__ import annotations

import math
import time

from hsm.keys.byok import ByokRefused
from hsm.core.errors import HsmError
from kms.errors import (ArgumentError, ConfigError, Conflict, CorruptRecord, KeyDestroyed, KeyUnavailable,
                        KmsError, PolicyViolation, RateLimited, ReleaseNotHeld, StoreUnavailable,
                        UnknownTenant, UnknownVersion)


class HttpError(Exception):
    """Raised by the request validation and authorisation code: a status and a code."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# Most specific first: the first class the error is an instance of decides. (class, status,
# code, Retry-After seconds or None). Anything not here is a 500 without detail.
_STATUS: tuple[tuple[type[BaseException], int, str, str | None], ...] = (
    (UnknownTenant, 404, "unknown_org", None),
    (UnknownVersion, 404, "unknown_version", None),
    (KeyDestroyed, 410, "key_destroyed", None),
    (KeyUnavailable, 503, "key_unavailable", "60"),  # the customer's key service or AWS KMS
    (ByokRefused, 422, "byok_refused", None),        # the customer's upload, checked in the HSM
    (PolicyViolation, 409, "policy_violation", None),
    (ReleaseNotHeld, 503, "release_not_held", None),
    (CorruptRecord, 500, "corrupt_record", None),
    (StoreUnavailable, 503, "store_unavailable", "1"),
    (ArgumentError, 400, "bad_request", None),
    (Conflict, 409, "conflict", None),
    (ConfigError, 503, "misconfigured", None),
    (KmsError, 409, "conflict", None),               # another refusal (import refused, ...)
    (HsmError, 503, "hsm_unavailable", "1"),
)


def classify(exc: BaseException, *, now: float | None = None) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    msg = str(exc)
    if isinstance(exc, RateLimited):
        wait = max(1, math.ceil(exc.next_allowed - (now if now is not None else time.time())))
        return HttpError(429, "rate_limited", msg, {"Retry-After": str(wait)})
    for klass, status, code, retry_after in _STATUS:
        if isinstance(exc, klass):
            headers = {"Retry-After": retry_after} if retry_after else None
            return HttpError(status, code, msg, headers)
    return HttpError(500, "internal", "internal error (see the node's log)")
