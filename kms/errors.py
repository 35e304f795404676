"""KMS errors: one line naming what was wrong and what to do, like every project error.

``KmsError`` is a sibling of ``hsm.core.errors.HsmError`` under ``SuiteError``: a token failure
inside
the KMS stays an ``HsmError`` (the service answers it 503), a KMS refusal is a ``KmsError``. The
client SDK's errors (``ServiceError`` and the ciphertext errors) are here too, so a caller
imports every error it may catch from one module.
"""

from __future__ import annotations

from suite.errors import SuiteError


class KmsError(SuiteError):
    pass


class ArgumentError(KmsError, ValueError):
    """A caller passed a value the KMS cannot take (empty org id, unknown key type, a non-finite
    time...); nothing was changed. A ``ValueError`` too."""


class ArgumentTypeError(ArgumentError, TypeError):
    """A caller passed a value of the wrong type (a number for an org id, a wrap that is not
    callable); nothing was changed. A ``TypeError`` too."""


class ConfigError(KmsError):
    pass


class ImportRefused(KmsError):
    """A bundle was not imported (bad signature, other region, practice, replay...)."""


class UnknownTenant(KmsError):
    pass


class UnknownVersion(KmsError):
    """The org exists but has no secret of this key type and version."""


class Conflict(KmsError):
    """The request contradicts the store's state (the org exists already, the version exists,
    a replayed upload, a second ACTIVE secret); nothing was changed."""


class StoreUnavailable(KmsError):
    """The database could not be reached or answered with a driver error; nothing is known to
    have changed unless the message says the connection was lost during COMMIT."""


class ReleaseNotHeld(KmsError):
    """A tenant's secret belongs to a release this KMS could not import."""


class RateLimited(KmsError):
    def __init__(self, message: str, *, next_allowed: float, hint: str | None = None):
        self.next_allowed = next_allowed
        super().__init__(message, hint=hint)


class KeyDestroyed(KmsError):
    pass


class PolicyViolation(KmsError):
    """E.g. destroying a database-encryption secret before its minimum lifespan."""


class CorruptRecord(KmsError):
    """A store row failed its integrity check; other rows are unaffected.

    ``records`` names every failing row (``("tenant_secrets", org, key type, version)``,
    ``("orgs", org)``, ``("releases", release)``...), ``intact`` carries the rows of a listing
    that passed (None for a single-row read); ``table``, ``org_id``, ``key_type`` and
    ``version`` describe the first failing row."""

    def __init__(self, message: str, *, hint: str | None = None,
                 records: list[tuple] | None = None, intact: list | dict | None = None):
        super().__init__(message, hint=hint)
        self.records: list[tuple] = list(records or [])
        self.intact = intact
        first = self.records[0] if self.records else (None,)
        self.table = first[0]
        keyed = first[1:] if self.table not in (None, "releases") else ()
        self.org_id, self.key_type, self.version = (*keyed, None, None, None)[:3]


class RolledBack(CorruptRecord):
    """The store names an org state whose key-encryption key the HSM no longer holds: its rows
    (or the whole database) were restored from an older copy. Nothing of the org is served."""


class KeyUnavailable(KmsError):
    """A customer-held key (EKM, cache-only) cannot serve now; operations under it fail
    closed. ``code`` names the cause where the protocol has one (cache-only event codes)."""

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None):
        self.code = code
        super().__init__(message, hint=hint)


# --------------------------------------------------------------------------- client SDK
class ServiceError(KmsError):
    """A KMS node answered a request with an error (``status``, the JSON ``code``)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "",
                 hint: str | None = None):
        self.status, self.code = status, code
        super().__init__(message, hint=hint)


class Unavailable(ServiceError):
    """No node answered (connection refused, timeouts, 503 everywhere)."""


class Forbidden(ServiceError):
    pass


class CiphertextError(KmsError):
    """A blob that cannot be decrypted as given (base class of the errors below)."""


class MalformedCiphertext(CiphertextError):
    """Truncated, garbled, or not an HSF blob at all."""


class UnsupportedFormat(CiphertextError):
    """An HSF blob of a format version this SDK does not read."""


class TenantMismatch(CiphertextError):
    """The blob was written for another org than the one decrypting it."""


class AuthenticationFailed(CiphertextError):
    """AES-GCM authentication failed: the blob, the aad or the field name is not what was
    encrypted."""
