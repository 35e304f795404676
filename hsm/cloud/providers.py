"""What each cloud provider takes: wrapping algorithms, key sizes, output files, next command.

Facts from the providers' public documentation (``shared/formats.md`` lists the sources). Every
RSA-AES variant is OAEP (MGF1 of the same hash, empty label) of an ephemeral AES-256 key
followed by the RFC 5649 wrap of the key: 512 + 40 bytes for an RSA-4096 import key.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from hsm.core.errors import UsageError


@dataclass(frozen=True)
class Algorithm:
    name: str
    hash: str                       # OAEP hash and MGF1 hash: "sha1" or "sha256"
    rsa_aes: bool                   # OAEP of an ephemeral AES-256 key, then RFC 5649 wrap
    rsa_bits: int | None = None     # the import key size the method is defined for


@dataclass(frozen=True)
class Provider:
    name: str
    algorithms: tuple[Algorithm, ...]
    key_bits: tuple[int, ...]
    rsa_bits: tuple[int, ...] = (2048, 3072, 4096)
    needs_import_token: bool = False
    needs_kid: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def algorithm(self, name: str | None, oaep_hashes: list[str]) -> Algorithm:
        """The named algorithm, or the first one the token can do (SHA-256 before SHA-1)."""
        known = {a.name: a for a in self.algorithms}
        if name is None:
            usable = self.usable(oaep_hashes)
            if not usable:
                raise UsageError(f"the token can do none of {self.name}'s algorithms",
                                 hint=f"its RSA-OAEP hashes: {', '.join(oaep_hashes) or 'none'}")
            return sorted(usable, key=lambda a: a.hash != "sha256")[0]
        if name not in known:
            raise UsageError(f"unknown {self.name} algorithm {name!r}",
                             hint="choose one of " + ", ".join(known))
        return known[name]

    def usable(self, oaep_hashes: list[str]) -> list[Algorithm]:
        return [a for a in self.algorithms if a.hash in oaep_hashes]


A = Algorithm
PROVIDERS = {p.name: p for p in (
    Provider("aws", (A("RSAES_OAEP_SHA_1", "sha1", False), A("RSAES_OAEP_SHA_256", "sha256", False),
                     A("RSA_AES_KEY_WRAP_SHA_1", "sha1", True),
                     A("RSA_AES_KEY_WRAP_SHA_256", "sha256", True)),
             key_bits=(256,), needs_import_token=True),
    Provider("gcp-csek", (A("RSA_OAEP_SHA1", "sha1", False),), key_bits=(256,)),
    Provider("gcp-kms", (A("RSA_OAEP_3072_SHA1_AES_256", "sha1", True, 3072),
                         A("RSA_OAEP_4096_SHA1_AES_256", "sha1", True, 4096),
                         A("RSA_OAEP_3072_SHA256_AES_256", "sha256", True, 3072),
                         A("RSA_OAEP_4096_SHA256_AES_256", "sha256", True, 4096),
                         A("RSA_OAEP_3072_SHA256", "sha256", False, 3072),
                         A("RSA_OAEP_4096_SHA256", "sha256", False, 4096)),
             key_bits=(256,), rsa_bits=(3072, 4096)),
    Provider("azure", (A("CKM_RSA_AES_KEY_WRAP", "sha1", True),), key_bits=(128, 192, 256),
             needs_kid=True),
    Provider("alibaba", (A("RSAES_OAEP_SHA_1", "sha1", False),
                         A("RSAES_OAEP_SHA_256", "sha256", False)),
             key_bits=(256,), rsa_bits=(2048,), needs_import_token=True),
)}


def provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise UsageError(f"unknown provider {name!r}", hint="one of " + ", ".join(PROVIDERS))
    return PROVIDERS[name]


def check_sizes(prov: Provider, alg: Algorithm, rsa_bits: int, key_bytes: int) -> None:
    if rsa_bits not in prov.rsa_bits or (alg.rsa_bits and alg.rsa_bits != rsa_bits):
        want = alg.rsa_bits or "/".join(str(b) for b in prov.rsa_bits)
        raise UsageError(f"{prov.name} {alg.name} takes an RSA-{want} import key, this one is "
                         f"RSA-{rsa_bits}", hint="use the import key the provider issued for it")
    if key_bytes * 8 not in prov.key_bits:
        raise UsageError(f"{prov.name} imports {'/'.join(map(str, prov.key_bits))}-bit AES keys, "
                         f"this key has {key_bytes * 8} bits")


def refuse_unsupported(prov: Provider, alg: Algorithm, token_label: str,
                       oaep_hashes: list[str]) -> None:
    """An algorithm whose OAEP hash the token cannot do is refused, naming the token's limit and
    what does work (SoftHSM2 2.6.1 does RSA-OAEP with SHA-1 only)."""
    if alg.hash in oaep_hashes:
        return
    works = [a.name for a in prov.usable(oaep_hashes)]
    raise UsageError(
        f"{prov.name} {alg.name} needs RSA-OAEP with {alg.hash.upper().replace('SHA', 'SHA-')}, "
        f"but token {token_label!r} does RSA-OAEP with "
        f"{', '.join(h.upper().replace('SHA', 'SHA-') for h in oaep_hashes) or 'no hash'} only",
        hint=("algorithms that work on this token: " + ", ".join(works)) if works
        else "no algorithm of this provider works on this token")


# ------------------------------------------------------------------------------ outputs
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def outputs(prov: Provider, alg: Algorithm, key_label: str, wrapped: bytes, *,
            import_token: bytes | None, kid: str | None, generator: str
            ) -> tuple[str, dict[str, bytes]]:
    """(name of the file the provider takes, {file name: bytes}) for one export."""
    if prov.needs_import_token and import_token is None:
        raise UsageError(f"{prov.name} needs the import token that came with its wrapping key",
                         hint="pass --import-token FILE")
    if prov.name == "aws":
        return "EncryptedKeyMaterial.bin", {"EncryptedKeyMaterial.bin": wrapped,
                                            "ImportToken.bin": import_token or b""}
    if prov.name == "gcp-csek":
        return "rsaEncryptedKey.txt", {"rsaEncryptedKey.txt": base64.b64encode(wrapped) + b"\n"}
    if prov.name == "gcp-kms":
        return "wrapped_key.bin", {"wrapped_key.bin": wrapped,
                                   "wrapped_key.b64": base64.b64encode(wrapped) + b"\n"}
    if prov.name == "azure":
        doc = {"schema_version": "1.0.0",
               "header": {"kid": kid, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
               "ciphertext": b64url(wrapped), "generator": generator}
        name = f"{key_label}.byok"
        return name, {name: (json.dumps(doc, indent=2) + "\n").encode()}
    if prov.name == "alibaba":
        return "EncryptedKeyMaterial.txt", {
            "EncryptedKeyMaterial.txt": base64.b64encode(wrapped) + b"\n",
            "ImportToken.txt": (import_token or b"").strip() + b"\n"}
    raise AssertionError(prov.name)


def next_command(prov: Provider, alg: Algorithm, out: str, key_label: str) -> str:
    """What the customer runs at the provider next (placeholders in capitals)."""
    if prov.name == "aws":
        return (f"aws kms import-key-material --key-id KEY_ID "
                f"--encrypted-key-material fileb://{out}/EncryptedKeyMaterial.bin "
                f"--import-token fileb://{out}/ImportToken.bin "
                f"--expiration-model KEY_MATERIAL_DOES_NOT_EXPIRE"
                f"   # the import token and public key came from get-parameters-for-import "
                f"--wrapping-algorithm {alg.name}; they are valid 24 h")
    if prov.name == "gcp-csek":
        return (f"gcloud compute disks create DISK --zone ZONE --csek-key-file KEYFILE.json"
                f"   # KEYFILE.json: [{{\"uri\": \"https://www.googleapis.com/compute/v1/projects/"
                f"PROJECT/zones/ZONE/disks/DISK\", \"key\": \"<{out}/rsaEncryptedKey.txt>\", "
                f"\"key-type\": \"rsa-encrypted\"}}]")
    if prov.name == "gcp-kms":
        return (f"gcloud kms keys versions import --location LOCATION --keyring KEYRING "
                f"--key KEY --import-job IMPORT_JOB --algorithm google-symmetric-encryption "
                f"--wrapped-key-file {out}/wrapped_key.bin"
                f"   # the import job's method must be {alg.name}")
    if prov.name == "azure":
        return (f"az keyvault key import --hsm-name MANAGED_HSM --name {key_label} "
                f"--byok-file {out}/{key_label}.byok --kty oct-HSM"
                f"   # AES keys import into Managed HSM; the KEK is the --kid key")
    if prov.name == "alibaba":
        return (f"aliyun kms ImportKeyMaterial --KeyId KEY_ID "
                f"--EncryptedKeyMaterial \"$(cat {out}/EncryptedKeyMaterial.txt)\" "
                f"--ImportToken \"$(cat {out}/ImportToken.txt)\""
                f"   # from GetParametersForImport --WrappingAlgorithm {alg.name} "
                f"--WrappingKeySpec RSA_2048")
    raise AssertionError(prov.name)
