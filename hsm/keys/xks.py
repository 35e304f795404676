"""AWS KMS external key store (XKS) keys in the token, and the AES-GCM the proxy runs on them.

An XKS key is an AES-256 token object labelled ``xks-<KEY_ID>`` (``KEY_ID`` is the
``externalKeyId`` AWS KMS sends: 1-128 of ``A-Za-z0-9._-``), generated inside the token under
:data:`hsm.keys.attributes.XKS_KEY`: sensitive, never extractable, not modifiable, not copyable,
``CKA_ALLOWED_MECHANISMS=[CKM_AES_GCM]``, with CKA_ENCRYPT / CKA_DECRYPT as its usage says. The
usage is what the proxy reports as ``keyUsage``, and the *token* refuses the other operation
(``CKR_KEY_FUNCTION_NOT_PERMITTED``), not only the proxy.

SoftHSM2 2.6.1 cannot generate a GCM IV itself (it ignores ``CKM_GCM`` IV generation), so each
encryption draws its 12-byte IV from the token's ``C_GenerateRandom`` and passes it in.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.core import ops
from hsm.core.errors import (DecryptionFailed, HsmError, KeyPolicyViolation, ObjectExists,
                             ObjectNotFound, UsageError, check_rv)
from hsm.core.profile import require_enforcement
from hsm.core.token import KeyRef, Token

from . import attributes

LABEL_PREFIX = "xks-"
ID_PREFIX = b"hsm-xks:"          # then 8 random bytes
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")   # the specification's externalKeyId
USAGES = ("encrypt", "decrypt")
IV_BYTES = 12
TAG_BYTES = 16
HEALTH_LABEL = "xks-health-check"   # a session object: the deep health check's test key


class KeyUsageRefused(HsmError):
    """The key does not allow this operation (its CKA_ENCRYPT / CKA_DECRYPT is false)."""


@dataclass(frozen=True)
class XksKey:
    key_id: str
    ref: KeyRef
    encrypt: bool
    decrypt: bool

    @property
    def usage(self) -> list[str]:
        """keyUsage as the specification spells it."""
        return [u for u, on in (("ENCRYPT", self.encrypt), ("DECRYPT", self.decrypt)) if on]


def label_of(key_id: str) -> str:
    if not KEY_ID.match(key_id or ""):
        raise UsageError(f"bad XKS key id {key_id!r}",
                         hint="1-128 characters of A-Z a-z 0-9 . _ - (the externalKeyId AWS "
                              "KMS will send)")
    return LABEL_PREFIX + key_id


def parse_usage(text: str) -> tuple[bool, bool]:
    """``encrypt,decrypt`` | ``encrypt`` | ``decrypt`` | ``none`` -> (encrypt, decrypt)."""
    parts = {p.strip().lower() for p in text.split(",") if p.strip()}
    if parts == {"none"}:
        return False, False
    bad = parts - set(USAGES)
    if bad or not parts:
        raise UsageError(f"--usage {text!r}: say encrypt, decrypt, encrypt,decrypt or none")
    return "encrypt" in parts, "decrypt" in parts


def create(token: Token, key_id: str, *, encrypt: bool = True, decrypt: bool = True,
           allow_weak_token: bool = False) -> tuple[XksKey, str]:
    """Generate the key; returns (key, 'created'|'exists'). An XKS key with this id and the same
    usage is reported, not made again; any other object with the label is refused."""
    label = label_of(key_id)
    require_enforcement(token, f"create XKS key {key_id}", allow_weak=allow_weak_token)
    existing = token.run("C_FindObjects", lambda lease: list(lease.session.get_objects(
        {Attribute.LABEL: label})), label)
    if existing:
        try:
            key = describe(token, key_id)
        except (KeyPolicyViolation, ObjectNotFound):
            key = None
        if key is None or (key.encrypt, key.decrypt) != (encrypt, decrypt):
            raise ObjectExists(f"an object labelled {label!r} exists and is not an XKS key with "
                               f"usage {_usage_text(encrypt, decrypt)}", token=token.label,
                               object_label=label, hint="choose another --id")
        return key, "exists"
    template = {**attributes.xks_key_attributes(encrypt, decrypt), Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE_LEN: 32, Attribute.LABEL: label,
                Attribute.ID: ID_PREFIX + secrets.token_bytes(8)}
    raw = token.module.raw

    def generate(lease):
        check_rv(raw.generate_key(lease.session.handle, Mechanism.AES_KEY_GEN, template)[0])
    token.run_on_anchor("C_GenerateKey", generate, label)
    return describe(token, key_id), "created"   # read back like every provisioned key


def describe(token: Token, key_id: str) -> XksKey:
    """The key read back from the token: its policy checked (a weaker object is refused, naming
    each attribute), AES-256, and its usage. Raises ObjectNotFound when there is none."""
    label = label_of(key_id)
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    raw = token.module.raw

    def read(lease):
        obj = lease.key(ref)
        found = attributes.deviations(raw, lease.session.handle, obj.handle, attributes.XKS_KEY)
        if obj[Attribute.KEY_TYPE] != KeyType.AES or obj[Attribute.VALUE_LEN] != 32:
            found.append("not an AES-256 key")
        return found, bool(obj[Attribute.ENCRYPT]), bool(obj[Attribute.DECRYPT])
    try:
        found, enc, dec = token.run("C_GetAttributeValue", read, label)
    except ObjectNotFound:
        raise ObjectNotFound(f"no XKS key {key_id!r} (label {label!r})", token=token.label,
                             object_label=label, hint="make it with `hsm xks-key create`"
                             ) from None
    if found:
        raise KeyPolicyViolation(f"{label!r} is weaker than the XKS key policy, refusing to "
                                 "serve it: " + "; ".join(found), token=token.label,
                                 object_label=label, hint=attributes.XKS_KEY.hint)
    return XksKey(key_id, ref, enc, dec)


def list_keys(token: Token) -> list[str]:
    """The key ids of every ``xks-*`` secret key on the token (one search)."""
    def scan(lease):
        return [str(o[Attribute.LABEL]) for o in lease.session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True})]
    return sorted(label[len(LABEL_PREFIX):] for label in token.run("C_FindObjects", scan)
                  if label.startswith(LABEL_PREFIX))


def _usage_text(encrypt: bool, decrypt: bool) -> str:
    return ",".join(u for u, on in zip(USAGES, (encrypt, decrypt)) if on) or "none"


# ------------------------------------------------------------------------------ AES-GCM
def random_iv(token: Token) -> bytes:
    return token.run("C_GenerateRandom", _random, None, IV_BYTES)


def _random(lease, n: int) -> bytes:
    return lease.session.generate_random(n * 8)


def encrypt(token: Token, key: XksKey, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
    """(iv, ciphertext, tag): AES-256-GCM in the token, the IV from the token's RNG."""
    if not key.encrypt:
        raise KeyUsageRefused(f"XKS key {key.key_id!r} may not encrypt", token=token.label,
                              object_label=key.ref.label)
    iv = random_iv(token)
    out = _refusing_usage(ops.aes_gcm_encrypt, token, key.ref, iv, plaintext, aad)
    return iv, out[:-TAG_BYTES], out[-TAG_BYTES:]


def decrypt(token: Token, key: XksKey, iv: bytes, ciphertext: bytes, tag: bytes,
            aad: bytes) -> bytes:
    """AES-256-GCM decryption in the token; a tag that does not verify raises
    :class:`hsm.core.errors.DecryptionFailed`."""
    if not key.decrypt:
        raise KeyUsageRefused(f"XKS key {key.key_id!r} may not decrypt", token=token.label,
                              object_label=key.ref.label)
    try:
        return token.run("C_Decrypt(AES_GCM)", _decrypt, key.ref.label, token.module.raw,
                         key.ref, iv, ciphertext + tag, aad)
    except HsmError as exc:
        if exc.ckr == "CKR_KEY_FUNCTION_NOT_PERMITTED":
            raise KeyUsageRefused(str(exc), token=exc.token, object_label=exc.object_label,
                                  ckr=exc.ckr, ckr_value=exc.ckr_value) from None
        if exc.ckr_value in _TAG_FAILURES:
            raise DecryptionFailed("AES-GCM authentication failed: wrong key, or the "
                                   "ciphertext, IV, tag or associated data was altered",
                                   operation=exc.operation, token=exc.token,
                                   object_label=exc.object_label, ckr=exc.ckr,
                                   ckr_value=exc.ckr_value) from None
        raise


# What a token answers to a GCM tag that does not verify: SoftHSM2 2.6.1 CKR_GENERAL_ERROR
# (measured), the standard CKR_ENCRYPTED_DATA_INVALID (LEN_RANGE for a short input,
# SIGNATURE_INVALID on some tokens).
_TAG_FAILURES = (0x5, 0x40, 0x41, 0xC0)


def _decrypt(lease, raw, ref: KeyRef, iv: bytes, data: bytes, aad: bytes) -> bytes:
    """Raw C_DecryptInit/C_Decrypt: python-pkcs11 0.10's GCMParams refuses IVs over 12 bytes,
    and AWS KMS may send 12- or 16-byte ones (the specification)."""
    from hsm.core._cryptoki import gcm_params
    h = lease.session.handle
    params, _keep = gcm_params(iv, aad)
    check_rv(raw.operation_init("C_DecryptInit", h, Mechanism.AES_GCM, params,
                                lease.key(ref).handle))
    rv, plain = raw.one_shot("C_Decrypt", h, data, out_max=max(len(data), 16))
    check_rv(rv)
    return plain


def _refusing_usage(fn, token, ref, *args):
    try:
        return fn(token, ref, *args)
    except DecryptionFailed:
        raise
    except HsmError as exc:   # the token's own refusal of the usage, should ours be bypassed
        if exc.ckr == "CKR_KEY_FUNCTION_NOT_PERMITTED":
            raise KeyUsageRefused(str(exc), token=exc.token, object_label=exc.object_label,
                                  ckr=exc.ckr, ckr_value=exc.ckr_value) from None
        raise


def health_key(token: Token) -> XksKey:
    """A fresh AES-256 session key for the deep health check (the specification asks for a test
    key, not a customer's key, so the health probe never shows up as use of a KMS key)."""
    ref = ops.generate_session_secret(token, kind="aes", usage="encrypt-decrypt",
                                      label=HEALTH_LABEL)
    return XksKey("health-check", ref, True, True)


def self_test(token: Token, key: XksKey) -> bool:
    """Encrypt and decrypt 32 random bytes in the token; True when the round trip holds."""
    probe = random_iv(token) + random_iv(token)
    iv, ct, tag = encrypt(token, key, probe, b"xks health")
    return decrypt(token, key, iv, ct, tag, b"xks health") == probe
