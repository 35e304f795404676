"""The PKCS#11 driver layer: the only package of this project that imports ``pkcs11``.

What a caller imports: :class:`Token` (open a token, log in once, pooled sessions) and
:class:`KeyRef` (a key by label and class), :class:`Pin`, the errors (:class:`SuiteError`, the
neutral base of the whole suite, and :class:`HsmError` with its kinds). The subpackages, each
using only those before it:

- :mod:`hsm.core`, the driver: loading a PKCS#11 module, tokens, sessions and logins, PINs and
  URIs, the token's errors, what a token can do (:mod:`hsm.core.profile`) and operations by key
  label (:mod:`hsm.core.ops`);
- :mod:`hsm.keys`, key management on it: each key's attributes as the token must hold them
  (:mod:`hsm.keys.attributes`), the long-term keys and their certificates, release secrets and
  their exports, the token side of BYOK, PBKDF2, org KEKs and XKS keys;
- :mod:`hsm.cloud`, exports to cloud providers' BYOK imports;
- :mod:`hsm.inventory` (``hsm audit``: every object of a token against its policy) and
  :mod:`hsm.commands` (the ``hsm`` command and the options the three commands share);
- :mod:`hsm.testing`, pytest fixtures for throw-away tokens.

The names load on first use, so importing a submodule that needs no token (the pytest entry
point :mod:`hsm.pytest_plugin`) does not load ``pkcs11``; what the token layer shares without a
token lives in :mod:`suite`. The module paths from before the subpackages (``hsm.token``,
``hsm.policy``...) are the same modules until the next release (:mod:`hsm._old_paths`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hsm import _old_paths

_old_paths.install()

# Where each name of __all__ lives.
_EXPORTS = {"Pin": "hsm.core.pin", "KeyRef": "hsm.core.token", "Token": "hsm.core.token"}
if TYPE_CHECKING:
    from hsm.core.errors import (DecryptionFailed, HsmError, KeyPolicyViolation,
                                 MechanismUnsupported, ModuleLoadError, ObjectExists,
                                 ObjectNotFound, PinError, SessionLost, SuiteError, TokenNotFound,
                                 UsageError)
    from hsm.core.pin import Pin
    from hsm.core.token import KeyRef, Token


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'hsm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS.get(name, "hsm.core.errors")), name)


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
