"""Cryptographic operations on keys named by role/label, run on pooled sessions.

Each function picks its mechanism from the token's capability profile where there is a choice and
returns (or records) which one it used, so a bundle or a transcript can say exactly what was done.
All calls go through :meth:`Token.run`, which retries on a lost session and turns python-pkcs11
errors into :class:`hsm.core.errors.HsmError` naming the operation, token, object and CKR code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams

from suite import signatures

from .token import KeyRef, Token


@dataclass(frozen=True)
class Wrapped:
    """Wrapped key bytes and the exact mechanism (and parameters) that produced them."""

    data: bytes
    mechanism: str
    parameters: dict


def secret(label: str) -> KeyRef:
    return KeyRef(label, ObjectClass.SECRET_KEY)


def private(label: str) -> KeyRef:
    return KeyRef(label, ObjectClass.PRIVATE_KEY)


def public(label: str) -> KeyRef:
    return KeyRef(label, ObjectClass.PUBLIC_KEY)


# --------------------------------------------------------------------------- symmetric
# Hot paths call module-level functions with arguments (no closure per call) and bind the
# Mechanism members once: both showed up as microseconds against a 10-40 us token call.
_SHA256_HMAC = Mechanism.SHA256_HMAC
_AES_GCM = Mechanism.AES_GCM


def _sign_hmac(lease, key: KeyRef, data: bytes) -> bytes:
    return lease.key(key).sign(data, mechanism=_SHA256_HMAC)


def _gcm_encrypt(lease, key: KeyRef, data: bytes, params: GCMParams) -> bytes:
    return lease.key(key).encrypt(data, mechanism=_AES_GCM, mechanism_param=params)


def _gcm_decrypt(lease, key: KeyRef, data: bytes, params: GCMParams) -> bytes:
    return lease.key(key).decrypt(data, mechanism=_AES_GCM, mechanism_param=params)


def hmac_sha256(token: Token, key: KeyRef, data: bytes) -> bytes:
    return token.run("C_Sign(SHA256_HMAC)", _sign_hmac, key.label, key, data)


def aes_cmac(token: Token, key: KeyRef, data: bytes) -> bytes:
    """AES-CMAC (the 16-byte tag) in the token: a MAC that reveals no AES-ECB block of the key."""
    return token.run("C_Sign(AES_CMAC)", lambda lease: lease.key(key).sign(
        data, mechanism=Mechanism.AES_CMAC), key.label)


def aes_gcm_encrypt(token: Token, key: KeyRef, nonce: bytes, plaintext: bytes,
                    aad: bytes | None = None) -> bytes:
    """AES-GCM with a caller-chosen 96-bit nonce; returns ciphertext || 16-byte tag."""
    return token.run("C_Encrypt(AES_GCM)", _gcm_encrypt, key.label, key, plaintext,
                     GCMParams(nonce, aad))


# What a token answers when an AES-GCM tag does not verify: SoftHSM2 2.6.1 says
# CKR_GENERAL_ERROR (measured), the standard says CKR_ENCRYPTED_DATA_INVALID.
_GCM_TAG_FAILURES = ("CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE",
                     "CKR_GENERAL_ERROR")


def aes_gcm_decrypt(token: Token, key: KeyRef, nonce: bytes, ciphertext: bytes,
                    aad: bytes | None = None) -> bytes:
    """AES-GCM decryption inside the token; a tag that does not verify raises
    :class:`hsm.core.errors.DecryptionFailed` (a lost session still raises what it did)."""
    from .errors import DecryptionFailed, HsmError
    try:
        return token.run("C_Decrypt(AES_GCM)", _gcm_decrypt, key.label, key, ciphertext,
                         GCMParams(nonce, aad))
    except DecryptionFailed:
        raise
    except HsmError as exc:
        if exc.ckr not in _GCM_TAG_FAILURES:
            raise
        raise DecryptionFailed("AES-GCM authentication failed: wrong key, or the ciphertext, "
                               "tag or associated data was altered", operation=exc.operation,
                               token=exc.token, object_label=exc.object_label, ckr=exc.ckr,
                               ckr_value=exc.ckr_value) from None


def generate_session_key(token: Token, key_type: KeyType, bits: int | None, label: str,
                         capabilities: MechanismFlag, *, extractable: bool = False,
                         on_anchor: bool = True, template: dict | None = None):
    """A sensitive session-object key. On the anchor session by default, because a session
    object dies with the session that created it and worker sessions come and go."""
    tpl = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: extractable}
    tpl.update(template or {})

    def gen(lease):
        return lease.session.generate_key(key_type, bits, label=label, store=False,
                                          capabilities=capabilities, template=tpl)
    runner = token.run_on_anchor if on_anchor else token.run
    return runner("C_GenerateKey", gen, label)


# --------------------------------------------------------------------------- wrapping
def aes_wrap(token: Token, wrapping_key: KeyRef, key: KeyRef) -> Wrapped:
    """Wrap ``key`` under an AES key with the best AES key-wrap the token has (RFC 5649 first)."""
    name, mech = token.profile.aes_wrap_choice()
    if token.profile.kwp_length_query_short and name == "AES_KEY_WRAP_KWP":
        from .nss import wrap_key_kwp
        data = token.run(f"C_WrapKey({name})", lambda lease: wrap_key_kwp(
            lease.session, lease.key(wrapping_key), lease.key(key), token.module.path),
            key.label)
    else:
        data = token.run(f"C_WrapKey({name})",
                         lambda lease: lease.key(wrapping_key).wrap_key(lease.key(key),
                                                                        mechanism=mech),
                         key.label)
    return Wrapped(data, name, {"code": f"0x{int(mech):x}"})


def aes_unwrap(token: Token, unwrapping_key: KeyRef, wrapped: bytes, *, key_type: KeyType,
               label: str, capabilities: MechanismFlag, template: dict | None = None,
               on_anchor: bool = False):
    """Unwrap into a sensitive, non-extractable session object (on the anchor if it must
    outlive the call)."""
    name, mech = token.profile.aes_wrap_choice()
    tpl = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, **(template or {})}

    def unwrap(lease):
        return lease.key(unwrapping_key).unwrap_key(
            ObjectClass.SECRET_KEY, key_type, wrapped, label=label, mechanism=mech,
            store=False, capabilities=capabilities, template=tpl)
    runner = token.run_on_anchor if on_anchor else token.run
    return runner(f"C_UnwrapKey({name})", unwrap, label)


def rsa_oaep_wrap(token: Token, wrapping_key: KeyRef, key: KeyRef) -> Wrapped:
    hash_name, params = token.profile.oaep_choice()
    data = token.run("C_WrapKey(RSA_PKCS_OAEP)",
                     lambda lease: lease.key(wrapping_key).wrap_key(
                         lease.key(key), mechanism=Mechanism.RSA_PKCS_OAEP,
                         mechanism_param=params), key.label)
    return Wrapped(data, "RSA_PKCS_OAEP", {"hash": hash_name, "mgf": f"mgf1-{hash_name}",
                                           "label": ""})


def rsa_oaep_unwrap(token: Token, unwrapping_key: KeyRef, wrapped: Wrapped | bytes, *,
                    key_type: KeyType, label: str, capabilities: MechanismFlag,
                    template: dict | None = None, on_anchor: bool = False):
    """Unwrap an RSA-OAEP blob into a sensitive, non-extractable session object.

    The hash comes from the Wrapped record when given (what the sender used), else the profile.
    """
    if isinstance(wrapped, Wrapped):
        hash_name = wrapped.parameters.get("hash", "sha1")
        params = _oaep_params(hash_name)
        data = wrapped.data
    else:
        _, params = token.profile.oaep_choice()
        data = wrapped
    tpl = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, **(template or {})}

    def unwrap(lease):
        return lease.key(unwrapping_key).unwrap_key(
            ObjectClass.SECRET_KEY, key_type, data, label=label,
            mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params, store=False,
            capabilities=capabilities, template=tpl)
    runner = token.run_on_anchor if on_anchor else token.run
    return runner("C_UnwrapKey(RSA_PKCS_OAEP)", unwrap, label)


def _oaep_params(hash_name: str) -> tuple:
    table = {"sha1": (Mechanism.SHA_1, MGF.SHA1), "sha256": (Mechanism.SHA256, MGF.SHA256),
             "sha384": (Mechanism.SHA384, MGF.SHA384), "sha512": (Mechanism.SHA512, MGF.SHA512)}
    hash_mech, mgf = table[hash_name]
    return (hash_mech, mgf, None)


# --------------------------------------------------------------------------- signatures
# The identifiers certificates and bundles carry, by the names sign() takes (token-free, for
# release): re-exported here at their old path.
SIGNATURE_ALGORITHMS = signatures.SIGNATURE_ALGORITHMS


def ecdsa_der(raw: bytes) -> bytes:
    """The token's ECDSA signature ``r || s`` (PKCS#11, P1363) as the DER ``SEQUENCE {r, s}``
    X.509 and CMS carry. cryptography's encoder: ~1 µs against asn1crypto's ~11 µs (measured),
    which was a third of each audit checkpoint's signature."""
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                int.from_bytes(raw[half:], "big"))


def sign(token: Token, key: KeyRef, signature: str, data: bytes) -> bytes:
    """Sign ``data`` with a signing role's private key; returns the X.509/CMS encoding.

    ECDSA: SoftHSM2 has only raw CKM_ECDSA, so we hash on the host unless the profile shows
    CKM_ECDSA_SHA384; the token's r||s output is DER-encoded as X.509 and CMS expect.
    """
    if signature == "ecdsa-sha256":   # the audit key's CKA_ALLOWED_MECHANISMS is raw ECDSA only
        raw = token.run("C_Sign(ECDSA)", lambda lease: lease.key(key).sign(
            hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA), key.label)
        return ecdsa_der(raw)
    if signature == "ecdsa-sha384":
        if token.profile.ecdsa_with_hash:
            raw = token.run("C_Sign(ECDSA_SHA384)", lambda lease: lease.key(key).sign(
                data, mechanism=Mechanism.ECDSA_SHA384), key.label)
        else:
            digest = hashlib.sha384(data).digest()
            raw = token.run("C_Sign(ECDSA)", lambda lease: lease.key(key).sign(
                digest, mechanism=Mechanism.ECDSA), key.label)
        return ecdsa_der(raw)
    if signature == "rsa-pss-sha384":
        token.profile.require(Mechanism.SHA384_RSA_PKCS_PSS, "RSA-PSS signing")
        return token.run("C_Sign(SHA384_RSA_PKCS_PSS)", lambda lease: lease.key(key).sign(
            data, mechanism=Mechanism.SHA384_RSA_PKCS_PSS,
            mechanism_param=(Mechanism.SHA384, MGF.SHA384, 48)), key.label)
    raise ValueError(f"unknown signature scheme {signature!r}")


# --------------------------------------------------------------------------- by name, for kms/
# kms/ and ceremony/ do not import pkcs11; they name key kinds and usages with strings.
_KINDS = {"generic-secret": KeyType.GENERIC_SECRET, "aes": KeyType.AES}
_USAGES = {"sign": MechanismFlag.SIGN,
           "encrypt-decrypt": MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
           "wrap-unwrap": MechanismFlag.WRAP | MechanismFlag.UNWRAP}


def unwrap_release_secret(token: Token, unwrapping_key: KeyRef, wrapped: Wrapped, *, kind: str,
                          usage: str, label: str, escrow: bool = False
                          ) -> tuple[KeyRef, str, bytes]:
    """RSA-OAEP unwrap into a session object on the anchor (it must outlive the call) with
    exactly ``usage`` plus SIGN for its check value; one private-key operation. Returns the
    key's reference and its check value, computed on the handle the unwrap returned.

    The template is the unwrapping key's own CKA_UNWRAP_TEMPLATE (hsm.keys.attributes): sensitive,
    non-extractable and limited to the KMS's mechanisms on a regional token; with ``escrow``, the
    primary's escrow template (extractable only under CKA_WRAP_WITH_TRUSTED). The token refuses
    any other template, so asking for less here would fail, and asking for more is impossible."""
    from hsm.keys import attributes
    from hsm.keys.export import check_value_of

    from ._cryptoki import CK_RSA_PKCS_OAEP_PARAMS
    from .errors import check_rv
    hash_mech, mgf, _ = _oaep_params(wrapped.parameters.get("hash", "sha1"))
    params = CK_RSA_PKCS_OAEP_PARAMS(int(hash_mech), int(mgf), 1, None, 0)  # CKZ_DATA_SPECIFIED
    forced = attributes.ESCROW_UNWRAP_TEMPLATE if escrow else attributes.REGIONAL_UNWRAP_TEMPLATE
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: _KINDS[kind],
           Attribute.LABEL: label, **_only(_USAGES[usage] | MechanismFlag.SIGN), **forced}
    ref = secret(label)
    raw = token.module.raw

    def unwrap(lease):
        rv, _ = raw.unwrap_key(lease.session.handle, Mechanism.RSA_PKCS_OAEP, params,
                               lease.key(unwrapping_key).handle, wrapped.data, tpl)
        check_rv(rv)
        lease.objects.pop(ref, None)
        return check_value_of(lease.key(ref), kind)
    method, kcv = token.run_on_anchor("C_UnwrapKey(RSA_PKCS_OAEP)", unwrap, label)
    return ref, method, kcv


def destroy_session_secrets(token: Token, label_prefix: str) -> int:
    """Destroy this application's session secret keys whose label starts with the prefix
    (one search, not one per key); returns how many."""
    def sweep(lease):
        found = [o for o in lease.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                       Attribute.TOKEN: False})
                 if str(o[Attribute.LABEL]).startswith(label_prefix)]
        for obj in found:
            obj.destroy()
        lease.objects.clear()
        return len(found)
    return token.run_on_anchor("C_DestroyObject", sweep, label_prefix)


_SESSION_SECRET_MECHANISMS = {"sign": {"generic-secret": (Mechanism.SHA256_HMAC,)},
                              "encrypt-decrypt": {"aes": (Mechanism.AES_GCM,)}}
_KEYGEN = {"generic-secret": Mechanism.GENERIC_SECRET_KEY_GEN, "aes": Mechanism.AES_KEY_GEN}


def generate_session_secret(token: Token, *, kind: str, usage: str, label: str) -> KeyRef:
    """A fresh session key on the anchor: sensitive, non-extractable, non-modifiable, with
    exactly ``usage`` and only the one mechanism the KMS uses it with (HMAC-SHA256 for a
    generic secret that signs, AES-GCM for an AES key)."""
    from .errors import check_rv
    mechanisms = _SESSION_SECRET_MECHANISMS[usage][kind]
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: _KINDS[kind],
           Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.LABEL: label,
           Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False,
           Attribute.COPYABLE: False, Attribute.ALLOWED_MECHANISMS: list(mechanisms),
           **_only(_USAGES[usage])}
    raw = token.module.raw

    def gen(lease):
        check_rv(raw.generate_key(lease.session.handle, _KEYGEN[kind], tpl)[0])
    token.run_on_anchor("C_GenerateKey", gen, label)
    return secret(label)


def destroy_session_object(token: Token, ref: KeyRef) -> None:
    def destroy(lease):
        for obj in lease.session.get_objects({**ref.template(), Attribute.TOKEN: False}):
            obj.destroy()
        lease.objects.pop(ref, None)
    token.run_on_anchor("C_DestroyObject", destroy, ref.label)


def _only(caps: MechanismFlag) -> dict:
    """Explicit false for every usage not granted (tokens' defaults vary)."""
    flags = {Attribute.SIGN: MechanismFlag.SIGN, Attribute.VERIFY: MechanismFlag.VERIFY,
             Attribute.ENCRYPT: MechanismFlag.ENCRYPT, Attribute.DECRYPT: MechanismFlag.DECRYPT,
             Attribute.WRAP: MechanismFlag.WRAP, Attribute.UNWRAP: MechanismFlag.UNWRAP,
             Attribute.DERIVE: MechanismFlag.DERIVE}
    return {attr: bool(caps & flag) for attr, flag in flags.items()}
