"""The cloud key and the provider import keys on the token.

A cloud key is an AES key generated in the token, sensitive, extractable only under
CKA_WRAP_WITH_TRUSTED, non-modifiable, non-copyable, SIGN-only (its AES-CMAC check value), with a
CKA_ID that starts with :data:`ID_PREFIX` (so ``hsm audit`` and the export recognise it). A
provider import key is created by the SO as CKA_TRUSTED after the officer confirmed its
fingerprint; its CKA_WRAP_TEMPLATE lets it wrap only cloud keys (see :mod:`hsm.keys.attributes`).
"""

from __future__ import annotations

import secrets

from asn1crypto import keys as asn1keys
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.core.errors import KeyPolicyViolation, ObjectExists, ObjectNotFound, UsageError, check_rv
from hsm.core.profile import require_enforcement
from hsm.core.token import KeyRef, Token
from hsm.keys import attributes

ID_PREFIX = b"hsm-cloud:"        # 10 bytes, then 8 random bytes: unique and recognisable
IMPORT_LABEL_PREFIX = "cloud-import-"
KEY_BITS = (128, 192, 256)
MIN_RSA_BITS = 2048


def kwp_code(token: Token) -> int:
    """The token's RFC 5649 mechanism (SoftHSM2 2.6.1: 0x210A); the cloud policies name it.
    From the mechanism list, not the profile: the SO's session cannot run the profile probe."""
    from hsm.core.profile import kwp_mechanism
    code = kwp_mechanism(token)
    if code is None:
        raise KeyPolicyViolation("the token has no RFC 5649 AES key wrap (KWP), which cloud "
                                 "keys need for the RSA-AES formats", token=token.label,
                                 hint=token.profile.offer_hint("wrap"))
    return code


def cloud_policy(token: Token) -> attributes.KeyPolicy:
    return attributes.cloud_key(kwp_code(token))


def import_policy(token: Token) -> attributes.KeyPolicy:
    from hsm.core.profile import CKM_RSA_AES_KEY_WRAP
    rsa_aes = CKM_RSA_AES_KEY_WRAP in {int(m) for m in token.p11token.slot.get_mechanisms()}
    return attributes.cloud_import_key(kwp_code(token), rsa_aes)


def _find(lease, template: dict) -> list:
    return list(lease.session.get_objects(template))


# ------------------------------------------------------------------------------ cloud key
def create(token: Token, label: str, bits: int = 256, *,
           allow_weak_token: bool = False) -> tuple[bytes, str]:
    """Generate the cloud key; returns (CKA_ID, 'created'|'exists'). A cloud key of that label
    and size is reported, not made again (a second run creates nothing); any other object
    with the label is refused."""
    if bits not in KEY_BITS:
        raise UsageError(f"--bits {bits}: an AES key has 128, 192 or 256 bits")
    if not label or label != label.strip():
        raise UsageError(f"bad key label {label!r}")
    require_enforcement(token, f"create cloud key {label}", allow_weak=allow_weak_token)
    if token.run("C_FindObjects", _find, label, {Attribute.LABEL: label}):
        try:
            info = require_cloud_key(token, label)
        except (KeyPolicyViolation, ObjectNotFound):
            info = None
        if info is None or info["bytes"] * 8 != bits:
            raise ObjectExists(f"an object labelled {label!r} exists and is not an AES-{bits} "
                               "cloud key", token=token.label, object_label=label,
                               hint="choose another --label")
        return info["id"], "exists"
    pol = cloud_policy(token)
    key_id = ID_PREFIX + secrets.token_bytes(8)
    template = {**pol.creation_attributes(attributes.cloud_mechanisms(kwp_code(token))),
                Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE_LEN: bits // 8,
                Attribute.LABEL: label, Attribute.ID: key_id}
    raw = token.module.raw

    def generate(lease):
        check_rv(raw.generate_key(lease.session.handle, Mechanism.AES_KEY_GEN, template)[0])
    token.run_on_anchor("C_GenerateKey", generate, label)
    require_cloud_key(token, label)  # read back like every provisioned key
    return key_id, "created"


def require_cloud_key(token: Token, label: str) -> dict:
    """Refuse anything not made by :func:`create`: the policy read back, the exact mechanism
    list (a release secret's [AES_CMAC] is a subset and would pass the subset check) and the
    id prefix. Returns ``{"id": bytes, "bytes": key length}``."""
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    pol = cloud_policy(token)
    raw = token.module.raw

    def read(lease):
        obj = lease.key(ref)
        h = lease.session.handle
        found = attributes.deviations(raw, h, obj.handle, pol)
        _, mechs = raw.get_mechanism_list(h, obj.handle, Attribute.ALLOWED_MECHANISMS)
        if mechs != list(attributes.cloud_mechanisms(kwp_code(token))):
            found.append("CKA_ALLOWED_MECHANISMS: not the cloud key's list")
        _, key_id = raw.get_attribute(h, obj.handle, Attribute.ID)
        if not (key_id or b"").startswith(ID_PREFIX):
            found.append("CKA_ID: not a cloud key's id")
        if obj[Attribute.KEY_TYPE] != KeyType.AES:
            found.append("CKA_KEY_TYPE: not AES")
        return found, key_id, obj[Attribute.VALUE_LEN]
    try:
        found, key_id, length = token.run("C_GetAttributeValue", read, label)
    except ObjectNotFound:
        raise ObjectNotFound(f"no secret key labelled {label!r}", token=token.label,
                             object_label=label, hint="make one with `hsm cloud-key create`"
                             ) from None
    if found:
        raise KeyPolicyViolation(f"{label!r} was not made by `hsm cloud-key create`, refusing "
                                 "to export it: " + "; ".join(found), token=token.label,
                                 object_label=label, hint=pol.hint)
    return {"id": key_id, "bytes": int(length)}


def check_value(token: Token, label: str) -> str:
    """AES-CMAC of one zero block, first 5 bytes, hex: what the importer recomputes (with
    ``cryptography``'s CMAC) to confirm the key. A MAC, never the ECB block E_K(0)."""
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    mac = token.run("C_Sign(AES_CMAC)", lambda lease: lease.key(ref).sign(
        bytes(16), mechanism=Mechanism.AES_CMAC), label)
    return mac[:5].hex()


# ------------------------------------------------------------------------------ import keys
def load_rsa_spki(spki: asn1keys.PublicKeyInfo, source: str) -> int:
    """Refuse what is not RSA or is under 2048 bits; returns the modulus size in bits."""
    if spki.algorithm != "rsa":
        raise UsageError(f"{source}: a cloud import key must be RSA, got {spki.algorithm}",
                         hint="the providers' import keys are RSA (SM2 is not supported)")
    bits = spki["public_key"].parsed["modulus"].native.bit_length()
    if bits < MIN_RSA_BITS:
        raise UsageError(f"{source}: RSA-{bits} is too weak for a cloud import key",
                         hint=f"at least {MIN_RSA_BITS} bits")
    return bits


def import_label(provider: str, fingerprint: bytes) -> str:
    return f"{IMPORT_LABEL_PREFIX}{provider}-{fingerprint[:8].hex()}"


def trust(so_token: Token, provider: str, spki: asn1keys.PublicKeyInfo,
          fingerprint: bytes) -> tuple[str, str]:
    """As the SO, create the provider key as CKA_TRUSTED (or adopt the identical one).
    Returns (label, 'created'|'adopted')."""
    from hsm.keys.export import rsa_numbers
    label = import_label(provider, fingerprint)
    key_id = fingerprint[:16]
    pol = import_policy(so_token)
    modulus, exponent = rsa_numbers(spki)
    existing = so_token.run("C_FindObjects", _find, label,
                            {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY})
    if existing:
        if len(existing) != 1 or existing[0][Attribute.MODULUS] != modulus:
            raise ObjectExists(f"a public key labelled {label!r} exists but is another key",
                               token=so_token.label, object_label=label)
        found = attributes.check(so_token, KeyRef(label, ObjectClass.PUBLIC_KEY), pol)
        if found:
            raise KeyPolicyViolation(f"{label!r} is weaker than a cloud import key must be: "
                                     + "; ".join(found), token=so_token.label,
                                     object_label=label, hint=pol.hint)
        return label, "adopted"
    template = {**pol.creation_attributes(), Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.LABEL: label, Attribute.ID: key_id, Attribute.MODULUS: modulus,
                Attribute.PUBLIC_EXPONENT: exponent}
    raw = so_token.module.raw

    def create_key(lease):
        check_rv(raw.create_object(lease.session.handle, template)[0])
    so_token.run_on_anchor("C_CreateObject", create_key, label)
    return label, "created"


def require_trusted(token: Token, provider: str, spki: asn1keys.PublicKeyInfo,
                    fingerprint: bytes) -> KeyRef:
    """The provider key this export wraps to must be on the token, trusted by the SO, the same
    modulus as the file, and meet its policy; else the export is refused."""
    from hsm.keys.export import rsa_numbers
    label = import_label(provider, fingerprint)
    ref = KeyRef(label, ObjectClass.PUBLIC_KEY)
    modulus, _ = rsa_numbers(spki)
    found = token.run("C_FindObjects", _find, label,
                      {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY})
    if len(found) != 1 or found[0][Attribute.MODULUS] != modulus:
        raise KeyPolicyViolation(
            f"the {provider} import key (SHA-256 {fingerprint.hex()[:16]}...) is not trusted on "
            f"token {token.label!r}", token=token.label, object_label=label,
            hint="the security officer confirms its fingerprint with `hsm cloud-key trust` first")
    attributes.require(token, ref, import_policy(token), purpose=f"wrap a cloud key to {provider}")
    return ref
