"""The encryption-service SDK: encrypt and decrypt a tenant's fields and records with AES-256-GCM.

``FieldEncryptor(provider)`` takes its DEKs from a *provider* (the regional KMS, normally through
its encrypted key cache) with two methods:

* ``dek_for_encrypt(org_id, key_type) -> (version, derivation, dek)``: the active key;
* ``dek_for_decrypt(org_id, key_type, version) -> dek``: any version still held (archived
  versions included); raises ``kms.errors.KeyDestroyed`` or ``kms.errors.UnknownTenant``.

Ciphertext format (all integers big-endian)::

    header = b"HSF"                      magic
             u8   format version         (1)
             u16  len ‖ org id           UTF-8
             u8   len ‖ key type         ASCII, one of kms.key_rules.KEY_TYPES
             u32  key version
             u8   derivation mode        1 = PBKDF2, 2 = NONE
             12 B nonce                  random (96 bits)
    blob   = header ‖ AES-256-GCM(dek, nonce, plaintext, aad = header ‖ caller aad)  (ciphertext ‖ 16-byte tag)

The whole header is authenticated, so no field of it (tenant, key type, version, derivation) can be
changed without decryption failing. The header names the key version, so data written before a
rotation decrypts with the archived key; if that key was destroyed, decryption fails with
``KeyDestroyed("key destroyed: ...")`` naming the org, key type and version.

Records: ``encrypt_record`` encrypts each field separately with one DEK fetch per record; the
field's name is part of that field's associated data (so a value moved to another field fails),
and a one-byte type marker inside the ciphertext brings ``str`` values back as ``str``. To bind
fields to one record as well (so a value cannot move between two records of the same tenant), pass
the record's id as ``aad``.

Nonces are random: keep a DEK under 2**32 encryptions (NIST SP 800-38D §8.3); tenant keys rotate
far sooner than that in practice.
"""

from __future__ import annotations

import struct
from os import urandom as _urandom
from functools import lru_cache
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import key_rules
from kms.errors import (AuthenticationFailed, CiphertextError, KeyDestroyed,
                        MalformedCiphertext, TenantMismatch, UnsupportedFormat)

__all__ = [
    "FieldEncryptor", "Header", "parse_header",
    "CiphertextError", "MalformedCiphertext", "UnsupportedFormat", "TenantMismatch",
    "AuthenticationFailed",
    "MAGIC", "FORMAT_VERSION",
]

MAGIC = b"HSF"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
DERIVATION_CODES = {"PBKDF2": 1, "NONE": 2}
DERIVATION_NAMES = {v: k for k, v in DERIVATION_CODES.items()}
assert set(DERIVATION_CODES) == set(key_rules.DERIVATIONS)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# magic(3) version(1) orglen(2) org(>=1) ktlen(1) kt(>=1) keyversion(4) derivation(1) nonce(12)
_MIN_HEADER = 3 + 1 + 2 + 1 + 1 + 1 + 4 + 1 + NONCE_BYTES

_STR_MARK = b"\x01"
_BYTES_MARK = b"\x00"


# --------------------------------------------------------------------------- header
class Header(NamedTuple):
    format_version: int
    org_id: str
    key_type: str
    key_version: int
    derivation: str
    nonce: bytes
    length: int  # bytes of header in the blob (the AES-GCM part starts here)


@lru_cache(maxsize=4096)
def _header_prefix(org_id: str, key_type: str, version: int, derivation: str) -> bytes:
    """Everything of the header but the nonce (memoised: it holds no secret)."""
    if not isinstance(org_id, str) or not org_id:
        raise TypeError("org_id must be a non-empty str")
    org = org_id.encode("utf-8")
    if len(org) > 0xFFFF:
        raise ValueError("org_id is longer than 65535 bytes in UTF-8")
    if key_type not in key_rules.KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r} (known: {', '.join(key_rules.KEY_TYPES)})")
    kt = key_type.encode("ascii")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= 0xFFFFFFFF:
        raise ValueError(f"key version must be an int in [0, 2**32), got {version!r}")
    try:
        code = DERIVATION_CODES[derivation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown derivation mode {derivation!r} "
                         f"(known: {', '.join(DERIVATION_CODES)})") from None
    return b"".join((MAGIC, bytes((FORMAT_VERSION,)), _U16.pack(len(org)), org,
                     bytes((len(kt),)), kt, _U32.pack(version), bytes((code,))))


def parse_header(blob: bytes) -> Header:
    """Parse and check an HSF header (no key needed; nothing here is authenticated yet)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"ciphertext must be bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    n = len(blob)
    if n < 4:
        raise MalformedCiphertext(f"ciphertext truncated: {n} bytes, not even an HSF header")
    if blob[:3] != MAGIC:
        raise MalformedCiphertext("not an HSF field ciphertext (bad magic)",
                                  hint="was this value encrypted by kms.caller.sdk?")
    if blob[3] != FORMAT_VERSION:
        raise UnsupportedFormat(f"HSF format version {blob[3]} is not supported "
                                f"(this SDK reads version {FORMAT_VERSION})",
                                hint="upgrade the SDK that reads this data")
    if n < _MIN_HEADER:
        raise MalformedCiphertext(f"ciphertext truncated: {n} bytes, shorter than any HSF header")
    pos = 4
    (org_len,) = _U16.unpack_from(blob, pos)
    pos += 2
    if org_len == 0 or pos + org_len + 1 > n:
        raise MalformedCiphertext("ciphertext truncated or garbled: bad org id length")
    try:
        org_id = blob[pos:pos + org_len].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCiphertext("ciphertext garbled: org id is not UTF-8") from None
    pos += org_len
    kt_len = blob[pos]
    pos += 1
    if kt_len == 0 or pos + kt_len + 4 + 1 + NONCE_BYTES > n:
        raise MalformedCiphertext("ciphertext truncated or garbled: bad key type length")
    key_type = blob[pos:pos + kt_len].decode("ascii", "replace")
    if key_type not in key_rules.KEY_TYPES:
        raise MalformedCiphertext(f"ciphertext garbled: unknown key type {key_type!r}")
    pos += kt_len
    (version,) = _U32.unpack_from(blob, pos)
    pos += 4
    derivation = DERIVATION_NAMES.get(blob[pos])
    if derivation is None:
        raise MalformedCiphertext(f"ciphertext garbled: unknown derivation mode code {blob[pos]}")
    pos += 1
    nonce = blob[pos:pos + NONCE_BYTES]
    pos += NONCE_BYTES
    return Header(FORMAT_VERSION, org_id, key_type, version, derivation, nonce, pos)


def _field_aad(name: str, aad: bytes) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"record field names must be str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    return b"field\x00" + _U32.pack(len(raw)) + raw + aad


# --------------------------------------------------------------------------- the SDK
class FieldEncryptor:
    """Encrypt / decrypt a tenant's fields and records with DEKs from ``provider``."""

    def __init__(self, provider):
        for name in ("dek_for_encrypt", "dek_for_decrypt"):
            if not callable(getattr(provider, name, None)):
                raise TypeError(f"provider has no {name}() method")
        self._provider = provider

    # ------------------------------------------------------------------ fields
    def encrypt(self, org_id: str, plaintext: bytes, *, key_type: str = "field",
                aad: bytes = b"") -> bytes:
        version, derivation, dek = self._provider.dek_for_encrypt(org_id, key_type)
        prefix = _header_prefix(org_id, key_type, version, derivation)
        nonce = _urandom(NONCE_BYTES)
        header = prefix + nonce
        return header + AESGCM(dek).encrypt(nonce, plaintext, header + aad if aad else header)

    def decrypt(self, org_id: str, blob: bytes, *, aad: bytes = b"") -> bytes:
        header = self._check(org_id, blob)
        dek = self._dek(org_id, header)
        return self._open(AESGCM(dek), header, blob, aad)

    # ------------------------------------------------------------------ records
    def encrypt_record(self, org_id: str, record: dict, *, key_type: str = "field",
                       aad: bytes = b"") -> dict[str, bytes]:
        """Encrypt every field of ``record`` (``str`` or ``bytes`` values), one DEK for the record."""
        version, derivation, dek = self._provider.dek_for_encrypt(org_id, key_type)
        prefix = _header_prefix(org_id, key_type, version, derivation)
        aead = AESGCM(dek)
        out: dict[str, bytes] = {}
        for name, value in record.items():
            if isinstance(value, str):
                data = _STR_MARK + value.encode("utf-8")
            elif isinstance(value, (bytes, bytearray, memoryview)):
                data = _BYTES_MARK + bytes(value)
            else:
                raise TypeError(f"record field {name!r}: value must be str or bytes, "
                                f"not {type(value).__name__}")
            nonce = _urandom(NONCE_BYTES)
            header = prefix + nonce
            out[name] = header + aead.encrypt(nonce, data, header + _field_aad(name, aad))
        return out

    def decrypt_record(self, org_id: str, record: dict, *, aad: bytes = b"") -> dict:
        """Decrypt every field of a record made by :meth:`encrypt_record` (str values come back str)."""
        out: dict = {}
        aeads: dict[tuple, AESGCM] = {}
        for name, blob in record.items():
            header = self._check(org_id, blob)
            ident = (header.key_type, header.key_version)
            aead = aeads.get(ident)
            if aead is None:
                aead = aeads[ident] = AESGCM(self._dek(org_id, header))
            data = self._open(aead, header, blob, _field_aad(name, aad))
            mark, body = data[:1], data[1:]
            if mark == _STR_MARK:
                out[name] = body.decode("utf-8")
            elif mark == _BYTES_MARK:
                out[name] = body
            else:  # authenticated, so only a blob not made by encrypt_record gets here
                raise MalformedCiphertext(f"record field {name!r} was not encrypted by encrypt_record")
        return out

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check(org_id: str, blob) -> Header:
        header = parse_header(blob)
        if header.org_id != org_id:
            raise TenantMismatch(f"ciphertext belongs to org {header.org_id!r}, not {org_id!r}",
                                 hint="data of one tenant is never decrypted with another's keys")
        if len(blob) - header.length < TAG_BYTES:
            raise MalformedCiphertext(f"ciphertext truncated: {len(blob) - header.length} bytes "
                                      f"after the header, less than the {TAG_BYTES}-byte tag")
        return header

    def _dek(self, org_id: str, header: Header) -> bytes:
        try:
            return self._provider.dek_for_decrypt(org_id, header.key_type, header.key_version)
        except KeyDestroyed as exc:
            raise KeyDestroyed(
                f"key destroyed: org {org_id!r}, key type {header.key_type!r}, "
                f"version {header.key_version}; data encrypted under it cannot be decrypted",
                hint="the tenant secret was destroyed (crypto-shredding): this is by design "
                     "and cannot be undone") from exc

    @staticmethod
    def _open(aead: AESGCM, header: Header, blob, aad: bytes) -> bytes:
        blob = bytes(blob)
        head = blob[:header.length]
        try:
            return aead.decrypt(header.nonce, blob[header.length:], head + aad if aad else head)
        except InvalidTag:
            raise AuthenticationFailed(
                f"authentication failed for org {header.org_id!r} key {header.key_type!r} "
                f"v{header.key_version}: the ciphertext was altered, or the aad or field name "
                "differs from the one used to encrypt") from None
