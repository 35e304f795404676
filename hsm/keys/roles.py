"""Key roles: what each long-term key is for, and the PKCS#11 templates that say so.

Each private key gets exactly the usages its role needs. In particular an encryption role's private
key may UNWRAP but not DECRYPT: a key with both lets anyone holding the PIN C_Decrypt a wrapped
blob and read the "sensitive" key inside it (the classic PKCS#11 wrap/decrypt attack).
"""

from __future__ import annotations

from dataclasses import dataclass

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from . import attributes


@dataclass(frozen=True)
class KeyRole:
    name: str            # e.g. "primary-signing"; the key label is "<token>-<purpose>" by default
    purpose: str         # "signing" | "encryption"
    algorithm: str       # "rsa" | "ec"
    bits: int = 0        # RSA modulus size
    curve: str = ""      # EC named curve (asn1crypto name)
    signature: str = ""  # "ecdsa-sha384" | "rsa-pss-sha384" for signing roles

    @property
    def key_type(self) -> KeyType:
        return KeyType.RSA if self.algorithm == "rsa" else KeyType.EC

    @property
    def generation_mechanism(self) -> Mechanism:
        return (Mechanism.RSA_PKCS_KEY_PAIR_GEN if self.algorithm == "rsa"
                else Mechanism.EC_KEY_PAIR_GEN)

    @property
    def policy(self) -> attributes.KeyPolicy:
        """The private key's policy (hsm.keys.attributes): what the token must refuse for this role."""
        if self.name == "regional-audit-signing":
            return attributes.AUDIT_SIGNING
        if self.purpose == "signing":
            return attributes.SIGNING_ECDSA if self.algorithm == "ec" else attributes.SIGNING_RSA_PSS
        return (attributes.PRIMARY_ENCRYPTION if self.name == "primary-encryption"
                else attributes.REGIONAL_ENCRYPTION)

    def mechanisms_for(self, profile) -> tuple[int, ...]:
        """The CKA_ALLOWED_MECHANISMS to generate with on this token: exactly the mechanism the
        layer will use for the role (hsm.core.ops.sign picks ECDSA_SHA384 where the token has it)."""
        if self.signature == "ecdsa-sha256":   # the audit key: raw ECDSA, hashed on the host
            return (Mechanism.ECDSA,)
        if self.signature == "ecdsa-sha384":
            return (Mechanism.ECDSA_SHA384,) if profile.ecdsa_with_hash else (Mechanism.ECDSA,)
        if self.signature == "rsa-pss-sha384":
            return (Mechanism.SHA384_RSA_PKCS_PSS,)
        return (Mechanism.RSA_PKCS_OAEP,)

    def describe(self) -> str:
        size = f"RSA-{self.bits}" if self.algorithm == "rsa" else f"EC {self.curve}"
        return f"{self.name}: {size}, {self.purpose}" + (f", {self.signature}" if self.signature
                                                         else "")

    def private_template(self, label: str, key_id: bytes, profile) -> dict:
        """The policy's attributes (non-modifiable, allowed mechanisms, unwrap template)."""
        return {**self.policy.creation_attributes(self.mechanisms_for(profile)),
                Attribute.KEY_TYPE: self.key_type, Attribute.LABEL: label, Attribute.ID: key_id}

    def public_template(self, label: str, key_id: bytes) -> dict:
        signing = self.purpose == "signing"
        tpl = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: signing,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: not signing,
            Attribute.MODIFIABLE: False,
        }
        if self.algorithm == "rsa":
            tpl[Attribute.MODULUS_BITS] = self.bits
            tpl[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        return tpl


PRIMARY_ENCRYPTION = KeyRole("primary-encryption", "encryption", "rsa", bits=4096)
REGIONAL_ENCRYPTION = KeyRole("regional-encryption", "encryption", "rsa", bits=4096)
SIGNING_ROLES = {
    "ecdsa-p384": KeyRole("primary-signing", "signing", "ec", curve="secp384r1",
                          signature="ecdsa-sha384"),
    "rsa-pss-3072": KeyRole("primary-signing", "signing", "rsa", bits=3072,
                            signature="rsa-pss-sha384"),
    "rsa-pss-4096": KeyRole("primary-signing", "signing", "rsa", bits=4096,
                            signature="rsa-pss-sha384"),
}
DEFAULT_SIGNING = "ecdsa-p384"
# Signs the KMS audit log's checkpoints (kms.server.audit): P-256, so a checkpoint costs one
# ~63 us token call on SoftHSM2 (P-384: ~1 ms), once per batch.
REGIONAL_AUDIT_SIGNING = KeyRole("regional-audit-signing", "signing", "ec", curve="secp256r1",
                                 signature="ecdsa-sha256")
