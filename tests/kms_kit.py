"""What the KMS tests share: a settable clock, a node configuration file, and the SDK fed with a
DEK the customer holds (decryption outside the KMS)."""

from __future__ import annotations

from pathlib import Path

from kms.node import config as configs


class Clock:
    """A clock a test moves by hand (``clock.now += ...``); starts at 2030-03-17."""

    def __init__(self):
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def kms_config(kit, tmp_path: Path, bundle_dir: Path, region: str = "eu",
               officers: str | None = None, **extra) -> configs.KmsConfig:
    """A node configuration (strict TOML, loaded by kms.node.config) for ``region`` of a ceremony
    kit: its regional token, the kit's primary certificate, a SQLite store under ``tmp_path``,
    and ``officers`` (TOML) pinned - by default alice, bob and carol, 2 of them."""
    lines = {"region": region, "token": kit.regionals[region].label,
             "primary_certificate": str(kit.pki / f"{kit.primary.label}-signing.pem"),
             "bundle_dir": str(bundle_dir), "store": str(tmp_path / f"kms-{region}.db"),
             "pbkdf2_iterations": 50, **extra}
    path = tmp_path / f"kms-{region}.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool)
                            else f"{k} = {str(v).lower()}\n" for k, v in lines.items())
                    + (kit.pins_toml() if officers is None else officers))
    return configs.load(path)


class CustomerDek:
    """The SDK's key provider fed with a DEK the customer supplied: decrypt only."""

    def __init__(self, dek):
        self.dek = dek

    def dek_for_decrypt(self, org_id, key_type, version):
        return self.dek

    def dek_for_encrypt(self, org_id, key_type):
        raise AssertionError("decrypt only")
