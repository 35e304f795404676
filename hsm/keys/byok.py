"""BYOK token operations: per-org RSA-4096 key pairs that may only unwrap, and what the KMS does
with a customer's wrapped secret without the secret leaving the token.

Two purposes, two key pairs (and so two certificates), because what they unwrap is used
differently and the token should say so:

- ``seed`` (``byok-seed-<org>``, policy ``hsm.keys.attributes.BYOK_SEED``): a tenant secret for PBKDF2, or
  a cache-only key's JWE content-encryption key. The unwrap template makes the result a
  sensitive, non-extractable session object (HMAC-SHA256 / AES-GCM only). The customer's SHA-256
  is compared with ``C_DigestKey`` inside the token; the KMS keeps only an HMAC image of the
  secret computed by the token (:func:`seed_image`). The secret itself never reaches host memory.
- ``dek`` (``byok-dek-<org>``, ``BYOK_DEK``): a DEK for derivation NONE. The KMS must hand that
  very value to encryption services, so the unwrap template makes it readable; it is still a
  session object that cannot be wrapped or stored in the token.

Measured on SoftHSM2 2.6.1 (tests/test_adversary.py asserts each): C_DigestKey works on a
sensitive, non-extractable generic secret; RSA-OAEP unwrap takes SHA-1/MGF1-SHA1 only (SHA-256 and
SHA-512 parameters give CKR_ARGUMENTS_BAD).
"""

from __future__ import annotations

import hmac
import os

from pkcs11 import Attribute as A
from pkcs11 import KeyType
from pkcs11 import Mechanism as M
from pkcs11 import ObjectClass

from hsm.core._cryptoki import CK_RSA_PKCS_OAEP_PARAMS
from hsm.core.errors import HsmError, ObjectExists, check_rv, translated
from hsm.core.token import KeyRef, Token

from . import attributes
from .keygen import create_pair, label_in_use

PURPOSES = {"seed": attributes.BYOK_SEED, "dek": attributes.BYOK_DEK}
RSA_BITS = 4096
CIPHERTEXT_BYTES = RSA_BITS // 8
SECRET_BYTES = 32
IMAGE_TAG = b"hsm-suite byok seed image v1"
# OAEP hash -> (CKM hash, CKG_MGF1_*); the MGF1 hash always equals the OAEP hash.
OAEP_HASHES = {"sha1": (M.SHA_1, 0x1), "sha256": (M.SHA256, 0x2), "sha512": (M.SHA512, 0x4)}
CKR_ARGUMENTS_BAD = 0x7
# What a failed unwrap of a customer's ciphertext means to the operator.
_UNWRAP_REFUSALS = {0x40, 0x41, 0x110, 0x112, 0x20, 0x21, 0x5}


class ByokRefused(HsmError):
    """A customer's wrapped secret was refused (wrong key, bad length, hash mismatch...)."""


def label_for(org_id: str, purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ValueError(purpose)
    return f"byok-{purpose}-{org_id}"


def generate(token: Token, org_id: str, purpose: str) -> KeyRef:
    """An RSA-4096 key pair as token objects; the private key carries the purpose's policy,
    set at generation (it cannot be added later) and read back; a weaker key is destroyed."""
    from hsm.core.profile import require_enforcement
    policy = PURPOSES[purpose]
    label = label_for(org_id, purpose)
    require_enforcement(token, f"generate the BYOK {purpose} key of {org_id}")
    if label_in_use(token, label):
        raise ObjectExists(f"org {org_id} already has a BYOK {purpose} key {label!r}",
                           token=token.label, object_label=label,
                           hint="its certificate is re-issued from the existing key")
    key_id = os.urandom(16)
    pub = {A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.RSA, A.LABEL: label, A.ID: key_id,
           A.TOKEN: True, A.PRIVATE: False, A.MODIFIABLE: False, A.ENCRYPT: False,
           A.WRAP: False, A.VERIFY: False, A.MODULUS_BITS: RSA_BITS,
           A.PUBLIC_EXPONENT: b"\x01\x00\x01"}
    priv = {**policy.creation_attributes(), A.KEY_TYPE: KeyType.RSA, A.LABEL: label,
            A.ID: key_id}
    create_pair(token, label, M.RSA_PKCS_KEY_PAIR_GEN, pub, priv, policy)
    ref = KeyRef(label, ObjectClass.PRIVATE_KEY)
    return ref


def require(token: Token, org_id: str, purpose: str) -> KeyRef:
    """The org's key for ``purpose``, refused unless it still meets its policy."""
    ref = KeyRef(label_for(org_id, purpose), ObjectClass.PRIVATE_KEY)
    attributes.require(token, ref, PURPOSES[purpose], purpose=f"unwrap a BYOK {purpose}")
    return ref


def _oaep(hash_name: str) -> CK_RSA_PKCS_OAEP_PARAMS:
    try:
        hash_mech, mgf = OAEP_HASHES[hash_name]
    except KeyError:
        raise ByokRefused(f"RSA-OAEP hash must be one of {', '.join(OAEP_HASHES)}") from None
    return CK_RSA_PKCS_OAEP_PARAMS(int(hash_mech), mgf, 1, None, 0)  # CKZ_DATA_SPECIFIED, no label


def _unwrap(token, lease, ref: KeyRef, ciphertext: bytes, oaep: str, template: dict, *,
            expected: int = CIPHERTEXT_BYTES) -> int:
    """C_UnwrapKey of the customer's ciphertext into a session object on this lease."""
    if len(ciphertext) != expected:
        raise ByokRefused(f"the encrypted secret is {len(ciphertext)} bytes; an "
                          f"RSA-{expected * 8} ciphertext is {expected} (truncated or not for "
                          "this key)")
    raw = token.module.raw
    rv, handle = raw.unwrap_key(lease.session.handle, M.RSA_PKCS_OAEP, _oaep(oaep),
                                lease.key(ref).handle, ciphertext, template)
    if rv == CKR_ARGUMENTS_BAD and oaep != "sha1":
        raise ByokRefused(f"this token unwraps RSA-OAEP with SHA-1 only, not {oaep} (SoftHSM2 "
                          "2.6.1 does)", hint="wrap again with the default OAEP hash (SHA-1)")
    if rv in _UNWRAP_REFUSALS:
        raise ByokRefused(f"the encrypted secret does not decrypt under {ref.label!r}: it was "
                          "encrypted to another certificate (another org's?), with another OAEP "
                          "hash, or altered", hint="wrap it to this org's certificate")
    check_rv(rv)
    return handle


def _secret_template(purpose: str, *, kind: str = "generic") -> dict:
    forced = (attributes.BYOK_SEED_UNWRAP_TEMPLATE if purpose == "seed"
              else attributes.BYOK_DEK_UNWRAP_TEMPLATE)
    usage = {A.SIGN: kind == "generic", A.DECRYPT: kind == "aes", A.ENCRYPT: kind == "aes-enc",
             A.VERIFY: False}
    return {A.CLASS: ObjectClass.SECRET_KEY,
            A.KEY_TYPE: KeyType.GENERIC_SECRET if kind == "generic" else KeyType.AES,
            A.LABEL: f"byok-unwrapped-{os.urandom(4).hex()}", **usage, **forced}


def _wrong_length(n: int | str) -> ByokRefused:
    return ByokRefused(f"the uploaded secret is {n} bytes; it must be {SECRET_BYTES} (256 bits)",
                       hint="`kms byok wrap --generate` makes one")


def _check_seed_length(token, lease, ref: KeyRef, ciphertext: bytes, oaep: str,
                       handle: int) -> None:
    """Exactly 32 bytes, decided inside the token: SoftHSM2 2.6.1 reports CKA_VALUE_LEN 0 for
    an unwrapped key, but refuses HMAC-SHA256 with a key under 32 bytes (CKR_KEY_SIZE_RANGE)
    and AES-GCM with a key that is not 16, 24 or 32 bytes (CKR_MECHANISM_INVALID). Passing both
    means 32. The second check unwraps once more, as an AES key, and destroys it."""
    from hsm.core._cryptoki import gcm_params
    raw = token.module.raw
    h = lease.session.handle
    rv = raw.operation_init("C_SignInit", h, M.SHA256_HMAC, None, handle)
    if rv == 0x62:
        raise _wrong_length("fewer than 32")
    check_rv(rv)
    check_rv(raw.one_shot("C_Sign", h, b"length probe")[0])     # ends the operation
    aes = _unwrap(token, lease, ref, ciphertext, oaep, _secret_template("seed", kind="aes-enc"))
    try:
        params, _keep = gcm_params(b"\x00" * 12)
        rv = raw.operation_init("C_EncryptInit", h, M.AES_GCM, params, aes)
        if rv == 0x70:
            raise _wrong_length("more than 32")
        check_rv(rv)
        check_rv(raw.one_shot("C_Encrypt", h, b"\x00" * 16)[0])
    finally:
        raw.destroy_object(h, aes)


def _check_hash(token, lease, handle: int, expected_sha256: bytes) -> None:
    raw = token.module.raw
    h = lease.session.handle
    rv, digest = raw.digest_key(h, M.SHA256, handle)
    check_rv(rv)
    if not hmac.compare_digest(digest, expected_sha256):
        raise ByokRefused("the SHA-256 of the decrypted secret does not match the uploaded hash "
                          "file; nothing stored", hint="upload the secret.sha256.b64 written "
                          "together with this secret.b64")


def unwrap_upload(token: Token, org_id: str, purpose: str, ciphertext: bytes,
                  expected_sha256: bytes, *, oaep: str = "sha1") -> bytes:
    """Unwrap an upload inside the token, check its length and hash there, and return what the
    KMS stores: for ``seed`` the token-computed HMAC image of the secret, for ``dek`` the DEK.
    The session object is destroyed before returning, whatever happened."""
    ref = require(token, org_id, purpose)
    raw = token.module.raw

    def run(lease):
        handle = _unwrap(token, lease, ref, ciphertext, oaep, _secret_template(purpose))
        try:
            if purpose == "seed":
                _check_seed_length(token, lease, ref, ciphertext, oaep, handle)
                _check_hash(token, lease, handle, expected_sha256)
                return _hmac(raw, lease.session.handle, handle, IMAGE_TAG)
            rv, value = raw.get_attribute(lease.session.handle, handle, A.VALUE)
            check_rv(rv)
            if value is None or len(value) != SECRET_BYTES:
                raise _wrong_length(len(value) if value is not None else "an unknown number of")
            _check_hash(token, lease, handle, expected_sha256)
            return value
        finally:
            raw.destroy_object(lease.session.handle, handle)
    with translated("BYOK unwrap", token.label, ref.label):
        return token.run("C_UnwrapKey(RSA_PKCS_OAEP)", run, ref.label)


def _hmac(raw, session: int, key: int, message: bytes) -> bytes:
    check_rv(raw.operation_init("C_SignInit", session, M.SHA256_HMAC, None, key))
    rv, mac = raw.one_shot("C_Sign", session, message)
    check_rv(rv)
    return mac


def _require_256_bit_cek(token, lease, ref: KeyRef, encrypted_key: bytes,
                         modulus_bytes: int) -> None:
    """A256GCM means a 256-bit CEK. AES-GCM already took it, so it is 16, 24 or 32 bytes; the
    token's HMAC-SHA256 refuses keys under 32 (CKR_KEY_SIZE_RANGE): together, exactly 32, decided
    inside the token (one more unwrap, as a generic secret, destroyed at once)."""
    raw = token.module.raw
    h = lease.session.handle
    probe = _unwrap(token, lease, ref, encrypted_key, "sha1", _secret_template("seed"),
                    expected=modulus_bytes)
    try:
        rv = raw.operation_init("C_SignInit", h, M.SHA256_HMAC, None, probe)
        if rv == 0x62:
            raise ByokRefused("the JWE content-encryption key is not 256 bits (enc A256GCM)")
        check_rv(rv)
        check_rv(raw.one_shot("C_Sign", h, b"length probe")[0])
    finally:
        raw.destroy_object(h, probe)


def decrypt_jwe(token: Token, org_id: str, encrypted_key: bytes, iv: bytes, ciphertext: bytes,
                tag: bytes, aad: bytes) -> bytes:
    """A cache-only key's JWE (RSA-OAEP + A256GCM), opened inside the token: the CEK is
    unwrapped with the org's seed key into a non-extractable AES session object (the seed
    key's unwrap template forces it), the payload is AES-GCM-decrypted by the token, and the CEK
    is destroyed. Only the payload (the DEK) comes back. ``ByokRefused`` names what failed."""
    return open_jwe(token, require(token, org_id, "seed"), encrypted_key, iv, ciphertext, tag,
                    aad)


def open_jwe(token: Token, ref: KeyRef, encrypted_key: bytes, iv: bytes, ciphertext: bytes,
             tag: bytes, aad: bytes, *, modulus_bytes: int = CIPHERTEXT_BYTES) -> bytes:
    """:func:`decrypt_jwe` with the unwrapping key ``ref`` given (its policy checked by the
    caller) and its modulus size (a BYOK key's is 4096 bits; the Wycheproof tests pass a
    vector's RSA-2048 key imported on a throw-away token)."""
    from hsm.core._cryptoki import gcm_params
    raw = token.module.raw

    def run(lease):
        h = lease.session.handle
        cek = _unwrap(token, lease, ref, encrypted_key, "sha1",
                      _secret_template("seed", kind="aes"), expected=modulus_bytes)
        try:
            params, _keep = gcm_params(iv, aad)
            rv = raw.operation_init("C_DecryptInit", h, M.AES_GCM, params, cek)
            if rv in (0x70, 0x71, 0x62):   # not an AES-256 CEK, or bad IV
                raise ByokRefused("the JWE content-encryption key or IV is not AES-256-GCM")
            check_rv(rv)
            rv, plain = raw.one_shot("C_Decrypt", h, ciphertext + tag)
            # SoftHSM2 2.6.1 answers a GCM tag that does not verify with CKR_GENERAL_ERROR.
            if rv in (0x40, 0x41, 0xC0, 0x5):
                raise ByokRefused("the JWE authentication tag does not verify (altered, or "
                                  "another header)")
            check_rv(rv)
            _require_256_bit_cek(token, lease, ref, encrypted_key, modulus_bytes)
            return plain
        finally:
            raw.destroy_object(h, cek)
    with translated("JWE decrypt", token.label, ref.label):
        return token.run("C_UnwrapKey+C_Decrypt(AES_GCM)", run, ref.label)
