"""Why a bundle or a certificate was refused. Siblings of ``HsmError`` under ``SuiteError``:
checking a release never touches a token."""

from __future__ import annotations

from suite.errors import SuiteError


class ReleaseError(SuiteError):
    """Base class: a bundle, certificate or release id that cannot be accepted."""


class CertificateError(ReleaseError):
    pass


class VerificationError(ReleaseError):
    """A bundle or transcript failed offline verification."""
