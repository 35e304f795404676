"""The neutral base of every error the suite raises on purpose, and of the caller's bad input.

``hsm.core.errors.HsmError`` (the token), ``release.errors.ReleaseError`` (a bundle or certificate),
``ceremony.errors.CeremonyError`` and ``kms.errors.KmsError`` derive from :class:`SuiteError` side
by side, so ``except HsmError`` means the token and nothing else, and the three commands answer
any :class:`SuiteError` with its one line and exit 2.
"""

from __future__ import annotations

__all__ = ["SuiteError", "UsageError"]


class SuiteError(Exception):
    """The neutral base of every error this suite raises on purpose: ``str()`` is one line fit
    for an operator (what was wrong, then ``- what to do``). The three CLIs answer it with that
    line and exit 2; anything else is a bug. It lives in this token-free package so that every
    package can depend on it without loading the token layer."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(f"{message} - {hint}" if hint else message)


class UsageError(SuiteError, ValueError):
    """Bad input from the caller (an existing output file, a malformed value), detected before
    anything is touched. A ``ValueError`` too, like every misuse error of the suite;
    ``hsm.core.errors.UsageError`` is the token layer's kind of it."""
