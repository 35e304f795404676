"""Generate a role's key pair inside the token, then prove it has the attributes the role requires.

A template is a request, not a guarantee: a token may ignore or override attributes. So after
generation we read CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_EXTRACTABLE (and the
rest of REQUIRED_PRIVATE) back; a key that fails is destroyed before the error is raised, so no
half-trusted key is left on the token under a role's label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from .errors import KeyPolicyViolation, ObjectExists, translated
from .roles import REQUIRED_PRIVATE, KeyRole
from .token import KeyRef, Token


@dataclass(frozen=True)
class KeyPairInfo:
    label: str
    key_id: bytes
    role: KeyRole

    @property
    def private(self) -> KeyRef:
        return KeyRef(self.label, ObjectClass.PRIVATE_KEY)

    @property
    def public(self) -> KeyRef:
        return KeyRef(self.label, ObjectClass.PUBLIC_KEY)


def label_in_use(token: Token, label: str) -> bool:
    def find(lease):
        return any(True for _ in lease.session.get_objects({Attribute.LABEL: label}))
    return token.run("C_FindObjects", find, object_label=label)


def check_private_attributes(token: Token, label: str) -> dict:
    """Read the private key's security attributes back; raise if any differs from the policy."""
    ref = KeyRef(label, ObjectClass.PRIVATE_KEY)

    def read(lease):
        return lease.key(ref).get_attributes(list(REQUIRED_PRIVATE))
    values = token.run("C_GetAttributeValue", read, object_label=label)
    wrong = {attr.name: values.get(attr) for attr, want in REQUIRED_PRIVATE.items()
             if values.get(attr) != want}
    if wrong:
        raise KeyPolicyViolation(
            "private key attributes differ from the role's policy: "
            + ", ".join(f"{k}={v}" for k, v in sorted(wrong.items())),
            operation="attribute read-back", token=token.label, object_label=label,
            hint="the token did not honour the template; do not use this key")
    return {attr.name: values[attr] for attr in REQUIRED_PRIVATE}


def generate_keypair(token: Token, role: KeyRole, label: str) -> KeyPairInfo:
    """Generate ``role``'s key pair as token objects under ``label``; refuse an existing label."""
    if label_in_use(token, label):
        raise ObjectExists(f"an object labelled {label!r} already exists", token=token.label,
                           object_label=label, hint="choose another label; keys are never "
                           "replaced (delete the old one deliberately if you must)")
    key_id = os.urandom(16)  # unique CKA_ID linking the private key, public key and certificate
    pub_tpl = role.public_template(label, key_id)
    priv_tpl = role.private_template(label, key_id)
    with token.anchor() as anchor, translated("C_GenerateKeyPair", token.label, label):
        session = anchor.session
        if role.key_type is KeyType.RSA:
            pub, priv = session.generate_keypair(
                KeyType.RSA, role.bits, store=True, mechanism=role.generation_mechanism,
                public_template=pub_tpl, private_template=priv_tpl)
        else:
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(role.curve)},
                local=True)
            pub, priv = params.generate_keypair(
                store=True, mechanism=role.generation_mechanism,
                public_template=pub_tpl, private_template=priv_tpl)
    try:
        check_private_attributes(token, label)
    except (KeyPolicyViolation, pkcs11.PKCS11Error):
        with token.anchor():
            priv.destroy()
            pub.destroy()
        raise
    return KeyPairInfo(label, key_id, role)


def existing_keypair(token: Token, role: KeyRole, label: str) -> KeyPairInfo | None:
    """The role's key pair if present (its private-key attributes re-checked), else None."""
    def find(lease):
        found = list(lease.session.get_objects({Attribute.LABEL: label,
                                                Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        return found[0][Attribute.ID] if found else None
    key_id = token.run("C_FindObjects", find, object_label=label)
    if key_id is None:
        return None
    check_private_attributes(token, label)
    return KeyPairInfo(label, key_id, role)
