"""``hsm audit``: every object on a token, with its attributes and each deviation from its policy.

Roles are recognised by the labels this suite gives (``<token>-signing``, ``<token>-encryption``,
``<token>-audit``, ``trusted-*``, ``rel-*``/``practice-rel-*``, ``hsm-suite-release-*``, ``cloud-import-*``, ``xks-*``, and
cloud keys by their CKA_ID prefix). An object no role claims is
listed as ``unrecognised``: it may belong to another application, so it is shown, not failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pkcs11 import Attribute, KeyType, ObjectClass

from hsm.core.errors import HsmError
from hsm.core.token import Token
from hsm.keys import attributes
from hsm.keys.export import APPLICATION, RECORD_PREFIX

# Attributes shown for every object (booleans only: values of secrets are never read).
SHOWN = (Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
         Attribute.WRAP_WITH_TRUSTED, Attribute.TRUSTED, Attribute.MODIFIABLE,
         Attribute.COPYABLE, Attribute.DESTROYABLE, Attribute.LOCAL, Attribute.ALWAYS_SENSITIVE,
         Attribute.NEVER_EXTRACTABLE, Attribute.SIGN, Attribute.VERIFY, Attribute.ENCRYPT,
         Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP, Attribute.DERIVE)


@dataclass
class AuditedObject:
    object_class: str
    label: str
    id: str
    key_type: str | None
    role: str
    attributes: dict = field(default_factory=dict)
    allowed_mechanisms: list[str] | None = None
    deviations: list[str] = field(default_factory=list)


def _role(token_label: str, cls: ObjectClass, label: str, key_type, app,
          has_signing: bool, key_id: bytes = b"", kwp: int | None = None,
          rsa_aes: bool = False) -> attributes.KeyPolicy | None:
    from hsm.cloud.keys import ID_PREFIX, IMPORT_LABEL_PREFIX
    if kwp is not None and cls is ObjectClass.SECRET_KEY and key_id.startswith(ID_PREFIX):
        return attributes.cloud_key(kwp)
    if kwp is not None and cls is ObjectClass.PUBLIC_KEY and \
            label.startswith(IMPORT_LABEL_PREFIX):
        return attributes.cloud_import_key(kwp, rsa_aes)
    if cls is ObjectClass.PRIVATE_KEY and label == f"{token_label}-signing":
        return attributes.SIGNING_ECDSA if key_type is KeyType.EC else attributes.SIGNING_RSA_PSS
    if cls is ObjectClass.PRIVATE_KEY and label == f"{token_label}-encryption":
        # The primary is the token that also holds the signing key.
        return attributes.PRIMARY_ENCRYPTION if has_signing else attributes.REGIONAL_ENCRYPTION
    if cls is ObjectClass.PRIVATE_KEY and label == f"{token_label}-audit":
        return attributes.AUDIT_SIGNING
    if cls is ObjectClass.PUBLIC_KEY and label in (f"{token_label}-signing",
                                                   f"{token_label}-encryption",
                                                   f"{token_label}-audit"):
        return attributes.PUBLIC_KEY
    if cls is ObjectClass.PUBLIC_KEY and label.startswith("trusted-"):
        return attributes.TRUSTED_RECIPIENT
    if cls is ObjectClass.SECRET_KEY and label.startswith(("rel-", "practice-rel-")):
        return attributes.RELEASE_SEED if key_type is KeyType.GENERIC_SECRET \
            else attributes.RELEASE_AES
    # BYOK keys: byok-seed-<org>, byok-dek-<org>, and the regional byok-issuer.
    if cls is ObjectClass.PRIVATE_KEY and label.startswith("byok-seed-"):
        return attributes.BYOK_SEED
    if cls is ObjectClass.PRIVATE_KEY and label.startswith("byok-dek-"):
        return attributes.BYOK_DEK
    if cls is ObjectClass.PRIVATE_KEY and label.startswith("byok-issuer-"):
        return attributes.SIGNING_ECDSA
    if cls is ObjectClass.PUBLIC_KEY and label.startswith("byok-"):
        return attributes.PUBLIC_KEY
    if cls is ObjectClass.SECRET_KEY and label.startswith("xks-"):
        return attributes.XKS_KEY
    if cls is ObjectClass.DATA and app == APPLICATION and label.startswith(RECORD_PREFIX):
        return attributes.RELEASE_RECORD
    return None


def audit(token: Token) -> list[AuditedObject]:
    raw = token.module.raw
    kwp, rsa_aes = token.profile.aes_kwp, token.profile.rsa_aes_key_wrap

    def scan(lease):
        from hsm.core._cryptoki import decode_ulong
        from hsm.core.profile import mechanism_name
        h = lease.session.handle
        found = list(lease.session.get_objects({Attribute.TOKEN: True}))
        # python-pkcs11 returns typed objects; their handles feed the raw attribute reads.
        rows = []
        for obj in found:
            rv, cls_raw = raw.get_attribute(h, obj.handle, Attribute.CLASS)
            if cls_raw is None:
                raise HsmError("the token does not report an object's CKA_CLASS",
                               operation="C_GetAttributeValue", token=token.label)
            cls = ObjectClass(decode_ulong(cls_raw))
            label = _text(raw.get_attribute(h, obj.handle, Attribute.LABEL)[1])
            key_id = (raw.get_attribute(h, obj.handle, Attribute.ID)[1] or b"").hex()
            kt_raw = raw.get_attribute(h, obj.handle, Attribute.KEY_TYPE)[1]
            key_type = KeyType(decode_ulong(kt_raw)) if kt_raw else None
            app = _text(raw.get_attribute(h, obj.handle, Attribute.APPLICATION)[1])
            rows.append((obj, cls, label, key_id, key_type, app))
        has_signing = any(r[1] is ObjectClass.PRIVATE_KEY and r[2] == f"{token.label}-signing"
                          for r in rows)
        out = []
        for obj, cls, label, key_id, key_type, app in rows:
            pol = _role(token.label, cls, label, key_type, app, has_signing,
                        bytes.fromhex(key_id), kwp, rsa_aes)
            shown = {}
            for attr in SHOWN:
                _, value = raw.get_attribute(h, obj.handle, attr)
                if value is not None:
                    shown[attr.name] = value != b"\x00" * len(value)
            _, mechs = raw.get_mechanism_list(h, obj.handle, Attribute.ALLOWED_MECHANISMS)
            out.append(AuditedObject(
                cls.name.lower(), label, key_id, key_type.name if key_type else None,
                pol.name if pol else "unrecognised", shown,
                [mechanism_name(m) for m in mechs] if mechs else None,
                attributes.deviations(raw, h, obj.handle, pol) if pol else []))
        return out
    return token.run("C_FindObjects", scan)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def as_json(rows: list[AuditedObject]) -> list[dict]:
    return [asdict(r) for r in rows]
