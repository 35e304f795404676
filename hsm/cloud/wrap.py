"""The wraps, all inside the token: RSA-OAEP of the cloud key, and RSA-AES (RFC 5649 KWP of the
cloud key under an ephemeral AES-256 key, then RSA-OAEP of that key) to a trusted import key.

The cloud key is CKA_WRAP_WITH_TRUSTED, so whatever wraps it must be CKA_TRUSTED - the
ephemeral key of the composed RSA-AES wrap included - and only the SO can set CKA_TRUSTED
(SoftHSM2 2.6.1 answers CKR_ATTRIBUTE_READ_ONLY to a user who asks for it in C_GenerateKey,
C_CreateObject or C_UnwrapKey, and an unwrap template that grants it gives
CKR_TEMPLATE_INCONSISTENT). The route the token allows, measured on 2.6.1 (:func:`composed`):

1. a session of its own, ``C_Login(SO)``; the SO generates the ephemeral key as a *public session*
   object, CKA_TRUSTED, sensitive, WRAP only, extractable only under trusted keys (the SO
   cannot create private objects, and private session objects die at C_Logout anyway);
2. ``C_Logout`` (that session stays open); the user logs in (``Token.open``): public session
   objects survive a logout and are visible to every session of the application, and the
   private cloud key is visible again;
3. ``C_WrapKey(KWP)`` of the cloud key under the ephemeral key, ``C_WrapKey(RSA_PKCS_OAEP)`` of
   the ephemeral key under the trusted provider key; ``C_DestroyObject`` of the ephemeral key;
   the user's logout; ``C_CloseSession`` of the SO's session (which would destroy it anyway).

The ephemeral key exists only in this process's session, never leaves the token in the clear,
and can neither encrypt nor be wrapped by an untrusted key. So the composed route needs the SO
PIN as well as the user PIN; a token with CKM_RSA_AES_KEY_WRAP (profile ``rsa_aes_key_wrap``)
does it in one call with only the user PIN (:func:`rsa_aes_native`).
"""

from __future__ import annotations

from pkcs11 import MGF, Attribute, KeyType, Mechanism

from hsm.core import _cryptoki
from hsm.core.errors import from_rv
from hsm.core.pin import Pin
from hsm.core.token import KeyRef, Token
from hsm.keys import attributes

CKM_RSA_AES_KEY_WRAP = 0x1054
_HASHES = {"sha1": (Mechanism.SHA_1, MGF.SHA1), "sha256": (Mechanism.SHA256, MGF.SHA256)}
EPHEMERAL_LABEL = "hsm-suite-cloud-ephemeral"


def oaep_params(hash_name: str) -> _cryptoki.CK_RSA_PKCS_OAEP_PARAMS:
    """OAEP with MGF1 of the same hash and an empty label, as every provider documents."""
    hash_mech, mgf = _HASHES[hash_name]
    return _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(hash_mech), int(mgf), 1, None, 0)


def _checked(rv: int, data, operation: str, token: str, label: str):
    if rv != 0:
        raise from_rv(rv, operation=operation, token=token, object_label=label)
    return data


def oaep(token: Token, import_key: KeyRef, key: KeyRef, hash_name: str) -> bytes:
    """RSA-OAEP of the cloud key under the provider key, one C_WrapKey (user PIN only)."""
    from hsm.core.errors import check_rv
    raw = token.module.raw

    def wrap(lease):
        rv, data = raw.wrap_key(lease.session.handle, Mechanism.RSA_PKCS_OAEP,
                                oaep_params(hash_name), lease.key(import_key).handle,
                                lease.key(key).handle)
        check_rv(rv)
        return data
    return token.run("C_WrapKey(RSA_PKCS_OAEP)", wrap, key.label)


def rsa_aes_native(token: Token, import_key: KeyRef, key: KeyRef, hash_name: str) -> bytes:
    """The token's own CKM_RSA_AES_KEY_WRAP (PKCS#11 v2.40 §2.1.21): it makes and discards the
    ephemeral AES-256 key itself. Not exercised here: neither SoftHSM2 2.6.1 nor NSS 3.87 has
    the mechanism."""
    from hsm.core.errors import check_rv
    raw = token.module.raw
    inner = oaep_params(hash_name)
    params = _cryptoki.CK_RSA_AES_KEY_WRAP_PARAMS(256, _cryptoki.ctypes.pointer(inner))

    def wrap(lease):
        rv, data = raw.wrap_key(lease.session.handle, CKM_RSA_AES_KEY_WRAP, params,
                                lease.key(import_key).handle, lease.key(key).handle)
        check_rv(rv)
        return data
    return token.run("C_WrapKey(RSA_AES_KEY_WRAP)", wrap, key.label)


def composed(mod, p11token, so_pin: Pin, reopen, import_key: KeyRef, key: KeyRef,
             hash_name: str, kwp: int) -> bytes:
    """RSA-AES composed from KWP and RSA-OAEP (see the module text).

    ``reopen()`` opens the user's :class:`Token` again. No Token may be logged in to this token
    in this process when this is called: login is per application, and the SO logs in first on
    a session of its own, which stays open (with the ephemeral key) while the user works."""
    raw = mod.raw
    label = p11token.label
    session = p11token.open(rw=True)
    h = session.handle
    try:
        _checked(raw.login(h, so_pin.reveal().encode(), _cryptoki.CKU_SO), None,
                 "C_Login(SO)", label, EPHEMERAL_LABEL)
        template = {**attributes.cloud_ephemeral(kwp).creation_attributes(
                        attributes.cloud_mechanisms(kwp)),
                    Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE_LEN: 32,
                    Attribute.LABEL: EPHEMERAL_LABEL}
        rv, ephemeral = raw.generate_key(h, Mechanism.AES_KEY_GEN, template)
        if rv != 0:
            raw.logout(h)
        _checked(rv, None, "C_GenerateKey(ephemeral, SO)", label, EPHEMERAL_LABEL)
        raw.logout(h)  # public session objects survive C_Logout; the session stays open
        with reopen() as token:
            return token.run("C_WrapKey(KWP, RSA_PKCS_OAEP)", _wrap_twice, key.label,
                             raw, import_key, key, ephemeral, hash_name, kwp)
    finally:
        raw.close_session(h)  # the ephemeral key, if still there, dies with its session


def _wrap_twice(lease, raw, import_key: KeyRef, key: KeyRef, ephemeral: int, hash_name: str,
                kwp: int) -> bytes:
    """KWP of the cloud key under the ephemeral key, OAEP of the ephemeral key under the
    provider key, then the ephemeral key destroyed: ciphertext = OAEP part || KWP part."""
    from hsm.core.errors import check_rv
    h = lease.session.handle
    rv, wrapped_key = raw.wrap_key(h, kwp, None, ephemeral, lease.key(key).handle)
    check_rv(rv)
    rv, wrapped_aes = raw.wrap_key(h, Mechanism.RSA_PKCS_OAEP, oaep_params(hash_name),
                                   lease.key(import_key).handle, ephemeral)
    check_rv(rv)
    check_rv(raw.destroy_object(h, ephemeral))
    return wrapped_aes + wrapped_key
