"""A crypto officer's signing key on their own token (a smartcard, a USB key through OpenSC, a
YubiKey PIV, a SoftHSM2 token in tests): generated inside it, sensitive, never extractable,
non-modifiable, SIGN only, with CKA_ALLOWED_MECHANISMS = [CKM_ECDSA].

Only raw CKM_ECDSA, because that is the one ECDSA mechanism every token has (SoftHSM2 2.6.1 has
no CKM_ECDSA_SHA256): the host hashes (SHA-256 for P-256, SHA-384 for P-384) and the token signs
the digest. The officer signs approvals before a ceremony and the release manifests after it
(:mod:`release.signers`); the token's PIN is the officer's, never the primary's.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import keys
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from hsm.core import ops
from hsm.core.errors import KeyPolicyViolation, ObjectExists
from hsm.core.token import KeyRef, Token

from . import attributes, keygen
from . import x509 as hx

DEFAULT_LABEL = "ceremony-officer"
CURVES = {"p256": "secp256r1", "p384": "secp384r1"}
_HASHES = {"secp256r1": hashlib.sha256, "secp384r1": hashlib.sha384}

OFFICER_SIGNING = attributes.KeyPolicy(
    "officer-signing", ObjectClass.PRIVATE_KEY,
    {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
     A.MODIFIABLE: False, A.COPYABLE: False, **attributes.private_usages(A.SIGN)},
    {A.LOCAL: True, A.ALWAYS_SENSITIVE: True, A.NEVER_EXTRACTABLE: True},
    frozenset({Mechanism.ECDSA}), None,
    "an officer key's attributes cannot be changed: generate a new one (`ceremony keygen "
    "--token URI`), have the regions pin its fingerprint, and retire the old one")


def generate(token: Token, label: str = DEFAULT_LABEL, *, curve: str = "secp256r1",
             allow_weak_token: bool = False) -> keys.PublicKeyInfo:
    """Generate the officer's key pair in ``token`` under ``label``; its SPKI. An existing
    label is refused: an officer key is never replaced in place."""
    from hsm.core.profile import require_enforcement
    require_enforcement(token, "generate an officer key", allow_weak=allow_weak_token)
    if keygen.label_in_use(token, label):
        raise ObjectExists(f"an object labelled {label!r} already exists", token=token.label,
                           object_label=label, hint="an officer key is never replaced; give "
                           "another label (pkcs11:...;object=LABEL) for a new key")
    key_id = os.urandom(16)
    pub = {A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.EC, A.LABEL: label,
           A.ID: key_id, A.TOKEN: True, A.PRIVATE: False, A.VERIFY: True, A.ENCRYPT: False,
           A.WRAP: False, A.DERIVE: False, A.MODIFIABLE: False,
           A.EC_PARAMS: encode_named_curve_parameters(curve)}
    priv = {**OFFICER_SIGNING.creation_attributes((Mechanism.ECDSA,)),
            A.KEY_TYPE: KeyType.EC, A.LABEL: label, A.ID: key_id}
    keygen.create_pair(token, label, Mechanism.EC_KEY_PAIR_GEN, pub, priv, OFFICER_SIGNING,
                       allow_weak_token=allow_weak_token)
    return hx.public_key_info(token, KeyRef(label, ObjectClass.PUBLIC_KEY))


class TokenSigner:
    """An :class:`release.signers.OfficerSigner` whose key is in a token; the key's policy is
    re-checked when it is opened, so a key made without it is refused, not used."""

    def __init__(self, token: Token, label: str = DEFAULT_LABEL):
        self.token = token
        self.ref = KeyRef(label, ObjectClass.PRIVATE_KEY)
        self.spki = hx.public_key_info(token, KeyRef(label, ObjectClass.PUBLIC_KEY))
        if self.spki.algorithm != "ec" or self.spki.curve[1] not in _HASHES:
            raise KeyPolicyViolation(f"{label!r} on token {token.label!r} is not an ECDSA P-256/P-384 "
                             "key", hint="generate one with `ceremony keygen --token URI`")
        self._hash = _HASHES[self.spki.curve[1]]
        attributes.require(token, self.ref, OFFICER_SIGNING,
                         purpose="sign as a ceremony officer")

    def sign(self, data: bytes) -> bytes:
        digest = self._hash(data).digest()
        raw = self.token.run("C_Sign(ECDSA)", lambda lease: lease.key(self.ref).sign(
            digest, mechanism=Mechanism.ECDSA), self.ref.label)
        return ops.ecdsa_der(raw)
