"""KMS errors: one line naming what was wrong and what to do, like every project error."""

from __future__ import annotations

from hsm.errors import HsmError


class KmsError(HsmError):
    pass


class ConfigError(KmsError):
    pass


class ImportRefused(KmsError):
    """A bundle was not imported (bad signature, other region, practice, replay...)."""


class UnknownTenant(KmsError):
    pass


class ReleaseNotHeld(KmsError):
    """A tenant's secret belongs to a release this KMS could not import."""


class RateLimited(KmsError):
    def __init__(self, message: str, *, next_allowed: float, **kw):
        self.next_allowed = next_allowed
        super().__init__(message, **kw)


class KeyDestroyed(KmsError):
    pass


class PolicyViolation(KmsError):
    """E.g. destroying a database-encryption secret before its minimum lifespan."""


class CorruptRecord(KmsError):
    """A store row failed its integrity check; other rows are unaffected."""


class KeyUnavailable(KmsError):
    """A customer-held key (EKM, cache-only) cannot serve now; operations under it fail
    closed. ``code`` names the cause where the protocol has one (cache-only event codes)."""

    def __init__(self, message: str, *, code: str | None = None, **kw):
        self.code = code
        super().__init__(message, **kw)
