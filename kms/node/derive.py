"""Tenant data-encryption keys (DEKs) derived inside the regional token.

    DEK = PBKDF2-HMAC-SHA256(P = the release's KDF seed (a key object in the token),
                             S = dek_salt(release KDF salt, tenant secret, key context),
                             c = the key's iteration count, dkLen = 32)

Every HMAC is a C_Sign with the seed object (:func:`hsm.keys.kdf.pbkdf2_hmac_sha256`); the seed
never
leaves the token. The result equals ``hashlib.pbkdf2_hmac("sha256", seed_value, dek_salt(...),
iterations, 32)`` for the same seed value (proved in tests/kms/node/test_derive.py with an imported
known seed).

**Context encoding.** :meth:`KeyContext.encode` is injective: a version tag, then every field
length-prefixed (4-byte big-endian byte length, UTF-8), the version as a fixed 8-byte integer, and
an explicit presence byte for the fragment, so ``("a", "bc")`` and ``("ab", "c")``, or ``None`` and
``""`` as a fragment, can never encode alike. Strings are not Unicode-normalised: two spellings of
an id are two contexts (normalise ids where they are created, not here).

**Why the salt is a hash.** :func:`dek_salt` is SHA-256 over the length-prefixed concatenation of
a domain tag, the release's KDF salt, the tenant secret and the encoded context. RFC 8018 asks of a
PBKDF2 salt only that it be (with overwhelming probability) different for every derived key; it
need not be secret nor carry the inputs verbatim. The length-prefixed input is injective, and
SHA-256's collision resistance keeps distinct inputs distinct, so distinct (release, tenant
secret, context) triples get distinct salts. It also gives a fixed 32-byte salt whatever the field
sizes (one PRF message size on every call), and the tenant secret's value never crosses into the
token call -- only a one-way image of it does. Destroying the tenant secret (crypto-shredding)
makes the salt, hence the DEK, impossible to recompute even with the seed: the secret has >= 128
bits of entropy, so the salt cannot be guessed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from hsm.keys.kdf import pbkdf2_hmac_sha256
from hsm.core.token import KeyRef, Token

from kms.errors import ArgumentError

CONTEXT_TAG = b"hsm-suite dek context v1"
SALT_TAG = b"hsm-suite dek salt v1"
DEK_LENGTH = 32
MAX_FIELD_BYTES = 1024          # per context string (UTF-8 bytes)
MIN_TENANT_SECRET_BYTES = 16    # 128 bits: the DEK is only as unguessable as this
MAX_VERSION = 2**64 - 1

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class DerivationInputError(ArgumentError):
    """A derivation input is malformed; raised before the token is touched."""


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _text(name: str, value, *, allow_empty: bool = False) -> bytes:
    if not isinstance(value, str):
        raise DerivationInputError(f"key context {name} must be a str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise DerivationInputError(f"key context {name} must not be empty")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DerivationInputError(f"key context {name} is not valid Unicode text "
                                   f"(lone surrogate at index {exc.start})") from None
    if len(data) > MAX_FIELD_BYTES:
        raise DerivationInputError(f"key context {name} is {len(data)} bytes in UTF-8; at most "
                                   f"{MAX_FIELD_BYTES}")
    return data


@dataclass(frozen=True)
class KeyContext:
    """What a DEK is for: tenant (org), key type, key version and, for database encryption, the
    data fragment. Validated on construction; :meth:`encode` is its canonical, injective form."""

    org_id: str
    key_type: str
    version: int
    fragment: str | None = None

    def __post_init__(self) -> None:
        # Validate (and cache) the encoding now, so a bad context fails where it is built.
        object.__setattr__(self, "_encoded", self._encode())

    def _encode(self) -> bytes:
        org = _text("org_id", self.org_id)
        key_type = _text("key_type", self.key_type)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise DerivationInputError(f"key context version must be an int, not "
                                       f"{type(self.version).__name__}")
        if not 0 <= self.version <= MAX_VERSION:
            raise DerivationInputError(f"key context version must be between 0 and 2**64-1, "
                                       f"got {self.version}")
        parts = [_lp(CONTEXT_TAG), _lp(org), _lp(key_type), _U64.pack(self.version)]
        if self.fragment is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x01" + _lp(_text("fragment", self.fragment, allow_empty=True)))
        return b"".join(parts)

    def encode(self) -> bytes:
        """The canonical encoding: distinct contexts always give distinct bytes."""
        return self._encoded  # type: ignore[attr-defined]


def _secret_bytes(name: str, value, minimum: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DerivationInputError(f"{name} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) < minimum:
        raise DerivationInputError(f"{name} must be at least {minimum} bytes, got {len(value)}")
    return value


def dek_salt(kdf_salt: bytes, tenant_secret: bytes, ctx: KeyContext) -> bytes:
    """The PBKDF2 salt for one DEK: SHA-256(lp(tag) || lp(kdf_salt) || lp(tenant_secret) ||
    lp(context)) -- 32 bytes, distinct for distinct inputs (see the module docstring)."""
    kdf_salt = _secret_bytes("kdf_salt", kdf_salt, 1)
    tenant_secret = _secret_bytes("tenant_secret", tenant_secret, MIN_TENANT_SECRET_BYTES)
    if not isinstance(ctx, KeyContext):
        raise DerivationInputError(f"ctx must be a KeyContext, not {type(ctx).__name__}")
    h = hashlib.sha256(_lp(SALT_TAG))
    h.update(_lp(kdf_salt))
    h.update(_lp(tenant_secret))
    h.update(_lp(ctx.encode()))
    return h.digest()


def derive_dek(token: Token, seed: KeyRef, kdf_salt: bytes, tenant_secret: bytes,
               ctx: KeyContext, iterations: int) -> bytes:
    """The 32-byte DEK for ``ctx``: PBKDF2-HMAC-SHA256 keyed by the token's seed object ``seed``
    (``hsm.core.ops.secret(label)``), over :func:`dek_salt`, with ``iterations`` (recorded with the
    key; >= 1). One :meth:`Token.run`, ``iterations`` C_Sign calls."""
    return pbkdf2_hmac_sha256(token, seed, dek_salt(kdf_salt, tenant_secret, ctx), iterations,
                              DEK_LENGTH)
