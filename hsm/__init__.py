"""The PKCS#11 driver layer: the only package of this project that imports ``pkcs11``.

What a caller imports: :class:`Token` (open a token, log in once, pooled sessions) and
:class:`KeyRef` (a key by label and class), :class:`Pin`, the errors (:class:`SuiteError`, the
neutral base of the whole suite, and :class:`HsmError` with its kinds). Modules by concern:
:mod:`hsm.ops` (operations by key label), :mod:`hsm.policy` (each key's policy, set in the
token and read back), :mod:`hsm.provision` (primary and regional HSMs), :mod:`hsm.profile`
(what a token can do and enforces), :mod:`hsm.audit`, :mod:`hsm.cloud` (exports to cloud
providers' BYOK imports), :mod:`hsm.testing` (pytest fixtures for throw-away tokens).

The names load on first use, so importing a submodule that needs no token (the pytest entry
point :mod:`hsm.pytest_plugin`, the re-exports of :mod:`suite` at their old paths) does not
load ``pkcs11``; what the token layer shares without a token lives in :mod:`suite`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each name of __all__ lives.
_EXPORTS = {"Pin": "hsm.pin", "KeyRef": "hsm.token", "Token": "hsm.token"}
if TYPE_CHECKING:
    from hsm.errors import (DecryptionFailed, HsmError, KeyPolicyViolation, MechanismUnsupported,
                            ModuleLoadError, ObjectExists, ObjectNotFound, PinError, SessionLost,
                            SuiteError, TokenNotFound, UsageError)
    from hsm.pin import Pin
    from hsm.token import KeyRef, Token


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'hsm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS.get(name, "hsm.errors")), name)


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
