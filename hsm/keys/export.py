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

from asn1crypto import keys
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.core.errors import KeyPolicyViolation, ObjectExists, check_rv
from hsm.core.token import KeyRef, Token

from . import attributes

KCV_LABEL = b"hsm-suite key check value"
RECORD_PREFIX = "hsm-suite-release-"
LEGACY_STATE_LABEL = "hsm-suite-release-state"  # one destroyable record (before key policy)
APPLICATION = "hsm-suite"

SECRET_POLICIES = {"generic-secret": attributes.RELEASE_SEED, "aes": attributes.RELEASE_AES}
_GENERATE = {"generic-secret": (KeyType.GENERIC_SECRET, Mechanism.GENERIC_SECRET_KEY_GEN),
             "aes": (KeyType.AES, Mechanism.AES_KEY_GEN)}


def _find(lease, template: dict) -> list:
    return list(lease.session.get_objects(template))


def _policy(kind: str) -> attributes.KeyPolicy:
    if kind not in SECRET_POLICIES:
        raise ValueError(f"unknown secret kind {kind!r}")
    return SECRET_POLICIES[kind]


def secret_template(kind: str, label: str, key_id: bytes) -> tuple[KeyType, int, dict]:
    """Template for a release secret: 'generic-secret' (HMAC seed) or 'aes'. Each may only SIGN,
    with the single mechanism its key check value needs (HMAC-SHA256, AES-CMAC): no AES-ECB
    oracle, no encryption, nothing else (CKA_ALLOWED_MECHANISMS, non-modifiable)."""
    pol = _policy(kind)
    key_type = _GENERATE[kind][0]
    return key_type, 256, {**pol.creation_attributes(), Attribute.KEY_TYPE: key_type,
                           Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE_LEN: 32}


def ensure_secret(token: Token, kind: str, label: str, key_id: bytes, *,
                  allow_weak_token: bool = False) -> str:
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
        from hsm.core.profile import require_enforcement
        require_enforcement(token, f"generate release secret {label}",
                            allow_weak=allow_weak_token)
        raw = token.module.raw

        def generate(lease):
            rv, _ = raw.generate_key(lease.session.handle, _GENERATE[kind][1], template)
            check_rv(rv)
        token.run_on_anchor("C_GenerateKey", generate, label)
        status = "created"
    check_secret(token, kind, label)
    return status


def check_secret(token: Token, kind: str, label: str) -> dict:
    """Read the secret back against its policy; returns the attributes it was checked for."""
    pol = _policy(kind)
    found = attributes.check(token, KeyRef(label, ObjectClass.SECRET_KEY), pol)
    if found:
        raise KeyPolicyViolation("release secret is weaker than its policy: " + "; ".join(found),
                                 token=token.label, object_label=label, hint=pol.hint)
    return {**{Attribute(a).name: v for a, v in {**pol.attributes, **pol.read_back}.items()},
            "ALLOWED_MECHANISMS": attributes.describe_template(
                {Attribute.ALLOWED_MECHANISMS: sorted(pol.mechanisms or ())}).split("=", 1)[1]}


def applied_template(kind: str) -> str:
    """The release-secret template as the transcript and ``ceremony plan`` show it."""
    return attributes.describe_template({Attribute.KEY_TYPE: 0, **_policy(kind).creation_attributes()}
                                      ).replace("CKA_KEY_TYPE=0", f"CKA_KEY_TYPE={kind}")


def applied_trusted_template() -> str:
    """The trusted-recipient template as the transcript and ``ceremony plan`` show it."""
    return attributes.describe_template(attributes.TRUSTED_RECIPIENT.creation_attributes())


def check_value(token: Token, kind: str, label: str) -> tuple[str, bytes]:
    """A key check value: lets the receiver confirm the unwrapped key without revealing it."""
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    return token.run("key check value", lambda lease: check_value_of(lease.key(ref), kind), label)


def check_value_of(key, kind: str) -> tuple[str, bytes]:
    """The check value computed on a python-pkcs11 key object (one token call): a MAC of a fixed
    label, never an AES-ECB block (E_K(0) is the GCM hash key H of the very key)."""
    if kind == "generic-secret":
        return "hmac-sha256-8", key.sign(KCV_LABEL, mechanism=Mechanism.SHA256_HMAC)[:8]
    return "aes-cmac-8", key.sign(KCV_LABEL, mechanism=Mechanism.AES_CMAC)[:8]


def destroy_secret(token: Token, label: str, key_id: bytes) -> str:
    """Destroy a release secret on the primary after its bundles are verified: the escrow bundle
    is the backup, and no usable copy stays behind. Returns 'destroyed' or 'absent' (a resumed
    run whose earlier attempt destroyed it)."""
    def destroy(lease):
        found = _find(lease, {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.SECRET_KEY})
        mine = [o for o in found if o[Attribute.ID] == key_id]
        if len(mine) != len(found):
            raise ObjectExists(f"an object labelled {label!r} was not made by this ceremony",
                               token=token.label, object_label=label)
        for obj in mine:
            obj.destroy()
        lease.objects.clear()
        return "destroyed" if mine else "absent"
    return token.run_on_anchor("C_DestroyObject", destroy, label)


def ensure_trusted_public_key(so_token: Token, label: str, key_id: bytes,
                              spki: keys.PublicKeyInfo) -> str:
    """Create (as the SO) an RSA public key object with CKA_TRUSTED and CKA_WRAP, or adopt the
    identical one. Returns 'created', 'adopted' or 're-created': the same key made by a version
    before trusted keys had a CKA_WRAP_TEMPLATE (which cannot be added to an object) is replaced
    by one that has it - the caller has checked ``spki`` (pinned fingerprint, own key), and the
    replacement only narrows what the key may wrap."""
    if spki.algorithm != "rsa":
        raise KeyPolicyViolation(f"trusted wrapping keys must be RSA, got {spki.algorithm}",
                                 object_label=label)
    modulus, exponent = rsa_numbers(spki)
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
        found = attributes.check(so_token, KeyRef(label, ObjectClass.PUBLIC_KEY),
                               attributes.TRUSTED_RECIPIENT)
        if found and only_wrap_template_missing(found):
            _replace_trusted(so_token, label, trusted_key_template(label, key_id, modulus,
                                                                   exponent))
            return "re-created"
        if found:
            raise KeyPolicyViolation(f"{label!r} is weaker than a trusted wrapping key must be: "
                                     + "; ".join(found), token=so_token.label,
                                     object_label=label, hint=attributes.TRUSTED_RECIPIENT.hint)
        return "adopted"
    template = trusted_key_template(label, key_id, modulus, exponent)
    raw = so_token.module.raw

    def create(lease):
        rv, _ = raw.create_object(lease.session.handle, template)
        check_rv(rv)
    so_token.run_on_anchor("C_CreateObject", create, label)
    return "created"


def only_wrap_template_missing(deviations: list[str]) -> bool:
    """The deviations of a trusted key made before wrap templates, and nothing else."""
    return bool(deviations) and all(d.startswith("CKA_WRAP_TEMPLATE: missing")
                                    for d in deviations)


def _replace_trusted(so_token: Token, label: str, template: dict) -> None:
    """Create the new trusted key first, then destroy the old one: killed in between, the
    token holds both (same key, same label; the next run finds two and stops for a person to
    look), never neither. The new object is read back against the policy before the old one
    goes."""
    raw = so_token.module.raw

    def replace(lease):
        old = [o.handle for o in _find(lease, {Attribute.LABEL: label,
                                               Attribute.CLASS: ObjectClass.PUBLIC_KEY})]
        rv, new = raw.create_object(lease.session.handle, template)
        check_rv(rv)
        weaker = attributes.deviations(raw, lease.session.handle, new, attributes.TRUSTED_RECIPIENT)
        if weaker:
            raw.destroy_object(lease.session.handle, new)
            raise KeyPolicyViolation(f"the re-created {label!r} is weaker than its policy: "
                                     + "; ".join(weaker), token=so_token.label,
                                     object_label=label)
        for handle in old:
            check_rv(raw.destroy_object(lease.session.handle, handle))
    so_token.run_on_anchor("C_CreateObject", replace, label)
    so_token.forget_objects()


def retrust(so_token: Token, label: str, fingerprint: bytes) -> str:
    """``hsm retrust``: re-create the trusted recipient ``label`` with the wrap template of
    today's policy, after the officer confirmed ``fingerprint`` (SHA-256 of its SPKI, read from
    the certificate or the key's own token). Returns 're-created' or 'current' (it already has
    it: nothing changes). A key the fingerprint does not name is refused and left alone."""
    from hsm.core.errors import HsmError

    from . import x509 as hx
    ref = KeyRef(label, ObjectClass.PUBLIC_KEY)
    ids = so_token.run("C_FindObjects", lambda lease: [o[Attribute.ID] for o in _find(
        lease, {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.TRUSTED: True})], label)
    if len(ids) != 1:
        raise ObjectExists(f"{len(ids)} trusted public keys are labelled {label!r}; want one",
                           token=so_token.label, object_label=label,
                           hint="`hsm audit` lists the token's trusted keys (trusted-REGION, "
                                "trusted-escrow)")
    spki = hx.public_key_info(so_token, ref)
    if hx.fingerprint(spki) != fingerprint:
        raise HsmError(f"{label!r} is not the key whose fingerprint was confirmed (token: "
                       f"{hx.fingerprint(spki).hex()}); nothing was changed",
                       token=so_token.label, object_label=label,
                       hint="compare with the region's certificate or its console again")
    deviations = attributes.check(so_token, ref, attributes.TRUSTED_RECIPIENT)
    if not deviations:
        return "current"
    if not only_wrap_template_missing(deviations):
        raise KeyPolicyViolation(f"{label!r} is weaker than a trusted key in other ways too: "
                                 + "; ".join(deviations), token=so_token.label,
                                 object_label=label, hint=_REPROVISION_TRUSTED)
    modulus, exponent = rsa_numbers(spki)
    _replace_trusted(so_token, label, trusted_key_template(label, ids[0], modulus, exponent))
    return "re-created"


_REPROVISION_TRUSTED = ("only a missing wrap template is repaired in place; destroy the key as "
                        "the SO and let the next ceremony trust the region again")


def rsa_numbers(spki: keys.PublicKeyInfo) -> tuple[bytes, bytes]:
    """Modulus and public exponent of an RSA SPKI as the big-endian bytes a token stores."""
    pub = spki["public_key"].parsed
    modulus = pub["modulus"].native.to_bytes((pub["modulus"].native.bit_length() + 7) // 8, "big")
    exponent = pub["public_exponent"].native.to_bytes(
        (pub["public_exponent"].native.bit_length() + 7) // 8, "big")
    return modulus, exponent


def trusted_key_template(label: str, key_id: bytes, modulus: bytes, exponent: bytes) -> dict:
    """An SO-trusted RSA wrapping key: may only wrap, only with RSA-OAEP, never modified."""
    return {**attributes.TRUSTED_RECIPIENT.creation_attributes(), Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.LABEL: label, Attribute.ID: key_id, Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent}


def random_bytes(token: Token, n: int) -> bytes:
    return token.run("C_GenerateRandom", lambda lease: lease.session.generate_random(n * 8))


def read_states(token: Token) -> list[str]:
    """The release ids recorded in the token: one record per release (and a legacy record
    written before the key policy, which ``hsm audit`` flags)."""
    def read(lease):
        found = _find(lease, {Attribute.CLASS: ObjectClass.DATA,
                              Attribute.APPLICATION: APPLICATION})
        return [obj[Attribute.VALUE].decode() for obj in found
                if str(obj[Attribute.LABEL]).startswith(RECORD_PREFIX)]
    return token.run("C_GetAttributeValue", read, RECORD_PREFIX)


def record_label(release: str) -> str:
    return RECORD_PREFIX + release


def write_state(token: Token, release: str) -> str:
    """Record ``release`` in a data object of its own that the token refuses to destroy,
    modify or copy (CKA_DESTROYABLE/MODIFIABLE/COPYABLE false): a user-PIN holder can add a
    record but never remove or lower one, so release ids only move forward. Returns 'recorded'
    or 'adopted' (a record for this release exists)."""
    label = record_label(release)
    template = {**attributes.RELEASE_RECORD.creation_attributes(), Attribute.LABEL: label,
                Attribute.APPLICATION: APPLICATION, Attribute.VALUE: release.encode()}
    raw = token.module.raw

    def write(lease):
        if _find(lease, {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}):
            return "adopted"
        rv, _ = raw.create_object(lease.session.handle, template)
        check_rv(rv)
        return "recorded"
    return token.run_on_anchor("C_CreateObject", write, label)
