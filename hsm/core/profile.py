"""What a token can do, probed once, and the choice of the strongest variant it supports.

The mechanism list alone does not answer the questions operations need: SoftHSM2 2.6.1 lists
RSA_PKCS_OAEP but accepts only SHA-1 in it; its 0x210A "AES_KEY_WRAP_PAD" is really RFC 5649 KWP
while NSS's 0x210A is a PKCS#7-padded variant; and whether CKA_WRAP_WITH_TRUSTED is enforced can
only be seen by trying. So the probe tries, with throw-away session objects it destroys again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from .errors import KeyPolicyViolation, MechanismUnsupported

# Mechanisms python-pkcs11 0.10 has no member for (PKCS#11 v3.0 values).
CKM_AES_KEY_WRAP = 0x2109
CKM_AES_KEY_WRAP_PAD = 0x210A
CKM_AES_KEY_WRAP_KWP = 0x210B
CKM_RSA_AES_KEY_WRAP = 0x1054
CKM_HKDF_DERIVE = 0x402A
CKM_SP800_108_COUNTER_KDF = 0x3AC
CKM_SP800_108_FEEDBACK_KDF = 0x3AD
CKM_SP800_108_DOUBLE_PIPELINE_KDF = 0x3AE
CKM_PKCS5_PBKD2 = 0x3B0

# OAEP hashes in order of preference. SHA-256 first, not SHA-512: it is the interoperable choice
# (cloud BYOK formats, NSS, OpenSSL defaults) and no longer hash makes OAEP meaningfully stronger.
OAEP_PREFERENCE = (("sha256", Mechanism.SHA256, MGF.SHA256),
                   ("sha384", Mechanism.SHA384, MGF.SHA384),
                   ("sha512", Mechanism.SHA512, MGF.SHA512),
                   ("sha1", Mechanism.SHA_1, MGF.SHA1))


_MECHANISMS = {code: Mechanism(code) for code in (CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD,
                                                  CKM_AES_KEY_WRAP_KWP)}


_EXTRA_NAMES = {CKM_AES_KEY_WRAP_KWP: "AES_KEY_WRAP_KWP", CKM_RSA_AES_KEY_WRAP: "RSA_AES_KEY_WRAP",
                CKM_HKDF_DERIVE: "HKDF_DERIVE", CKM_SP800_108_COUNTER_KDF: "SP800_108_COUNTER_KDF",
                CKM_SP800_108_FEEDBACK_KDF: "SP800_108_FEEDBACK_KDF",
                CKM_SP800_108_DOUBLE_PIPELINE_KDF: "SP800_108_DOUBLE_PIPELINE_KDF"}


def mechanism_name(mech: int) -> str:
    try:
        return Mechanism(mech).name
    except ValueError:
        return _EXTRA_NAMES.get(mech, f"0x{mech:08x}")


@dataclass
class MechanismEntry:
    name: str
    code: int
    min_key: int | None
    max_key: int | None
    flags: list[str]


@dataclass
class Profile:
    token_label: str
    token_serial: str
    token_model: str
    manufacturer: str
    library: str
    mechanisms: dict[int, MechanismEntry] = field(default_factory=dict)
    oaep_hashes: list[str] = field(default_factory=list)
    aes_kwp: int | None = None             # the mechanism code implementing RFC 5649, if any
    aes_key_wrap: bool = False             # RFC 3394 (input a multiple of 8 bytes)
    rsa_aes_key_wrap: bool = False
    hkdf: bool = False
    sp800_108: bool = False
    pbkdf2: bool = False
    trusted_wrap_enforced: bool | None = None
    # Key policy enforcement, each probed on throw-away session objects (see _probe_policy).
    unwrap_template_enforced: bool | None = None
    allowed_mechanisms_enforced: bool | None = None
    modifiable_enforced: bool | None = None
    destroyable_enforced: bool | None = None
    wrap_template_enforced: bool | None = None   # a wrapping key's CKA_WRAP_TEMPLATE
    ecdsa_with_hash: bool = False          # CKM_ECDSA_SHA384 on the token, else hash on the host
    kwp_length_query_short: bool = False   # NSS: C_WrapKey(KWP) size query is too small
    notes: list[str] = field(default_factory=list)

    def has(self, mech: int) -> bool:
        return int(mech) in self.mechanisms

    def require(self, mech: int, purpose: str) -> None:
        if not self.has(mech):
            raise MechanismUnsupported(
                f"{purpose} needs {mechanism_name(mech)} (0x{int(mech):x}), which the token does "
                "not offer", token=self.token_label, ckr="CKR_MECHANISM_INVALID", ckr_value=0x70,
                hint=self.offer_hint(purpose))

    def offer_hint(self, purpose: str) -> str:
        related = {"wrap": ("WRAP", "UNWRAP"), "sign": ("SIGN",), "derive": ("DERIVE",)}
        want = next((v for k, v in related.items() if k in purpose.lower()), ())
        names = sorted(e.name for e in self.mechanisms.values()
                       if not want or any(f in e.flags for f in want))
        return "the token offers: " + ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")

    # --- choices: each returns what it picked so callers can record it
    def oaep_choice(self) -> tuple[str, tuple]:
        for name, hash_mech, mgf in OAEP_PREFERENCE:
            if name in self.oaep_hashes:
                return name, (hash_mech, mgf, None)
        raise MechanismUnsupported("RSA-OAEP is not usable on this token", token=self.token_label,
                                   hint=self.offer_hint("wrap"))

    def aes_wrap_choice(self, key_length_bytes: int | None = None) -> tuple[str, Mechanism]:
        # python-pkcs11 only accepts Mechanism members, hence the conversion.
        if self.aes_kwp is not None:
            return "AES_KEY_WRAP_KWP", _MECHANISMS[self.aes_kwp]
        if self.aes_key_wrap and (key_length_bytes is None or key_length_bytes % 8 == 0):
            return "AES_KEY_WRAP", _MECHANISMS[CKM_AES_KEY_WRAP]
        raise MechanismUnsupported("no AES key-wrap mechanism (RFC 5649 / RFC 3394) on the token",
                                   token=self.token_label, hint=self.offer_hint("wrap"))

    def missing_enforcement(self) -> list[str]:
        """What the key policy relies on that this token was not seen to enforce."""
        checks = {"CKA_UNWRAP_TEMPLATE": self.unwrap_template_enforced,
                  "CKA_ALLOWED_MECHANISMS": self.allowed_mechanisms_enforced,
                  "CKA_MODIFIABLE": self.modifiable_enforced,
                  "CKA_DESTROYABLE": self.destroyable_enforced,
                  "CKA_WRAP_WITH_TRUSTED": self.trusted_wrap_enforced,
                  "CKA_WRAP_TEMPLATE": self.wrap_template_enforced}
        return [name for name, enforced in checks.items() if enforced is not True]

    def to_json(self) -> str:
        data = asdict(self)
        data["mechanisms"] = {e.name: {"code": f"0x{e.code:x}", "min_key": e.min_key,
                                       "max_key": e.max_key, "flags": e.flags}
                              for e in self.mechanisms.values()}
        return json.dumps(data, indent=2, sort_keys=True)


def probe(token) -> Profile:
    """Probe ``token`` (an :class:`hsm.core.token.Token`): mechanisms, then behaviour by trial."""
    p11 = token.p11token
    slot = p11.slot
    prof = Profile(token_label=token.label, token_serial=token.serial, token_model=p11.model,
                   manufacturer=p11.manufacturer_id, library=token.module.description)
    for mech in slot.get_mechanisms():
        code = int(mech)
        rv, info = token.module.raw.mechanism_info(token.slot_id, code)
        if rv != 0:
            prof.mechanisms[code] = MechanismEntry(mechanism_name(code), code, None, None, [])
            continue
        flags = [f.name for f in MechanismFlag
                 if f.value and f.value & (f.value - 1) == 0 and info.flags & f.value and f.name]
        prof.mechanisms[code] = MechanismEntry(mechanism_name(code), code,
                                               info.ulMinKeySize or None,
                                               info.ulMaxKeySize or None, flags)
    prof.aes_kwp = kwp_mechanism(token, prof.mechanisms)
    if prof.aes_kwp == CKM_AES_KEY_WRAP_PAD:
        prof.notes.append("SoftHSM2 implements RFC 5649 (KWP) under CKM_AES_KEY_WRAP_PAD 0x210a")
    if prof.aes_kwp == CKM_AES_KEY_WRAP_KWP and "Mozilla" in p11.manufacturer_id + \
            token.module.description:
        prof.kwp_length_query_short = True
        prof.notes.append("NSS softokn under-reports the C_WrapKey(KWP) output length; the layer "
                          "wraps with a corrected buffer (hsm.core.nss.wrap_key_kwp)")
    prof.aes_key_wrap = prof.has(CKM_AES_KEY_WRAP)
    prof.rsa_aes_key_wrap = prof.has(CKM_RSA_AES_KEY_WRAP)
    prof.hkdf = prof.has(CKM_HKDF_DERIVE)
    prof.sp800_108 = any(prof.has(m) for m in (CKM_SP800_108_COUNTER_KDF,
                                                CKM_SP800_108_FEEDBACK_KDF,
                                                CKM_SP800_108_DOUBLE_PIPELINE_KDF))
    prof.pbkdf2 = prof.has(CKM_PKCS5_PBKD2)
    prof.ecdsa_with_hash = prof.has(Mechanism.ECDSA_SHA384)
    with token.lease() as lease:
        if prof.has(Mechanism.RSA_PKCS_OAEP) and prof.has(Mechanism.RSA_PKCS_KEY_PAIR_GEN):
            prof.oaep_hashes = _probe_oaep(lease.session, prof)
        if prof.aes_kwp or prof.aes_key_wrap:
            prof.trusted_wrap_enforced = _probe_trusted_wrap(lease.session, prof)
    _probe_policy(token, prof)
    return prof


def kwp_mechanism(token, mechanisms=None) -> int | None:
    """The code that implements RFC 5649 KWP, from the mechanism list alone: usable on an SO
    session, where the probe's private session objects cannot be made."""
    p11 = token.p11token
    codes = mechanisms if mechanisms is not None else {int(m) for m in p11.slot.get_mechanisms()}
    softhsm = "SoftHSM" in p11.manufacturer_id or "SoftHSM" in token.module.description
    if CKM_AES_KEY_WRAP_KWP in codes:
        return CKM_AES_KEY_WRAP_KWP
    if CKM_AES_KEY_WRAP_PAD in codes and softhsm:
        return CKM_AES_KEY_WRAP_PAD
    return None


def require_enforcement(token, purpose: str, *, allow_weak: bool = False) -> None:
    """Refuse to create production keys on a token that does not enforce the key policy: there
    the policy would only be a promise of this code. ``allow_weak`` (rehearsals, tests of other
    tokens) proceeds with a loud warning on stderr."""
    missing = token.profile.missing_enforcement()
    if not missing:
        return
    what = ", ".join(missing)
    if allow_weak:
        import sys
        print(f"WARNING: token {token.label!r} does not enforce {what}; a user-PIN holder can "
              f"defeat the key policy of what this run creates ({purpose}). Rehearsal only.",
              file=sys.stderr)
        return
    raise KeyPolicyViolation(
        f"token {token.label!r} does not enforce {what}, which the key policy relies on; "
        f"refusing to {purpose}", operation="key policy check", token=token.label,
        hint="use a token that enforces them (`hsm info` shows what this one does); a "
             "rehearsal may pass --allow-weak-token")


# Throw-away objects of the policy probe: session objects on a session of their own, which the
# probe closes (a non-destroyable session object still dies with its session).
_PROBE_LABEL = "hsm-suite-policy-probe"


def _probe_policy(token, prof: Profile) -> None:
    raw = token.module.raw
    session = token.p11token.open(rw=True)  # shares the login of the token's anchor
    h = session.handle
    try:
        def find(label):
            return next(iter(session.get_objects({Attribute.LABEL: label})))
        aes = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
               Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.SENSITIVE: True}
        # CKA_MODIFIABLE and CKA_ALLOWED_MECHANISMS: a key allowed only AES-CMAC, asked for ECB.
        rv, _ = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            **aes, Attribute.LABEL: _PROBE_LABEL + "-m", Attribute.ENCRYPT: True,
            Attribute.SIGN: True, Attribute.EXTRACTABLE: True, Attribute.MODIFIABLE: False,
            Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_CMAC]})
        if rv == 0:
            key = find(_PROBE_LABEL + "-m")
            try:
                key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
                prof.allowed_mechanisms_enforced = False
            except pkcs11.MechanismInvalid:
                prof.allowed_mechanisms_enforced = True
            except pkcs11.PKCS11Error:
                prof.allowed_mechanisms_enforced = None
            prof.modifiable_enforced = raw.set_attributes(
                h, key.handle, {Attribute.ENCRYPT: False}) != 0
        # CKA_UNWRAP_TEMPLATE: a wrapping key whose template forbids extractable results.
        if prof.aes_kwp or prof.aes_key_wrap:
            _, mech = prof.aes_wrap_choice(32)
            rv, _ = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
                **aes, Attribute.LABEL: _PROBE_LABEL + "-w", Attribute.WRAP: True,
                Attribute.UNWRAP: True, Attribute.EXTRACTABLE: False,
                Attribute.UNWRAP_TEMPLATE: {Attribute.SENSITIVE: True,
                                            Attribute.EXTRACTABLE: False}})
            if rv == 0:
                wrapper = find(_PROBE_LABEL + "-w")
                target = session.generate_key(KeyType.AES, 256, store=False, template={
                    Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True})
                try:
                    wrapped = wrapper.wrap_key(target, mechanism=mech)
                    wrapper.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                                       mechanism=mech, store=False, template={
                                           Attribute.SENSITIVE: False,
                                           Attribute.EXTRACTABLE: True})
                    prof.unwrap_template_enforced = False
                except pkcs11.TemplateInconsistent:
                    prof.unwrap_template_enforced = True
                except pkcs11.PKCS11Error:
                    prof.unwrap_template_enforced = None
        if prof.aes_kwp or prof.aes_key_wrap:
            prof.wrap_template_enforced = _probe_wrap_template(raw, h, prof, aes)
        # CKA_DESTROYABLE: a data object that must not be destroyable.
        rv, obj = raw.create_object(h, {
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: False,
            Attribute.LABEL: _PROBE_LABEL + "-d", Attribute.DESTROYABLE: False})
        if rv == 0:  # a token that rejects the attribute (NSS: 0x13) leaves it unknown
            prof.destroyable_enforced = raw.destroy_object(h, obj) != 0
    finally:
        raw.close_session(h)  # never session.close(): that would C_Logout every session


def _probe_wrap_template(raw, h: int, prof: Profile, aes: dict) -> bool | None:
    """CKA_WRAP_TEMPLATE: a wrapping key whose template admits only keys allowed [AES_CMAC,
    SHA256_HMAC] (the trusted keys' way of telling release secrets apart) must wrap such a key
    and refuse one allowed [AES_CMAC] alone. True: enforced; False: the other key was wrapped
    too; None: even the admitted key was refused, so the probe says nothing."""
    from hsm.keys.attributes import wrap_template_list
    _, mech = prof.aes_wrap_choice(32)
    admitted = wrap_template_list((Mechanism.AES_CMAC, Mechanism.SHA256_HMAC))
    rv, wrapper = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
        **aes, Attribute.LABEL: _PROBE_LABEL + "-t", Attribute.WRAP: True,
        Attribute.EXTRACTABLE: False,
        Attribute.WRAP_TEMPLATE: {Attribute.ALLOWED_MECHANISMS: admitted}})
    if rv != 0:
        return None
    results = []
    for mechs in (admitted, [int(Mechanism.AES_CMAC)]):
        rv, target = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            **aes, Attribute.LABEL: _PROBE_LABEL + "-c", Attribute.EXTRACTABLE: True,
            Attribute.SIGN: True, Attribute.ALLOWED_MECHANISMS: mechs})
        if rv != 0:
            return None
        results.append(raw.wrap_key(h, int(mech), None, wrapper, target)[0])
    admitted_rv, other_rv = results
    if admitted_rv != 0:
        return None
    return other_rv != 0


# A fixed odd 2048-bit number: RSA encryption is defined for any modulus, and a token checks
# OAEP parameters when the operation starts, so the probe needs no key generation (which costs
# 0.2-0.8 s on SoftHSM2). Nothing encrypted under it is ever decrypted.
_PROBE_MODULUS = (int.from_bytes(hashlib.sha512(b"hsm-suite OAEP probe").digest() * 4, "big")
                  | (1 << 2047) | 1).to_bytes(256, "big")


def _probe_oaep(session, prof: Profile) -> list[str]:
    pub = session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: False, Attribute.ENCRYPT: True, Attribute.WRAP: False,
        Attribute.VERIFY: False, Attribute.MODULUS: _PROBE_MODULUS,
        Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"})
    accepted = []
    try:
        for name, hash_mech, mgf in OAEP_PREFERENCE:
            try:
                ct = pub.encrypt(b"probe", mechanism=Mechanism.RSA_PKCS_OAEP,
                                 mechanism_param=(hash_mech, mgf, None))
                if len(ct) == len(_PROBE_MODULUS):
                    accepted.append(name)
            except pkcs11.PKCS11Error:
                continue
    finally:
        pub.destroy()
    return accepted


def _probe_trusted_wrap(session, prof: Profile) -> bool | None:
    """Can an untrusted key wrap a CKA_WRAP_WITH_TRUSTED key? If it can, nothing is enforced."""
    _, mech = prof.aes_wrap_choice(32)
    target = session.generate_key(KeyType.AES, 256, store=False,
                                  template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True,
                                            Attribute.WRAP_WITH_TRUSTED: True})
    wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                   capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP)
    try:
        wrapper.wrap_key(target, mechanism=mech)
        return False
    except (pkcs11.KeyNotWrappable, pkcs11.KeyUnextractable, pkcs11.FunctionFailed,
            pkcs11.AttributeValueInvalid, pkcs11.WrappingKeyHandleInvalid):
        return True
    except pkcs11.PKCS11Error:
        return None
    finally:
        target.destroy()
        wrapper.destroy()
