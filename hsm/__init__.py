"""The PKCS#11 driver layer: the only package of this project that imports ``pkcs11``.

What a caller imports: :class:`Token` (open a token, log in once, pooled sessions) and
:class:`KeyRef` (a key by label and class), :class:`Pin`, the errors (:class:`SuiteError`, the
neutral base of the whole suite, and :class:`HsmError` with its kinds). Modules by concern:
:mod:`hsm.ops` (operations by key label), :mod:`hsm.policy` (each key's policy, set in the
token and read back), :mod:`hsm.provision` (primary and regional HSMs), :mod:`hsm.profile`
(what a token can do and enforces), :mod:`hsm.audit`, :mod:`hsm.cloud` (exports to cloud
providers' BYOK imports), :mod:`hsm.testing` (pytest fixtures for throw-away tokens).
"""

from hsm.errors import (DecryptionFailed, HsmError, KeyPolicyViolation, MechanismUnsupported,
                        ModuleLoadError, ObjectExists, ObjectNotFound, PinError, SessionLost,
                        SuiteError, TokenNotFound, UsageError)
from hsm.pin import Pin
from hsm.token import KeyRef, Token

__all__ = [
    "DecryptionFailed",
    "HsmError",
    "KeyPolicyViolation",
    "KeyRef",
    "MechanismUnsupported",
    "ModuleLoadError",
    "ObjectExists",
    "ObjectNotFound",
    "Pin",
    "PinError",
    "SessionLost",
    "SuiteError",
    "Token",
    "TokenNotFound",
    "UsageError",
]
