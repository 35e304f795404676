"""Shared by the cloud-export tests: the test plays the cloud provider with ``cryptography``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from hsm.core.pin import token_env
from hsm.testing import TestToken
from tests.helpers import run_hsm, self_signed_pem

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def pins(tt: TestToken) -> dict:
    return {token_env("HSM_PIN", tt.label): tt.user_pin.reveal(),
            token_env("HSM_SO_PIN", tt.label): tt.so_pin.reveal()}


def spki_der(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(private_key) -> str:
    return hashlib.sha256(spki_der(private_key)).hexdigest()


def write_key(private_key, path: Path, form: str = "pem") -> Path:
    """The provider's import key as a file: PEM SPKI (Azure), base64 DER (AWS, Alibaba APIs),
    or a self-signed certificate (Google's CSEK ingress certificate)."""
    if form == "pem":
        data = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    elif form == "b64der":
        data = base64.b64encode(spki_der(private_key)) + b"\n"
    elif form == "cert":
        data = self_signed_pem(private_key, "csek ingress (test)", hashes.SHA256())
    else:
        raise ValueError(form)
    path.write_bytes(data)
    return path


def new_rsa(bits: int):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def trust(tt: TestToken, provider: str, key_file: Path, private_key, *, words: bool = False):
    """The officer confirms the fingerprint the provider shows: hex, or read as PGP words."""
    confirmed = fingerprint(private_key)
    if words:
        from suite.fingerprint import to_words
        confirmed = " ".join(to_words(bytes.fromhex(confirmed)))
    return run_hsm(tt, "cloud-key", "trust", "--token", tt.label, "--provider", provider,
                   "--wrapping-key", str(key_file), "--fingerprint", confirmed, env=pins(tt))


def export(tt: TestToken, key: str, provider: str, key_file: Path, out: Path, *extra: str):
    return run_hsm(tt, "cloud-key", "export", "--token", tt.label, "--key", key,
                   "--provider", provider, "--wrapping-key", str(key_file), "--out", str(out),
                   *extra, env=pins(tt))


def printed_check_value(stdout: str) -> str:
    return re.search(r"check.value ([0-9a-f]{10})", stdout).group(1)


def kcv(key: bytes) -> str:
    mac = CMAC(algorithms.AES(key))
    mac.update(bytes(16))
    return mac.finalize()[:5].hex()


def provider_payload(provider: str, out: Path) -> bytes:
    """What the provider receives, decoded to the wrapped bytes as it documents them."""
    manifest = json.loads((out / "export.json").read_text())
    data = (out / manifest["wrapped_file"]).read_bytes()
    if provider in ("aws", "gcp-kms"):
        return data
    if provider in ("gcp-csek", "alibaba"):
        return base64.b64decode(data.strip(), validate=True)
    if provider == "azure":
        text = json.loads(data)["ciphertext"]
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    raise ValueError(provider)


def provider_unwrap(private_key, wrapped: bytes, hash_name: str, rsa_aes: bool) -> bytes:
    """Unwrap as the provider documents: RSA-OAEP (MGF1 of the same hash, no label), and for the
    RSA-AES formats the RFC 5649 unwrap of the rest under the key OAEP gave."""
    h = _HASH[hash_name]()
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=_HASH[hash_name]()), algorithm=h, label=None)
    if not rsa_aes:
        return private_key.decrypt(wrapped, oaep)
    k = private_key.key_size // 8
    ephemeral = private_key.decrypt(wrapped[:k], oaep)
    assert len(ephemeral) == 32  # AES-256, as every provider requires
    return aes_key_unwrap_with_padding(ephemeral, wrapped[k:])


_BYOK_TOP = {"schema_version", "header", "ciphertext", "generator"}


def check_byok_schema(doc: dict, kid: str) -> None:
    """Azure's .byok document, checked strictly (no extra or missing member, exact values)."""
    assert set(doc) == _BYOK_TOP, doc.keys()
    assert doc["schema_version"] == "1.0.0"
    assert set(doc["header"]) == {"kid", "alg", "enc"}
    assert doc["header"] == {"kid": kid, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"}
    assert isinstance(doc["generator"], str) and doc["generator"].startswith("hsm-suite")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", doc["ciphertext"]), "base64url without padding"
