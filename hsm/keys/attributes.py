"""Key policy: what each kind of object the suite creates may do, stated in the token.

A property that holds only because our code never asks for the wrong thing is not a property: a
user-PIN holder with a shell will ask. So every key carries its policy *in the token*, set when it
is created (SoftHSM2 2.6.1 refuses to add ``CKA_ALLOWED_MECHANISMS`` or ``CKA_UNWRAP_TEMPLATE``
later), and the token refuses the rest:

- ``CKA_MODIFIABLE=false``: no usage can be switched on afterwards (``CKA_DECRYPT`` on an
  unwrapping key would let ``C_Decrypt`` read a wrapped secret);
- ``CKA_COPYABLE=false``: no ``C_CopyObject`` with other attributes;
- ``CKA_ALLOWED_MECHANISMS``: exactly the mechanisms of the key's job (no AES-ECB oracle on a key
  whose job is a check value or AES-GCM);
- ``CKA_UNWRAP_TEMPLATE`` on unwrapping keys: whatever they unwrap comes out sensitive and
  non-extractable (regional), or at most extractable under ``CKA_WRAP_WITH_TRUSTED`` (the
  primary's escrow key), with its own allowed mechanisms.

:func:`deviations` reads a key back and names each attribute that is weaker than its policy; it
runs at provisioning, at every ceremony and KMS start, and in ``hsm audit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkcs11 import Attribute as A
from pkcs11 import Mechanism as M
from pkcs11 import ObjectClass

from hsm.core import _cryptoki

_USAGES = (A.SIGN, A.VERIFY, A.ENCRYPT, A.DECRYPT, A.WRAP, A.UNWRAP, A.DERIVE)
# A private key has only the private half of the usages (SoftHSM2 refuses CKA_VERIFY on one
# with CKR_ATTRIBUTE_TYPE_INVALID), a public key only the public half.
_PRIVATE_USAGES = (A.SIGN, A.DECRYPT, A.UNWRAP, A.DERIVE)
_PUBLIC_USAGES = (A.VERIFY, A.ENCRYPT, A.WRAP)


def usages(*granted: int, among: tuple = _USAGES) -> dict:
    """Every usage attribute explicitly: true for ``granted``, false for the rest (tokens'
    defaults differ, and an unwrap template must be matched attribute for attribute)."""
    return {attr: attr in granted for attr in among}


def private_usages(*granted: int) -> dict:
    return usages(*granted, among=_PRIVATE_USAGES)


# What the regional KMS may unwrap a release secret into: a sensitive, non-extractable session
# object that can only do AES-GCM (tenant secrets), AES-CMAC (its check value) or HMAC-SHA256
# (the KDF seed). The token refuses any unwrap that asks for more (CKR_TEMPLATE_INCONSISTENT).
KMS_SECRET_MECHANISMS = (M.AES_GCM, M.AES_CMAC, M.SHA256_HMAC)
REGIONAL_UNWRAP_TEMPLATE = {A.SENSITIVE: True, A.EXTRACTABLE: False, A.TOKEN: False,
                            A.ALLOWED_MECHANISMS: KMS_SECRET_MECHANISMS}
# What the primary may unwrap an escrow bundle into (restore): a session object that can leave
# the token again only under a key the SO trusted, and otherwise only compute its check value.
# (The order is the one primary keys made since the key policy carry in their unwrap template;
# the token stores the resulting key's list as a set, so it equals RELEASE_SECRET_MECHANISMS.)
ESCROW_SECRET_MECHANISMS = (M.AES_CMAC, M.SHA256_HMAC)
ESCROW_UNWRAP_TEMPLATE = {A.SENSITIVE: True, A.EXTRACTABLE: True, A.WRAP_WITH_TRUSTED: True,
                          A.TOKEN: False, A.ALLOWED_MECHANISMS: ESCROW_SECRET_MECHANISMS}

# Every release secret that can leave the primary - generated there (seed or AES) or restored
# from the escrow bundle - carries exactly this CKA_ALLOWED_MECHANISMS, and no other wrappable
# key the suite makes does (cloud keys: [AES_CMAC, AES_KEY_WRAP_PAD]). It is the mark by which
# the trusted recipients' CKA_WRAP_TEMPLATE admits release secrets and nothing else: SoftHSM2
# 2.6.1 compares a wrap-template entry byte for byte with the key's attribute, stores a key's
# mechanism list as a sorted set but a template's list as given (measured), so a template's list
# must be ascending and duplicate-free or it matches nothing. Sharing one list between the two
# key types adds no use: an AES key cannot HMAC and a generic secret cannot CMAC
# (CKR_KEY_TYPE_INCONSISTENT, measured). Regional copies keep REGIONAL_UNWRAP_TEMPLATE's list:
# it is fixed in every regional key already made, and those copies are never extractable.
RELEASE_SECRET_MECHANISMS = tuple(sorted({int(M.SHA256_HMAC), int(M.AES_CMAC)}))
assert set(RELEASE_SECRET_MECHANISMS) == {int(m) for m in ESCROW_SECRET_MECHANISMS}


def wrap_template_list(mechanisms) -> list[int]:
    """A CKA_ALLOWED_MECHANISMS value for a CKA_WRAP_TEMPLATE: ascending, no duplicates, the
    way the token stores a key's list (see RELEASE_SECRET_MECHANISMS)."""
    return sorted({int(m) for m in mechanisms})


# What a trusted recipient (a region's key, the escrow key) may wrap: a release secret only.
RELEASE_WRAP_TEMPLATE = {A.CLASS: ObjectClass.SECRET_KEY, A.SENSITIVE: True,
                         A.WRAP_WITH_TRUSTED: True,
                         A.ALLOWED_MECHANISMS: wrap_template_list(RELEASE_SECRET_MECHANISMS)}


@dataclass(frozen=True)
class KeyPolicy:
    """The attributes a kind of object must have. ``attributes`` are requested at creation and
    read back; ``read_back`` are set by the token itself (CKA_LOCAL...) and only read back;
    ``mechanisms`` is the permitted set (the key's CKA_ALLOWED_MECHANISMS must be a non-empty
    subset of it); ``unwrap_template`` must be present exactly."""

    name: str
    object_class: ObjectClass
    attributes: dict
    read_back: dict = field(default_factory=dict)
    mechanisms: frozenset[int] | None = None
    unwrap_template: dict | None = None
    hint: str = ""
    wrap_template: dict | None = None  # CKA_WRAP_TEMPLATE: what this (trusted) key may wrap
    # The key's CKA_ALLOWED_MECHANISMS must be all of ``mechanisms``, not a subset: the list is
    # what a trusted key's wrap template matches (release secrets).
    exact_mechanisms: bool = False

    def creation_attributes(self, mechanisms: tuple[int, ...] | None = None) -> dict:
        """The attributes to create the object with (without label, id and key size)."""
        tpl = {A.CLASS: self.object_class, **self.attributes}
        if self.mechanisms is not None:
            chosen = tuple(mechanisms) if mechanisms is not None else tuple(sorted(self.mechanisms))
            if not chosen or not set(chosen) <= self.mechanisms:
                raise ValueError(f"{self.name}: mechanisms {chosen} outside the policy")
            tpl[A.ALLOWED_MECHANISMS] = list(chosen)
        if self.unwrap_template is not None:
            tpl[A.UNWRAP_TEMPLATE] = dict(self.unwrap_template)
        if self.wrap_template is not None:
            tpl[A.WRAP_TEMPLATE] = dict(self.wrap_template)
        return tpl


_LONG_TERM_PRIVATE = {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                      A.MODIFIABLE: False, A.COPYABLE: False}
_GENERATED_INSIDE = {A.LOCAL: True, A.ALWAYS_SENSITIVE: True, A.NEVER_EXTRACTABLE: True}
_REPROVISION = ("key attributes cannot be changed after creation: provision a new token "
                "(`hsm init-token`, then `hsm init-primary`/`hsm init-regional`) and move to it")

PRIMARY_ENCRYPTION = KeyPolicy(
    "primary-encryption", ObjectClass.PRIVATE_KEY,
    {**_LONG_TERM_PRIVATE, **private_usages(A.UNWRAP)}, _GENERATED_INSIDE,
    frozenset({M.RSA_PKCS_OAEP}), ESCROW_UNWRAP_TEMPLATE, _REPROVISION)
REGIONAL_ENCRYPTION = KeyPolicy(
    "regional-encryption", ObjectClass.PRIVATE_KEY,
    {**_LONG_TERM_PRIVATE, **private_usages(A.UNWRAP)}, _GENERATED_INSIDE,
    frozenset({M.RSA_PKCS_OAEP}), REGIONAL_UNWRAP_TEMPLATE, _REPROVISION)
SIGNING_ECDSA = KeyPolicy(
    "primary-signing", ObjectClass.PRIVATE_KEY,
    {**_LONG_TERM_PRIVATE, **private_usages(A.SIGN)}, _GENERATED_INSIDE,
    frozenset({M.ECDSA, M.ECDSA_SHA384}), None, _REPROVISION)
SIGNING_RSA_PSS = KeyPolicy(
    "primary-signing", ObjectClass.PRIVATE_KEY,
    {**_LONG_TERM_PRIVATE, **private_usages(A.SIGN)}, _GENERATED_INSIDE,
    frozenset({M.SHA384_RSA_PKCS_PSS}), None, _REPROVISION)
# The regional KMS's audit-signing key: signs one checkpoint per batch of audit records, so a
# file writer who edits the log and recomputes its hashes cannot make the checkpoints verify.
# Raw CKM_ECDSA only (the host hashes; SoftHSM2 2.6.1 has no CKM_ECDSA_SHA256), SIGN only:
# it can sign nothing but digests, and a user-PIN holder cannot use it to decrypt or derive.
AUDIT_SIGNING = KeyPolicy(
    "regional-audit-signing", ObjectClass.PRIVATE_KEY,
    {**_LONG_TERM_PRIVATE, **private_usages(A.SIGN)}, _GENERATED_INSIDE,
    frozenset({M.ECDSA}), None, _REPROVISION)
PUBLIC_KEY = KeyPolicy("public key", ObjectClass.PUBLIC_KEY,
                       {A.TOKEN: True, A.MODIFIABLE: False}, hint=_REPROVISION)
TRUSTED_RECIPIENT = KeyPolicy(
    "trusted recipient", ObjectClass.PUBLIC_KEY,
    {A.TOKEN: True, A.PRIVATE: False, A.TRUSTED: True, A.MODIFIABLE: False,
     **usages(A.WRAP, among=_PUBLIC_USAGES)}, mechanisms=frozenset({M.RSA_PKCS_OAEP}),
    hint="a trusted key cannot gain a wrap template: the SO re-creates it, after confirming "
         "its fingerprint, with `hsm retrust --token TOKEN --label LABEL --fingerprint HEX` "
         "(or the next ceremony's trust step does)",
    wrap_template=RELEASE_WRAP_TEMPLATE)
_SECRET_READ_BACK = {A.LOCAL: True, A.ALWAYS_SENSITIVE: True}
# Both release secret kinds carry RELEASE_SECRET_MECHANISMS; each uses only its own check-value
# MAC (HMAC-SHA256 on the seed, AES-CMAC on the AES key): the other is refused by key type.
RELEASE_SEED = KeyPolicy(
    "release secret (KDF seed)", ObjectClass.SECRET_KEY,
    {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: True,
     A.WRAP_WITH_TRUSTED: True, A.MODIFIABLE: False, A.COPYABLE: False, **usages(A.SIGN)},
    _SECRET_READ_BACK, frozenset(RELEASE_SECRET_MECHANISMS),
    hint="do not export this secret; it was not made by this suite's ceremony (or by a "
         "version before trusted keys had wrap templates: run the ceremony again)",
    exact_mechanisms=True)
RELEASE_AES = KeyPolicy(
    "release secret (AES)", ObjectClass.SECRET_KEY, RELEASE_SEED.attributes, _SECRET_READ_BACK,
    frozenset(RELEASE_SECRET_MECHANISMS), hint=RELEASE_SEED.hint, exact_mechanisms=True)


# ------------------------------------------------------------------------------ cloud export
# A cloud key (hsm cloud-key create) leaves the token only wrapped to a cloud provider's import
# key that the SO trusted. Its CKA_ALLOWED_MECHANISMS is the check value's AES-CMAC plus the
# token's RFC 5649 key wrap: it has CKA_WRAP=false and CKA_ENCRYPT=false, so it can never *use*
# the key wrap (CKR_KEY_FUNCTION_NOT_PERMITTED); the list is there because it is the one
# attribute that tells a cloud key from a release secret (AES, [AES_CMAC]) that SoftHSM2 2.6.1
# compares in a CKA_WRAP_TEMPLATE (it refuses CKA_ID or CKA_LABEL entries: measured). The
# provider's trusted key carries that template, so the *token* refuses to wrap a release secret
# or any other trusted-wrap key to a cloud provider. The composed RSA-AES route's ephemeral key
# has the same list, so the provider key can wrap it too.
def cloud_mechanisms(kwp: int) -> tuple[int, int]:
    return (int(M.AES_CMAC), int(kwp))


def cloud_key(kwp: int) -> KeyPolicy:
    return KeyPolicy(
        "cloud key", ObjectClass.SECRET_KEY,
        {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: True,
         A.WRAP_WITH_TRUSTED: True, A.MODIFIABLE: False, A.COPYABLE: False, **usages(A.SIGN)},
        _SECRET_READ_BACK, frozenset(cloud_mechanisms(kwp)),
        hint="only keys made by `hsm cloud-key create` are exported to a cloud provider")


def cloud_wrap_template(kwp: int) -> dict:
    return {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: 0x1F,  # CKK_AES
            A.SENSITIVE: True, A.WRAP_WITH_TRUSTED: True,
            A.ALLOWED_MECHANISMS: wrap_template_list(cloud_mechanisms(kwp))}


def cloud_import_key(kwp: int, rsa_aes_key_wrap: bool = False) -> KeyPolicy:
    """A provider's import public key, created by the SO: CKA_TRUSTED, WRAP only, RSA-OAEP (and
    the token's CKM_RSA_AES_KEY_WRAP where it has one), wrapping only cloud keys."""
    mechs = {int(M.RSA_PKCS_OAEP)} | ({0x1054} if rsa_aes_key_wrap else set())
    return KeyPolicy(
        "cloud import key", ObjectClass.PUBLIC_KEY,
        {A.TOKEN: True, A.PRIVATE: False, A.TRUSTED: True, A.MODIFIABLE: False,
         **usages(A.WRAP, among=_PUBLIC_USAGES)}, mechanisms=frozenset(mechs),
        hint="provider import keys are created by the SO with `hsm cloud-key trust`",
        wrap_template=cloud_wrap_template(kwp))


def cloud_ephemeral(kwp: int) -> KeyPolicy:
    """The composed RSA-AES route's ephemeral AES key: generated by the SO (only the SO can make
    a CKA_TRUSTED key, and the cloud key is CKA_WRAP_WITH_TRUSTED) as a public *session* object
    (SoftHSM2 destroys private session objects at C_Logout, and the SO cannot make private
    ones: CKR_USER_NOT_LOGGED_IN), sensitive, able only to wrap, leaving the token only under
    a trusted key; destroyed after the export."""
    return KeyPolicy(
        "cloud ephemeral key", ObjectClass.SECRET_KEY,
        {A.TOKEN: False, A.PRIVATE: False, A.TRUSTED: True, A.SENSITIVE: True,
         A.EXTRACTABLE: True, A.WRAP_WITH_TRUSTED: True, A.MODIFIABLE: False,
         A.COPYABLE: False, **usages(A.WRAP)}, mechanisms=frozenset(cloud_mechanisms(kwp)),
        # It is CKA_TRUSTED too, so it also wraps only cloud keys (not a release secret).
        wrap_template=cloud_wrap_template(kwp))


# BYOK. The org's seed key (PBKDF2 uploads, cache-only JWE): whatever it unwraps is a
# session object that never leaves the token (not readable, not wrappable, HMAC-SHA256 or
# AES-GCM only); the KMS compares the customer's SHA-256 with C_DigestKey and keeps an HMAC image.
BYOK_SEED_UNWRAP_TEMPLATE = {A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: False,
                             A.WRAP: False, A.UNWRAP: False, A.DERIVE: False,
                             A.ALLOWED_MECHANISMS: (M.SHA256_HMAC, M.AES_GCM)}
# The org's DEK key (derivation NONE): the uploaded value *is* the DEK the KMS serves to the
# encryption services in the clear, so what it unwraps is readable (CKA_SENSITIVE=false, and
# SoftHSM2 2.6.1 also wants CKA_EXTRACTABLE=true to return CKA_VALUE) - said here rather than
# hidden behind a DECRYPT usage on the RSA key - but still never a token object, and only an
# AES-GCM key.
BYOK_DEK_UNWRAP_TEMPLATE = {A.TOKEN: False, A.SENSITIVE: False, A.EXTRACTABLE: True,
                            A.WRAP: False, A.UNWRAP: False, A.DERIVE: False,
                            A.ALLOWED_MECHANISMS: (M.AES_GCM,)}
_BYOK_HINT = ("a BYOK key's policy cannot be changed after creation: make a new certificate "
              "(`kms byok certificate`) and have the customer wrap to it")
BYOK_SEED = KeyPolicy(
    "byok-seed", ObjectClass.PRIVATE_KEY, {**_LONG_TERM_PRIVATE, **private_usages(A.UNWRAP)},
    _GENERATED_INSIDE, frozenset({M.RSA_PKCS_OAEP}), BYOK_SEED_UNWRAP_TEMPLATE, _BYOK_HINT)
BYOK_DEK = KeyPolicy(
    "byok-dek", ObjectClass.PRIVATE_KEY, {**_LONG_TERM_PRIVATE, **private_usages(A.UNWRAP)},
    _GENERATED_INSIDE, frozenset({M.RSA_PKCS_OAEP}), BYOK_DEK_UNWRAP_TEMPLATE, _BYOK_HINT)
# XKS. An AWS KMS external key store key (``hsm xks-key create``): AES-256 made in the token,
# never readable or wrappable, not modifiable (a user-PIN holder cannot switch CKA_DECRYPT on an
# encrypt-only key, or CKA_EXTRACTABLE on), not copyable, AES-GCM only (no ECB or CBC oracle).
# Its usage - ENCRYPT, DECRYPT, both or neither - is chosen at creation and is what the proxy
# reports as keyUsage; the policy leaves those two attributes to the key and fixes the rest.
XKS_KEY = KeyPolicy(
    "xks key", ObjectClass.SECRET_KEY,
    {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
     A.MODIFIABLE: False, A.COPYABLE: False,
     **usages(among=(A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE))},
    {**_SECRET_READ_BACK, A.NEVER_EXTRACTABLE: True}, frozenset({M.AES_GCM}),
    hint="an XKS key's policy cannot be changed after creation: make a new key with "
         "`hsm xks-key create` and a new AWS KMS key on it")


# A per-org KEK (hsm.keys.orgkek): the KMS replaces it at each change of the org's state and
# destroys the old one, so it must be impossible to read out, wrap out or copy before that.
ORG_KEK = KeyPolicy(
    "org key-encryption key", ObjectClass.SECRET_KEY,
    {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
     A.MODIFIABLE: False, A.COPYABLE: False, **usages(A.ENCRYPT, A.DECRYPT)},
    # CKA_DESTROYABLE read back too: a KEK the node cannot destroy would shred nothing.
    {**_SECRET_READ_BACK, A.NEVER_EXTRACTABLE: True, A.DESTROYABLE: True},
    frozenset({M.AES_GCM}), exact_mechanisms=True,
    hint="an object under an org KEK's label that the suite did not make: a user-PIN holder "
         "created it; investigate, then destroy it with the SO's tools (the org's state stays "
         "sealed under its own KEK)")


def xks_key_attributes(encrypt: bool, decrypt: bool) -> dict:
    """The creation template of an XKS key with this usage (without label, id and length)."""
    return {**XKS_KEY.creation_attributes(), A.ENCRYPT: encrypt, A.DECRYPT: decrypt}


RELEASE_RECORD = KeyPolicy(
    "release record", ObjectClass.DATA,
    {A.TOKEN: True, A.PRIVATE: True, A.MODIFIABLE: False, A.DESTROYABLE: False,
     A.COPYABLE: False},
    hint="a release record the user PIN can destroy or rewrite does not keep release ids "
         "moving forward; the next ceremony writes a protected one")


# ------------------------------------------------------------------------------ checking
def check(token, ref, policy: KeyPolicy) -> list[str]:
    """:func:`deviations` of the object ``ref`` (an hsm.core.token.KeyRef) on ``token``."""
    def read(lease):
        return deviations(token.module.raw, lease.session.handle, lease.key(ref).handle, policy)
    return token.run("C_GetAttributeValue", read, ref.label)


def require(token, ref, policy: KeyPolicy, *, purpose: str) -> None:
    """Refuse to use ``ref`` for ``purpose`` unless it meets ``policy``; the error names each
    weaker attribute and how to re-provision."""
    from hsm.core.errors import KeyPolicyViolation
    found = check(token, ref, policy)
    if found:
        raise KeyPolicyViolation(
            f"{ref.label!r} is weaker than the {policy.name} policy, refusing to {purpose}: "
            + "; ".join(found), operation="key policy check", token=token.label,
            object_label=ref.label, hint=policy.hint or _REPROVISION)


def _decode_bool(raw: bytes | None):
    return None if raw is None else raw != b"\x00" * len(raw)


def deviations(raw: _cryptoki.RawModule, session: int, obj: int, policy: KeyPolicy) -> list[str]:
    """Each way the object is weaker than ``policy``, as ``ATTRIBUTE: got X, want Y``."""
    found = []
    wanted = {**policy.attributes, **policy.read_back}
    values = raw.get_scalars(session, obj, list(wanted))  # one token call for all of them
    for attr, want in wanted.items():
        value = values[attr]
        if value is None:
            got = None
        elif isinstance(want, bool):
            got = _decode_bool(value)
        elif isinstance(want, int):
            got = _cryptoki.decode_ulong(value)
        else:
            got = value
        if got != want:
            shown = "unavailable" if value is None else got
            found.append(f"CKA_{A(attr).name}: got {shown}, want {want}")
    if policy.mechanisms is not None:
        _, mechs = raw.get_mechanism_list(session, obj, A.ALLOWED_MECHANISMS)
        if not mechs:
            found.append("CKA_ALLOWED_MECHANISMS: missing (any mechanism allowed), want a subset "
                         f"of {_names(policy.mechanisms)}")
        elif not set(mechs) <= policy.mechanisms:
            found.append(f"CKA_ALLOWED_MECHANISMS: got {_names(mechs)}, want a subset of "
                         f"{_names(policy.mechanisms)}")
        elif policy.exact_mechanisms and set(mechs) != policy.mechanisms:
            found.append(f"CKA_ALLOWED_MECHANISMS: got {_names(mechs)}, want exactly "
                         f"{_names(policy.mechanisms)} (what the trusted keys' wrap template "
                         "admits)")
    for attr, want_template, missing in (
            (A.UNWRAP_TEMPLATE, policy.unwrap_template,
             "missing (anything may be unwrapped as extractable)"),
            (A.WRAP_TEMPLATE, policy.wrap_template, "missing (any trusted-wrap key may be "
                                                    "wrapped, release secrets included)")):
        if want_template is None:
            continue
        _, tpl = raw.get_template(session, obj, attr)
        want_tpl = {int(k): _cryptoki.encode_value(v) for k, v in want_template.items()}
        name = "CKA_" + A(attr).name
        if not tpl:
            found.append(f"{name}: {missing}, want {describe_template(want_template)}")
        elif tpl != want_tpl:
            found.append(f"{name}: got {_describe_raw(tpl)}, want "
                         f"{describe_template(want_template)}")
    return found


def _names(mechs) -> str:
    from hsm.core.profile import mechanism_name
    return "[" + ", ".join(mechanism_name(int(m)) for m in sorted(mechs)) + "]"


def describe_template(template: dict) -> str:
    """A template as the transcript and ``ceremony plan`` show it: ``CKA_X=true ...``."""
    parts = []
    for attr, value in template.items():
        name = "CKA_" + A(attr).name
        if isinstance(value, bool):
            parts.append(f"{name}={'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{name}={_names(value)}")
        elif isinstance(value, dict):
            parts.append(f"{name}={{{describe_template(value)}}}")
        elif attr in (A.CLASS,):
            parts.append(f"{name}={ObjectClass(value).name}")
        elif isinstance(value, int):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _describe_raw(tpl: dict) -> str:
    out = []
    for attr, raw in tpl.items():
        try:
            name = "CKA_" + A(attr).name
        except ValueError:
            name = f"0x{attr:x}"
        out.append(f"{name}={raw.hex()}")
    return "{" + " ".join(out) + "}"
