"""Per-org key-encryption keys (KEKs): AES-256 *token* objects the KMS replaces at every change
of an org's state, so that destroying the old one (``C_DestroyObject``) makes every older copy of
the org's rows useless, even to a holder of the user PIN.

Each KEK is generated in the token: sensitive, non-extractable, non-modifiable, non-copyable,
private, and usable only with ``CKM_AES_GCM`` (``CKA_ALLOWED_MECHANISMS``), for encrypt/decrypt
only. The token, not this code, refuses a PIN holder who asks to read, wrap, copy, re-purpose or
use it with another mechanism (tests/kms/node/test_sealing.py plays each).

Handles, not labels: SoftHSM2 2.6.1 walks every object on each ``C_FindObjects`` (172 ms at
10,000 objects), so the caller finds every KEK once (:func:`find_all`, one search) and keeps the
integer handles; a token object's handle is valid on every session of the process. Every KEK
carries the same ``CKA_ID`` (:data:`MARKER_ID`) so that one search finds them all and nothing
else; the label says whose it is.
"""

from __future__ import annotations

import random
import time

from pkcs11 import Attribute as A
from pkcs11 import KeyType
from pkcs11 import Mechanism as M
from pkcs11 import ObjectClass

from hsm.core._cryptoki import gcm_params
from hsm.core.errors import (DecryptionFailed, HsmError, KeyPolicyViolation, ObjectNotFound,
                             check_rv, from_rv)
from hsm.core.token import Token
from hsm.keys import attributes

MARKER_ID = b"hsm-suite kms org kek v1"
# What a token answers when the handle names an object that is gone (destroyed here or, for
# another process's view of the token, in that process).
_GONE = (0x82, 0x60)             # CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID
# What a token answers when an AES-GCM tag does not verify (SoftHSM2 2.6.1: GENERAL_ERROR).
_TAG_FAILED = (0x40, 0x41, 0x5)
_GENERAL_ERROR = 0x5
_GENERATE_ATTEMPTS = 4  # CKR_ENCRYPTED_DATA_INVALID / _LEN_RANGE, CKR_GENERAL_ERROR


class KekGone(ObjectNotFound):
    """The KEK's handle no longer names an object: it was destroyed (here or by another
    process), or the handle went stale with every session (C_CloseAllSessions). The caller
    looks it up by label once to tell which."""


def template(label: str) -> dict:
    return {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE_LEN: 32,
            A.TOKEN: True, A.PRIVATE: True, A.LABEL: label, A.ID: MARKER_ID,
            A.SENSITIVE: True, A.EXTRACTABLE: False, A.MODIFIABLE: False, A.COPYABLE: False,
            A.ALLOWED_MECHANISMS: [M.AES_GCM],
            A.ENCRYPT: True, A.DECRYPT: True, A.SIGN: False, A.VERIFY: False, A.WRAP: False,
            A.UNWRAP: False, A.DERIVE: False}


def generate(token: Token, label: str) -> int:
    """A new KEK as a token object; its handle.

    SoftHSM2 2.6.1 sometimes answers ``CKR_GENERAL_ERROR`` when two processes create token
    objects at the same moment (one reads the token directory while the other writes an object
    file), as it does for two logins. The label is new for each generation, so the retry is
    safe: a KEK the failed call made after all is found by its label and adopted, never made
    twice. Bounded and jittered; a lasting error surfaces."""
    raw = token.module.raw

    def gen(lease) -> int:
        rv, handle = raw.generate_key(lease.session.handle, M.AES_KEY_GEN, template(label))
        check_rv(rv)
        return handle
    for attempt in range(_GENERATE_ATTEMPTS):
        try:
            return token.run("C_GenerateKey(org KEK)", gen, label)
        except HsmError as exc:
            if exc.ckr_value != _GENERAL_ERROR or attempt == _GENERATE_ATTEMPTS - 1:
                raise
        time.sleep(random.uniform(0.005, 0.02 * (attempt + 1)))
        made = find(token, label)
        if made is not None:
            return made
    raise AssertionError("unreachable")


def find_all(token: Token) -> dict[int, str]:
    """Every KEK in the token, ``{handle: label}``: one C_FindObjects walk."""
    def find(lease) -> dict[int, str]:
        return {obj.handle: str(obj[A.LABEL]) for obj in lease.session.get_objects(
            {A.CLASS: ObjectClass.SECRET_KEY, A.TOKEN: True, A.ID: MARKER_ID})}
    return token.run("C_FindObjects(org KEKs)", find)


def find(token: Token, label: str) -> int | None:
    """The handle of one KEK by label (one walk: only when another process made it).

    A user-PIN holder can create an object with any label, CKA_ID and attributes: one that
    could be read out, wrapped out or copied before its destroy would undo the shredding, so
    an object under the label without the :data:`~hsm.keys.attributes.ORG_KEK` policy (made in
    the token, never extractable, not copyable, AES-GCM only) is refused
    (:class:`KeyPolicyViolation`), never used."""
    raw = token.module.raw

    def look(lease) -> list[tuple[int, list[str]]]:
        return [(obj.handle, attributes.deviations(raw, lease.session.handle, obj.handle,
                                                   attributes.ORG_KEK))
                for obj in lease.session.get_objects(
                    {A.CLASS: ObjectClass.SECRET_KEY, A.TOKEN: True, A.ID: MARKER_ID,
                     A.LABEL: label})]
    found = token.run("C_FindObjects(org KEK)", look, label)
    if len(found) > 1:
        raise HsmError(f"{len(found)} org KEKs share the label {label!r}", object_label=label)
    if not found:
        return None
    handle, weaker = found[0]
    if weaker:
        raise KeyPolicyViolation(
            f"the org KEK {label!r} was not made by this suite, refusing to use it: "
            + "; ".join(weaker), operation="org KEK lookup", token=token.label,
            object_label=label, hint=attributes.ORG_KEK.hint)
    return handle


def destroy(token: Token, handle: int, label: str) -> bool:
    """``C_DestroyObject``; False if it was gone already (another process destroyed it)."""
    raw = token.module.raw

    def run(lease) -> int:
        return raw.destroy_object(lease.session.handle, handle)
    rv = token.run("C_DestroyObject(org KEK)", run, label)
    if rv in _GONE:
        return False
    if rv:
        raise from_rv(rv, operation="C_DestroyObject(org KEK)", token=token.label,
                      object_label=label)
    return True


def _gcm(token: Token, function: str, handle: int, label: str, nonce: bytes, data: bytes,
         aad: bytes) -> bytes:
    raw = token.module.raw
    init = function + "Init"

    def run(lease) -> tuple[int, bytes | None]:
        params, _keep = gcm_params(nonce, aad)
        rv = raw.operation_init(init, lease.session.handle, M.AES_GCM, params, handle)
        if not rv:
            rv, out = raw.one_shot(function, lease.session.handle, data, out_max=len(data) + 64)
            if not rv:
                return rv, out
        # A lost session or login is Token.run's to recover (SoftHSM2 answers a private
        # object's handle with OBJECT_HANDLE_INVALID once the login is gone): raise it there.
        if rv not in _GONE + _TAG_FAILED or (rv in _GONE and not token.logged_in()):
            check_rv(rv)
        return rv, None
    rv, out = token.run(f"{function}(AES_GCM, org KEK)", run, label)
    if rv in _GONE:
        raise KekGone(f"the org key-encryption key {label!r} is no longer in the token",
                      operation=function, token=token.label, object_label=label)
    if function == "C_Decrypt" and rv in _TAG_FAILED:
        raise DecryptionFailed("AES-GCM authentication failed under the org key-encryption key",
                               operation=function, token=token.label, object_label=label)
    if rv:
        raise from_rv(rv, operation=f"{function}(AES_GCM)", token=token.label,
                      object_label=label)
    assert out is not None
    return out


def encrypt(token: Token, handle: int, label: str, nonce: bytes, plaintext: bytes,
            aad: bytes) -> bytes:
    """AES-256-GCM under the KEK: ciphertext || 16-byte tag."""
    return _gcm(token, "C_Encrypt", handle, label, nonce, plaintext, aad)


def decrypt(token: Token, handle: int, label: str, nonce: bytes, ciphertext: bytes,
            aad: bytes) -> bytes:
    """AES-256-GCM decryption under the KEK; :class:`DecryptionFailed` if the tag does not
    verify, :class:`KekGone` if the KEK is no longer in the token."""
    return _gcm(token, "C_Decrypt", handle, label, nonce, ciphertext, aad)
