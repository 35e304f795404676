"""Ceremony errors. Each stops the ceremony before anything is exported, with a message that
names what was wrong and what to do."""

from __future__ import annotations

from hsm.errors import HsmError


class CeremonyError(HsmError):
    """Base class: one line for the officer, no traceback unless --debug."""


class PlanError(CeremonyError):
    pass


class ApprovalError(CeremonyError):
    pass


class CertificateError(CeremonyError):
    pass


class VerificationError(CeremonyError):
    """A bundle or transcript failed offline verification."""


class ResumeError(CeremonyError):
    pass
