"""Ceremony errors. Each stops the ceremony before anything is exported, with a message that
names what was wrong and what to do."""

from __future__ import annotations

from hsm.core.errors import SuiteError
from release.errors import CertificateError, VerificationError  # raised by ceremony code too


class CeremonyError(SuiteError):
    """Base class: one line for the officer, no traceback unless --debug. A sibling of
    ``HsmError``, not a kind of it: a token failure during a ceremony stays an ``HsmError``."""


class PlanError(CeremonyError):
    pass


class ApprovalError(CeremonyError):
    pass


class ResumeError(CeremonyError):
    pass


__all__ = ["ApprovalError", "CeremonyError", "CertificateError", "PlanError", "ResumeError",
           "VerificationError"]
