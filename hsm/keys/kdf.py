"""PBKDF2-HMAC-SHA256 (RFC 8018 §5.2) whose every PRF call is a C_Sign inside the token.

The PBKDF2 "password" is a generic-secret key object in the token (the regional KMS's KDF seed):
each ``U_j = HMAC-SHA256(seed, ...)`` is one ``C_Sign(CKM_SHA256_HMAC)`` with that object, so the
seed never leaves the token, while the XOR chain (public once the ``U_j`` are known to the host,
which they must be for PBKDF2 anyway) runs on the host. For the same seed value, salt, iteration
count and length the output equals ``hashlib.pbkdf2_hmac("sha256", seed, salt, iterations,
length)`` byte for byte (tests/kms/node/test_derive.py proves it on SoftHSM2 and NSS softokn).

Cost: ``ceil(length / 32) * iterations`` C_Sign calls. The whole derivation runs inside ONE
:meth:`Token.run` on one leased session: the key object is looked up (or taken from the lease's
cache) once, and the bound ``sign`` method and the mechanism are bound once, so the loop is as
close to bare python-pkcs11 calls as Python gets. If the session is lost half-way, ``Token.run``
replaces it and starts the derivation again (it is deterministic, so nothing is lost but time).

Native PBKDF2 (``CKM_PKCS5_PBKD2``) is deliberately *not* used, even where the token offers it.
NSS softokn 3.87 does (``native_pbkdf2_available``), and checked here it computes the same bytes as
``hashlib.pbkdf2_hmac`` -- but it is a C_GenerateKey mechanism whose parameters
(``CK_PKCS5_PBKD2_PARAMS``) carry the password as a byte string (``pPassword``), not as an object
handle. Using it would mean holding the seed's value on the host, i.e. an extractable seed, which
is exactly what this design exists to avoid: it cannot key the PRF with the seed *object*. (Also
measured on NSS 3.87: it reads the PKCS#11 v2.40 layout, where ``ulPasswordLen`` is a *pointer*;
the v3.0 ``CK_PKCS5_PBKD2_PARAMS2`` layout, a plain length, has the same size and makes softokn
dereference the length as an address and crash the process.) SoftHSM2 2.6.1 has no PBKD2 at all.
"""

from __future__ import annotations

from pkcs11 import Mechanism, ObjectClass

from hsm.core.errors import HsmError, UsageError
from hsm.core.profile import CKM_PKCS5_PBKD2
from hsm.core.token import KeyRef, Token

HASH_LEN = 32          # SHA-256 output, one PBKDF2 block
MIN_LENGTH = 1
MAX_LENGTH = 1024      # 32 blocks; anything longer is a misuse (a DEK is 32 bytes)

_SHA256_HMAC = Mechanism.SHA256_HMAC
_OPERATION = "PBKDF2(C_Sign SHA256_HMAC)"
# INT(i) for the block indices we can ever need (RFC 8018: 4-octet big-endian, from 1).
_BLOCK_INDEX = tuple(i.to_bytes(4, "big") for i in range(MAX_LENGTH // HASH_LEN + 2))


class KdfParameterError(UsageError):
    """A PBKDF2 input is unusable; raised before the token is touched."""


class _SeedCannotSign(Exception):
    """python-pkcs11 gives a key without CKA_SIGN no ``sign`` method; reported with the token."""


def pbkdf2_hmac_sha256(token: Token, seed: KeyRef, salt: bytes, iterations: int,
                       length: int = HASH_LEN) -> bytes:
    """PBKDF2-HMAC-SHA256 keyed by the token-resident generic-secret key ``seed``.

    ``seed`` needs CKA_SIGN and the token's CKM_SHA256_HMAC (SoftHSM2 requires the key to be at
    least 32 bytes; NSS accepts shorter). ``salt`` is bytes (any length, empty allowed as in
    RFC 8018), ``iterations`` >= 1, 1 <= ``length`` <= 1024. Token failures surface as
    :class:`hsm.core.errors.HsmError` naming the operation, token, seed label and CKR code.
    """
    _validate(seed, salt, iterations, length)
    try:
        return token.run(_OPERATION, _pbkdf2, seed.label, seed, bytes(salt), iterations, length)
    except _SeedCannotSign:
        raise HsmError(f"the PBKDF2 seed {seed.label!r} does not allow signing (CKA_SIGN is "
                       "false), so it cannot key HMAC", operation=_OPERATION, token=token.label,
                       object_label=seed.label, ckr="CKR_KEY_FUNCTION_NOT_PERMITTED",
                       ckr_value=0x68,
                       hint="a KDF seed is a generic-secret key with CKA_SIGN=true") from None


def _validate(seed, salt, iterations, length) -> None:
    if not isinstance(seed, KeyRef):
        raise KdfParameterError(f"PBKDF2 seed must be a KeyRef (hsm.core.ops.secret(label)), "
                                f"not {type(seed).__name__}")
    if seed.object_class != ObjectClass.SECRET_KEY:
        raise KdfParameterError(f"PBKDF2 seed {seed.label!r} must be a secret key, "
                                f"not a {seed.object_class.name.lower()}",
                                object_label=seed.label)
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise KdfParameterError(f"PBKDF2 salt must be bytes, not {type(salt).__name__}"
                                + (" (encode it first)" if isinstance(salt, str) else ""))
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise KdfParameterError(f"PBKDF2 iterations must be an int, not "
                                f"{type(iterations).__name__}")
    if iterations < 1:
        raise KdfParameterError(f"PBKDF2 iterations must be >= 1, got {iterations}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise KdfParameterError(f"PBKDF2 length must be an int, not {type(length).__name__}")
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise KdfParameterError(f"PBKDF2 length must be between {MIN_LENGTH} and {MAX_LENGTH} "
                                f"bytes, got {length}")


def _pbkdf2(lease, seed: KeyRef, salt: bytes, iterations: int, length: int) -> bytes:
    """The loop, on one leased session. Module-level (no closure per call), names bound once."""
    sign = getattr(lease.key(seed), "sign", None)
    if sign is None:
        raise _SeedCannotSign
    mech = _SHA256_HMAC
    from_bytes = int.from_bytes
    rest = range(iterations - 1)
    blocks = []
    for i in range(1, -(-length // HASH_LEN) + 1):
        u = sign(salt + _BLOCK_INDEX[i], mechanism=mech)   # U_1 = PRF(P, S || INT(i))
        acc = from_bytes(u, "big")
        for _ in rest:                                       # U_j = PRF(P, U_{j-1})
            u = sign(u, mechanism=mech)
            acc ^= from_bytes(u, "big")                      # T_i = U_1 ^ ... ^ U_c
        blocks.append(acc.to_bytes(HASH_LEN, "big"))
    out = b"".join(blocks)
    return out if len(out) == length else out[:length]


def native_pbkdf2_available(profile) -> bool:
    """Whether the token lists CKM_PKCS5_PBKD2 (NSS softokn does, SoftHSM2 2.6.1 does not).

    Informational only: :func:`pbkdf2_hmac_sha256` never uses it, because the mechanism takes the
    password as bytes and so cannot be keyed with the seed object (see the module docstring).
    ``profile`` is an :class:`hsm.core.profile.Profile` (or a Token, whose profile is used).
    """
    if isinstance(profile, Token):
        profile = profile.profile
    return profile.has(CKM_PKCS5_PBKD2)
