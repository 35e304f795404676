"""Secrets made to leave the token only under trusted keys, and the trusted keys themselves.

A secret generated here is sensitive and extractable *only* under CKA_WRAP_WITH_TRUSTED: the
token itself refuses to wrap it with any key the security officer did not mark CKA_TRUSTED, and
only the SO can create such a key (SoftHSM2 refuses to set CKA_TRUSTED afterwards). So "exported
only to SO-approved regional keys" is enforced by the token, not by this code.

Every function is idempotent for the ceremony's resume: an object that already carries the
expected label *and* CKA_ID was made by an earlier, interrupted run of the same ceremony and is
adopted after its attributes are re-checked; an object with the label but another id is refused.
"""

from __future__ import annotations

import hashlib
import hmac

from asn1crypto import keys
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from .errors import KeyPolicyViolation, ObjectExists, translated
from .token import KeyRef, Token

KCV_LABEL = b"hsm-suite key check value"
STATE_LABEL = "hsm-suite-release-state"

SECRET_REQUIRED = {
    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True, Attribute.LOCAL: True,
    Attribute.ALWAYS_SENSITIVE: True,
}


def _find(lease, template: dict) -> list:
    return list(lease.session.get_objects(template))


def secret_template(kind: str, label: str, key_id: bytes) -> tuple[KeyType, int, dict]:
    """Template for a release secret: 'generic-secret' (HMAC seed) or 'aes'. Each gets the
    single usage its key check value needs (SIGN for HMAC, ENCRYPT for AES-ECB) and no other."""
    base = {Attribute.LABEL: label, Attribute.ID: key_id, **SECRET_REQUIRED}
    del base[Attribute.LOCAL], base[Attribute.ALWAYS_SENSITIVE]  # read back, not requested
    usages = {a: False for a in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN,
                                 Attribute.VERIFY, Attribute.WRAP, Attribute.UNWRAP,
                                 Attribute.DERIVE)}
    if kind == "generic-secret":
        usages[Attribute.SIGN] = True
        return KeyType.GENERIC_SECRET, 256, {**base, **usages}
    if kind == "aes":
        usages[Attribute.ENCRYPT] = True
        return KeyType.AES, 256, {**base, **usages}
    raise ValueError(f"unknown secret kind {kind!r}")


def ensure_secret(token: Token, kind: str, label: str, key_id: bytes) -> str:
    """Generate the secret as a token object unless an earlier run of this ceremony did.
    Returns 'created' or 'adopted'."""
    key_type, bits, template = secret_template(kind, label, key_id)
    existing = token.run("C_FindObjects", _find, label, {Attribute.LABEL: label})
    if existing:
        if len(existing) != 1 or existing[0][Attribute.ID] != key_id:
            raise ObjectExists(f"an object labelled {label!r} exists and was not made by this "
                               "ceremony (its CKA_ID differs)", token=token.label,
                               object_label=label, hint="release labels are never reused")
        status = "adopted"
    else:
        def generate(lease):
            with translated("C_GenerateKey", token.label, label):
                return lease.session.generate_key(key_type, bits, store=True, template=template)
        token.run_on_anchor("C_GenerateKey", generate, label)
        status = "created"
    check_secret(token, label)
    return status


def check_secret(token: Token, label: str) -> dict:
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    values = token.run("C_GetAttributeValue",
                       lambda lease: lease.key(ref).get_attributes(list(SECRET_REQUIRED)), label)
    wrong = {a.name: values.get(a) for a, want in SECRET_REQUIRED.items() if values.get(a) != want}
    if wrong:
        raise KeyPolicyViolation("release secret attributes differ from the policy: "
                                 + ", ".join(f"{k}={v}" for k, v in sorted(wrong.items())),
                                 token=token.label, object_label=label,
                                 hint="do not export this secret; destroy it and rerun")
    return {a.name: values[a] for a in SECRET_REQUIRED}


def check_value(token: Token, kind: str, label: str) -> tuple[str, bytes]:
    """A key check value: lets the receiver confirm the unwrapped key without revealing it."""
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    return token.run("key check value", lambda lease: check_value_of(lease.key(ref), kind), label)


def check_value_of(key, kind: str) -> tuple[str, bytes]:
    """The check value computed on a python-pkcs11 key object (one token call)."""
    if kind == "generic-secret":
        return "hmac-sha256-8", key.sign(KCV_LABEL, mechanism=Mechanism.SHA256_HMAC)[:8]
    return "aes-ecb-zero-block-8", key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:8]


def host_check_value(method: str, key: bytes) -> bytes:
    """The same check value computed on the host from known key bytes (tests, verifiers)."""
    if method == "hmac-sha256-8":
        return hmac.new(key, KCV_LABEL, hashlib.sha256).digest()[:8]
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return (enc.update(bytes(16)) + enc.finalize())[:8]


def ensure_trusted_public_key(so_token: Token, label: str, key_id: bytes,
                              spki: keys.PublicKeyInfo) -> str:
    """Create (as the SO) an RSA public key object with CKA_TRUSTED and CKA_WRAP, or adopt the
    identical one. Returns 'created' or 'adopted'."""
    if spki.algorithm != "rsa":
        raise KeyPolicyViolation(f"trusted wrapping keys must be RSA, got {spki.algorithm}",
                                 object_label=label)
    pub = spki["public_key"].parsed
    modulus = pub["modulus"].native.to_bytes((pub["modulus"].native.bit_length() + 7) // 8, "big")
    exponent = pub["public_exponent"].native.to_bytes(
        (pub["public_exponent"].native.bit_length() + 7) // 8, "big")
    existing = so_token.run("C_FindObjects", _find, label,
                            {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY})
    if existing:
        obj = existing[0]
        attrs = so_token.run("C_GetAttributeValue", lambda lease: obj.get_attributes(
            [Attribute.ID, Attribute.MODULUS, Attribute.PUBLIC_EXPONENT, Attribute.TRUSTED,
             Attribute.WRAP]), label)
        same = (attrs[Attribute.ID] == key_id and attrs[Attribute.MODULUS] == modulus and
                int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big") ==
                int.from_bytes(exponent, "big"))
        if len(existing) != 1 or not same:
            raise ObjectExists(f"a public key labelled {label!r} exists but is another key",
                               token=so_token.label, object_label=label,
                               hint="trusted keys are never replaced; investigate the token")
        if not (attrs[Attribute.TRUSTED] and attrs[Attribute.WRAP]):
            raise KeyPolicyViolation(f"{label!r} is not a trusted wrapping key",
                                     token=so_token.label, object_label=label)
        return "adopted"
    template = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: label,
        Attribute.ID: key_id, Attribute.MODULUS: modulus, Attribute.PUBLIC_EXPONENT: exponent,
        Attribute.TRUSTED: True, Attribute.WRAP: True, Attribute.ENCRYPT: False,
        Attribute.VERIFY: False, Attribute.MODIFIABLE: False,
    }
    so_token.run_on_anchor("C_CreateObject",
                           lambda lease: lease.session.create_object(template), label)
    return "created"


def random_bytes(token: Token, n: int) -> bytes:
    return token.run("C_GenerateRandom", lambda lease: lease.session.generate_random(n * 8))


def read_states(token: Token) -> list[str]:
    """The release ids recorded in the token (CKO_DATA objects). Normally one; two after a crash
    inside :func:`write_state` - the caller takes the newest."""
    def read(lease):
        found = _find(lease, {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: STATE_LABEL})
        return [obj[Attribute.VALUE].decode() for obj in found]
    return token.run("C_GetAttributeValue", read, STATE_LABEL)


def write_state(token: Token, release: str) -> None:
    """Record ``release`` as the last release, replacing the previous record."""
    def write(lease):
        old = _find(lease, {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: STATE_LABEL})
        lease.session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.LABEL: STATE_LABEL, Attribute.APPLICATION: "hsm-suite",
            Attribute.VALUE: release.encode()})
        # Create before destroy: a crash in between leaves two records, and the reader below
        # takes the newest; never zero.
        for obj in old:
            obj.destroy()
    token.run_on_anchor("C_CreateObject", write, STATE_LABEL)


