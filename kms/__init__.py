"""The regional KMS: imports the release bundles at start-up, keeps tenant secrets wrapped in
its store, derives tenant data-encryption keys inside the HSM, and serves them to encryption
services (in process, or as the mTLS service ``kms serve``).

What a caller imports: :class:`Kms` and :func:`load_config` (a node), :class:`FieldEncryptor`
(the SDK that encrypts fields with served keys), :class:`KmsClient` and
:class:`RemoteKeyProvider` (the service's client), :class:`Store`, and the errors
(:mod:`kms.errors`, SDK and client errors included).

The names load on first use: an encryption service that imports only the SDK or the client
does not load the token layer (``pkcs11``) or the store.

The package's parts, in the order a DEK flows: ``node/`` (the node ``Kms`` and what it is made
of), ``store/`` (its TenantSecret store), ``customer_keys/`` (keys a customer holds, served
through the node), ``server/`` (the mTLS service around a node, with cross-node invalidation),
``xks/`` (the AWS XKS proxy), ``caller/`` (the encryption-service side: SDK and client); shared
by all: ``errors``, ``key_rules`` (key types, org types, time limits) and ``dek_cache`` (the
encrypted DEK cache); ``cli`` is the ``kms`` command.

Deprecated module paths: the modules that were flat in ``kms/`` until this release still import
at their old paths (``kms.service``, ``kms.cache``, ``kms.sdk``, ...: ``MOVED``) as the *same
module object* as the new path, so a monkeypatch through either name is seen by both. They go
in the next release.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from suite import moved

# Old module path (deprecated, until the next release) -> where the module lives now.
MOVED = {
    "kms.service": "kms.node.node", "kms.config": "kms.node.config",
    "kms.limits": "kms.node.limits", "kms.importer": "kms.node.importer",
    "kms.derive": "kms.node.derive", "kms.sealing": "kms.node.sealing",
    "kms.rowcache": "kms.node.rowcache", "kms.orgid": "kms.node.orgid",
    "kms.advice": "kms.node.advice", "kms.cache": "kms.dek_cache", "kms.policy": "kms.key_rules",
    "kms.byok": "kms.customer_keys.byok", "kms.byok_pins": "kms.customer_keys.byok_pins",
    "kms.cacheonly": "kms.customer_keys.cache_only", "kms.ekm": "kms.customer_keys.ekm",
    "kms.outbound": "kms.customer_keys.outbound",
    "kms.keyservice": "kms.customer_keys.reference_service",
    "kms.sdk": "kms.caller.sdk", "kms.client": "kms.caller.client",
    "kms.invalidation": "kms.server.invalidation",
}


moved.install(MOVED)

# Where each name of __all__ lives that is not an error of kms.errors.
_EXPORTS = {
    "Kms": "kms.node.node", "KmsConfig": "kms.node.config", "FieldEncryptor": "kms.caller.sdk",
    "KmsClient": "kms.caller.client", "RemoteKeyProvider": "kms.caller.client",
    "Store": "kms.store",
}
if TYPE_CHECKING:
    from kms.caller.client import KmsClient, RemoteKeyProvider
    from kms.node.config import KmsConfig
    from kms.node.config import load as load_config
    from kms.errors import (ArgumentError, ArgumentTypeError, AuthenticationFailed,
                            CiphertextError, ConfigError, Conflict, CorruptRecord, Forbidden,
                            ImportRefused, KeyDestroyed, KeyUnavailable, KmsError,
                            MalformedCiphertext, PolicyViolation, RateLimited, ReleaseNotHeld,
                            ServiceError, StoreUnavailable, TenantMismatch, Unavailable,
                            UnknownTenant, UnknownVersion, UnsupportedFormat)
    from kms.caller.sdk import FieldEncryptor
    from kms.node.node import Kms
    from kms.store import Store


def __getattr__(name: str) -> Any:
    if name == "load_config":
        return importlib.import_module("kms.node.config").load
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
