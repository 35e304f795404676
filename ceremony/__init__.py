"""The High Assurance Virtual Ceremony: a reviewed plan, run under an M-of-N quorum of officer
approvals, that makes a release's secrets inside the primary HSM and exports them, signed, only
to trusted regional keys; every step journaled in a hash-chained, signed transcript, and every
output verifiable offline (``ceremony verify``).

What a caller imports: :func:`load_plan` and :class:`Plan`, :class:`Runner` (perform or resume
a ceremony), :func:`verify_directory` (the offline check), :func:`rehearse` (the plan on
throw-away tokens), and the errors. The bundle format the ceremony writes is :mod:`release`'s.
"""

from ceremony.errors import (ApprovalError, CeremonyError, CertificateError, PlanError,
                             ResumeError, VerificationError)
from ceremony.plan import Plan
from ceremony.plan import load as load_plan
from ceremony.rehearse import rehearse
from ceremony.runner import Runner
from ceremony.verify import verify_directory

__all__ = [
    "ApprovalError",
    "CeremonyError",
    "CertificateError",
    "Plan",
    "PlanError",
    "ResumeError",
    "Runner",
    "VerificationError",
    "load_plan",
    "rehearse",
    "verify_directory",
]
