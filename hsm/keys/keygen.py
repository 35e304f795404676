"""Generate a role's key pair inside the token, then prove it has the attributes the role requires.

The key pair is generated through ctypes (:mod:`hsm.core._cryptoki`) because its policy includes
attribute arrays (``CKA_ALLOWED_MECHANISMS``, ``CKA_UNWRAP_TEMPLATE``) that python-pkcs11 0.10
cannot encode and that can only be set at generation. A template is a request, not a guarantee: a
token may ignore or override attributes. So after generation the private key is read back against
its :class:`hsm.keys.attributes.KeyPolicy` (CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
CKA_MODIFIABLE, the allowed mechanisms, the unwrap template...); a key that fails is destroyed
before the error is raised, so no half-trusted key is left on the token under a role's label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from hsm.core.errors import KeyPolicyViolation, ObjectExists, check_rv, translated
from hsm.core.token import KeyRef, Token

from . import attributes
from .roles import KeyRole

_UNSTORABLE = (Attribute.COPYABLE, Attribute.ALLOWED_MECHANISMS, Attribute.UNWRAP_TEMPLATE)


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


def check_private_attributes(token: Token, role: KeyRole, label: str) -> None:
    """Read the private and public keys back; raise naming each attribute weaker than policy."""
    check_pair(token, label, role.policy)


def check_pair(token: Token, label: str, policy: attributes.KeyPolicy) -> None:
    """The private key against ``policy`` and the public key against PUBLIC_KEY; raise naming
    each weaker attribute."""
    found = attributes.check(token, KeyRef(label, ObjectClass.PRIVATE_KEY), policy)
    found += [f"public key {d}" for d in attributes.check(
        token, KeyRef(label, ObjectClass.PUBLIC_KEY), attributes.PUBLIC_KEY)]
    if found:
        raise KeyPolicyViolation(
            f"{label!r} is weaker than the {policy.name} policy: " + "; ".join(found),
            operation="attribute read-back", token=token.label, object_label=label,
            hint=policy.hint)


def create_pair(token: Token, label: str, mechanism: int, pub_tpl: dict, priv_tpl: dict,
                policy: attributes.KeyPolicy, *, allow_weak_token: bool = False) -> None:
    """C_GenerateKeyPair through ctypes (the policy holds attribute arrays), then the read-back
    against ``policy``; a pair that fails it is destroyed before the error, so no half-trusted
    key is left under the label. Every long-term key pair of the suite is made here."""
    raw = token.module.raw

    def generate(lease):
        rv, pub, priv = raw.generate_key_pair(lease.session.handle, mechanism, pub_tpl,
                                              priv_tpl)
        if rv != 0 and allow_weak_token:
            # A weak token may not even store the policy (NSS softokn 3.87: CKR_GENERAL_ERROR
            # for a token key with CKA_COPYABLE and CKA_ALLOWED_MECHANISMS). For a rehearsal,
            # try without them; the read-back below still names every missing attribute.
            weak = {k: v for k, v in priv_tpl.items() if k not in _UNSTORABLE}
            rv, pub, priv = raw.generate_key_pair(lease.session.handle, mechanism, pub_tpl,
                                                  weak)
        check_rv(rv)
        return pub, priv
    with translated("C_GenerateKeyPair", token.label, label):
        pub, priv = token.run_on_anchor("C_GenerateKeyPair", generate, label)
    try:
        check_pair(token, label, policy)
    except KeyPolicyViolation:
        def destroy(lease):
            raw.destroy_object(lease.session.handle, priv)
            raw.destroy_object(lease.session.handle, pub)
        token.run_on_anchor("C_DestroyObject", destroy, label)
        raise


def generate_keypair(token: Token, role: KeyRole, label: str, *,
                     allow_weak_token: bool = False) -> KeyPairInfo:
    """Generate ``role``'s key pair as token objects under ``label``; refuse an existing label
    and a token that does not enforce the key policy (unless ``allow_weak_token``)."""
    from hsm.core.profile import require_enforcement
    require_enforcement(token, f"generate the {role.name} key", allow_weak=allow_weak_token)
    if label_in_use(token, label):
        raise ObjectExists(f"an object labelled {label!r} already exists", token=token.label,
                           object_label=label, hint="choose another label; keys are never "
                           "replaced (delete the old one deliberately if you must)")
    key_id = os.urandom(16)  # unique CKA_ID linking the private key, public key and certificate
    pub_tpl = role.public_template(label, key_id)
    if role.key_type is KeyType.EC:
        pub_tpl[Attribute.EC_PARAMS] = encode_named_curve_parameters(role.curve)
    priv_tpl = role.private_template(label, key_id, token.profile)
    create_pair(token, label, role.generation_mechanism, pub_tpl, priv_tpl, role.policy,
                allow_weak_token=allow_weak_token)
    return KeyPairInfo(label, key_id, role)


def existing_keypair(token: Token, role: KeyRole, label: str, *,
                     check: bool = True) -> KeyPairInfo | None:
    """The role's key pair if present (its attributes re-checked against policy unless
    ``check`` is false: the caller still has to find out which role it is), else None."""
    def find(lease):
        found = list(lease.session.get_objects({Attribute.LABEL: label,
                                                Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        return found[0][Attribute.ID] if found else None
    key_id = token.run("C_FindObjects", find, object_label=label)
    if key_id is None:
        return None
    if check:
        check_private_attributes(token, role, label)
    return KeyPairInfo(label, key_id, role)
