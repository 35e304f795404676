"""The regional KMS: imports the release bundles at start-up, keeps tenant secrets wrapped in
its store, derives tenant data-encryption keys inside the HSM, and serves them to encryption
services (in process, or as the mTLS service ``kms serve``).

What a caller imports: :class:`Kms` and :func:`load_config` (a node), :class:`FieldEncryptor`
(the SDK that encrypts fields with served keys), :class:`KmsClient` and
:class:`RemoteKeyProvider` (the service's client), :class:`Store`, and the errors
(:mod:`kms.errors`, SDK and client errors included).

The names load on first use: an encryption service that imports only the SDK or the client
does not load the token layer (``pkcs11``) or the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each name of __all__ lives that is not an error of kms.errors.
_EXPORTS = {
    "Kms": "kms.service", "KmsConfig": "kms.config", "FieldEncryptor": "kms.sdk",
    "KmsClient": "kms.client", "RemoteKeyProvider": "kms.client", "Store": "kms.store",
}
if TYPE_CHECKING:
    from kms.client import KmsClient, RemoteKeyProvider
    from kms.config import KmsConfig
    from kms.config import load as load_config
    from kms.errors import (ArgumentError, ArgumentTypeError, AuthenticationFailed,
                            CiphertextError, ConfigError, Conflict, CorruptRecord, Forbidden,
                            ImportRefused, KeyDestroyed, KeyUnavailable, KmsError,
                            MalformedCiphertext, PolicyViolation, RateLimited, ReleaseNotHeld,
                            ServiceError, StoreUnavailable, TenantMismatch, Unavailable,
                            UnknownTenant, UnknownVersion, UnsupportedFormat)
    from kms.sdk import FieldEncryptor
    from kms.service import Kms
    from kms.store import Store


def __getattr__(name: str) -> Any:
    if name == "load_config":
        return importlib.import_module("kms.config").load
    if name not in __all__:
        raise AttributeError(f"module 'kms' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS.get(name, "kms.errors")), name)


__all__ = [
    "ArgumentError", "ArgumentTypeError", "AuthenticationFailed", "CiphertextError",
    "ConfigError", "Conflict", "CorruptRecord", "FieldEncryptor", "Forbidden", "ImportRefused",
    "KeyDestroyed", "KeyUnavailable", "Kms", "KmsClient", "KmsConfig", "KmsError",
    "MalformedCiphertext", "PolicyViolation", "RateLimited", "ReleaseNotHeld",
    "RemoteKeyProvider", "ServiceError", "Store", "StoreUnavailable", "TenantMismatch",
    "Unavailable", "UnknownTenant", "UnknownVersion", "UnsupportedFormat", "load_config",
]
