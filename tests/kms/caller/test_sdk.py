"""kms.caller.sdk.FieldEncryptor: the encryption-service SDK (real AES-256-GCM from `cryptography`).

The provider is a small in-test stand-in for the KMS (DEKs in a dict, versions, rotation,
destruction); one test runs the SDK over the real encrypted KeyCache.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.dek_cache import KeyCache
from kms.errors import KeyDestroyed, KmsError, UnknownTenant, UnknownVersion
from kms.caller.sdk import (FORMAT_VERSION, MAGIC, AuthenticationFailed, CiphertextError,
                            FieldEncryptor, MalformedCiphertext, TenantMismatch,
                            UnsupportedFormat, parse_header)


class Provider:
    """KMS provider double: per (org, key type) a list of versions; each a DEK or destroyed."""

    def __init__(self):
        self.deks: dict[tuple[str, str, int], bytes | None] = {}
        self.active: dict[tuple[str, str], int] = {}
        self.derivation: dict[tuple[str, str, int], str] = {}
        self.calls = 0

    def create(self, org: str, key_type: str = "field", derivation: str = "PBKDF2") -> int:
        version = self.active.get((org, key_type), 0) + 1
        self.deks[(org, key_type, version)] = os.urandom(32)
        self.derivation[(org, key_type, version)] = derivation
        self.active[(org, key_type)] = version
        return version

    rotate = create

    def destroy(self, org: str, key_type: str, version: int) -> None:
        self.deks[(org, key_type, version)] = None

    def dek_for_encrypt(self, org, key_type):
        self.calls += 1
        if (org, key_type) not in self.active:
            raise UnknownTenant(f"unknown tenant {org!r} (no {key_type} key)")
        v = self.active[(org, key_type)]
        dek = self.deks[(org, key_type, v)]
        if dek is None:
            raise KeyDestroyed("destroyed")
        return v, self.derivation[(org, key_type, v)], dek

    def dek_for_decrypt(self, org, key_type, version):
        self.calls += 1
        if not any(o == org for o, _ in self.active):
            raise UnknownTenant(f"unknown tenant {org!r}")
        if (org, key_type, version) not in self.deks:
            raise UnknownVersion(f"no {key_type} key version {version} for {org!r}")
        dek = self.deks[(org, key_type, version)]
        if dek is None:
            raise KeyDestroyed("gone")
        return dek


@pytest.fixture
def provider():
    p = Provider()
    p.create("org-a")
    p.create("org-b")
    p.create("org-a", "database", derivation="NONE")
    return p


@pytest.fixture
def sdk(provider):
    return FieldEncryptor(provider)


# --------------------------------------------------------------------------- fields
def test_round_trip(sdk):
    for pt in (b"", b"x", os.urandom(100), os.urandom(5000)):
        blob = sdk.encrypt("org-a", pt)
        assert sdk.decrypt("org-a", blob) == pt
        # (a 1-byte plaintext turns up by chance in ~11% of random 29-byte tails: check >= 16 B)
        assert pt not in blob or len(pt) < 16


def test_round_trip_with_aad(sdk):
    blob = sdk.encrypt("org-a", b"secret", aad=b"row-42")
    assert sdk.decrypt("org-a", blob, aad=b"row-42") == b"secret"
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-a", blob)
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-a", blob, aad=b"row-43")
    plain = sdk.encrypt("org-a", b"secret")
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-a", plain, aad=b"row-42")


def test_header_layout(sdk):
    pt = os.urandom(100)
    blob = sdk.encrypt("org-a", pt)
    org = b"org-a"
    assert blob[:3] == MAGIC == b"HSF"
    assert blob[3] == FORMAT_VERSION == 1
    assert blob[4:6] == struct.pack(">H", len(org)) and blob[6:6 + len(org)] == org
    pos = 6 + len(org)
    assert blob[pos] == 5 and blob[pos + 1:pos + 6] == b"field"
    pos += 6
    assert struct.unpack(">I", blob[pos:pos + 4]) == (1,)
    assert blob[pos + 4] == 1                      # PBKDF2
    header = parse_header(blob)
    assert header == (1, "org-a", "field", 1, "PBKDF2", blob[pos + 5:pos + 17], pos + 17)
    assert len(blob) == header.length + len(pt) + 16
    db = parse_header(sdk.encrypt("org-a", b"x", key_type="database"))
    assert (db.key_type, db.key_version, db.derivation) == ("database", 1, "NONE")


def test_fresh_nonce_every_time(sdk):
    blobs = {sdk.encrypt("org-a", b"same") for _ in range(50)}
    assert len(blobs) == 50
    assert len({parse_header(b).nonce for b in blobs}) == 50


def test_non_ascii_org_id(provider):
    provider.create("société-Ω")
    sdk = FieldEncryptor(provider)
    assert sdk.decrypt("société-Ω", sdk.encrypt("société-Ω", b"v")) == b"v"


def test_provider_must_have_both_methods():
    with pytest.raises(TypeError):
        FieldEncryptor(object())


def test_unknown_tenant_passes_through(sdk):
    with pytest.raises(UnknownTenant):
        sdk.encrypt("org-nobody", b"x")


def test_unknown_key_type_refused(sdk, provider):
    provider.create("org-a", "blob")
    with pytest.raises(ValueError, match="unknown key type"):
        sdk.encrypt("org-a", b"x", key_type="blob")


# --------------------------------------------------------------------------- rotation and destruction
def test_rotation_old_blobs_still_decrypt(sdk, provider):
    old = sdk.encrypt("org-a", b"written before")
    assert provider.rotate("org-a") == 2
    new = sdk.encrypt("org-a", b"written after")
    assert parse_header(old).key_version == 1 and parse_header(new).key_version == 2
    assert sdk.decrypt("org-a", old) == b"written before"
    assert sdk.decrypt("org-a", new) == b"written after"


def test_destroyed_key(sdk, provider):
    old = sdk.encrypt("org-a", b"shredded")
    provider.rotate("org-a")
    new = sdk.encrypt("org-a", b"kept")
    provider.destroy("org-a", "field", 1)
    with pytest.raises(KeyDestroyed) as info:
        sdk.decrypt("org-a", old)
    msg = str(info.value)
    assert msg.startswith("key destroyed")
    assert "'org-a'" in msg and "'field'" in msg and "version 1" in msg
    assert isinstance(info.value, KmsError)
    assert sdk.decrypt("org-a", new) == b"kept"
    with pytest.raises(KeyDestroyed, match="key destroyed"):
        sdk.decrypt_record("org-a", sdk.encrypt_record("org-a", {"f": "v"}) | {"g": old})


def test_destroyed_database_key_names_its_type(sdk, provider):
    blob = sdk.encrypt("org-a", b"row", key_type="database")
    provider.destroy("org-a", "database", 1)
    with pytest.raises(KeyDestroyed, match=r"key destroyed: org 'org-a', key type 'database', "
                                           r"version 1"):
        sdk.decrypt("org-a", blob)


# --------------------------------------------------------------------------- bad blobs
def test_every_single_byte_tamper_fails(sdk):
    blob = sdk.encrypt("org-a", os.urandom(40), aad=b"ctx")
    seen: set[str] = set()
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            bad = blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1:]
            with pytest.raises(KmsError) as info:
                sdk.decrypt("org-a", bad, aad=b"ctx")
            seen.add(type(info.value).__name__)
    # A changed header names what changed; a changed body fails its authentication.
    assert seen <= {"MalformedCiphertext", "UnsupportedFormat", "TenantMismatch",
                    "AuthenticationFailed", "UnknownVersion", "UnknownTenant"}, seen
    assert "AuthenticationFailed" in seen


def test_every_truncation_and_extension_fails(sdk):
    blob = sdk.encrypt("org-a", b"hello")
    for n in range(len(blob)):
        with pytest.raises(CiphertextError):
            sdk.decrypt("org-a", blob[:n])
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-a", blob + b"\x00")


def test_clear_errors(sdk):
    blob = sdk.encrypt("org-a", b"hello")
    with pytest.raises(MalformedCiphertext, match="truncated"):
        sdk.decrypt("org-a", b"HS")
    with pytest.raises(MalformedCiphertext, match="magic"):
        sdk.decrypt("org-a", b"XYZ" + blob[3:])
    with pytest.raises(UnsupportedFormat, match="format version 2"):
        sdk.decrypt("org-a", blob[:3] + b"\x02" + blob[4:])
    with pytest.raises(MalformedCiphertext):
        sdk.decrypt("org-a", os.urandom(64))
    with pytest.raises(TypeError):
        sdk.decrypt("org-a", "not bytes")
    garbled_kt = blob.replace(b"field", b"fielx")
    with pytest.raises(MalformedCiphertext, match="unknown key type"):
        sdk.decrypt("org-a", garbled_kt)


def test_wrong_org(sdk, provider):
    blob = sdk.encrypt("org-a", b"a's data")
    with pytest.raises(TenantMismatch, match="belongs to org 'org-a', not 'org-b'"):
        sdk.decrypt("org-b", blob)
    # Rewriting the header's org does not help either: the header is authenticated.
    forged = blob.replace(b"org-a", b"org-b", 1)
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-b", forged)


def test_blob_from_another_key_type_version_is_not_accepted(sdk, provider):
    """Re-labelling a blob as another existing version or key type fails authentication."""
    provider.rotate("org-a")
    blob = sdk.encrypt("org-a", b"v2 data")
    h = parse_header(blob)
    ver_at = h.length - 12 - 1 - 4
    relabelled = blob[:ver_at] + struct.pack(">I", 1) + blob[ver_at + 4:]
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt("org-a", relabelled)


# --------------------------------------------------------------------------- records
def test_record_round_trip_keeps_types(sdk, provider):
    record = {"email": "ana@example.com", "ssn": b"\x00\x01\x02", "note": "", "blob": b"",
              "ünïcode": "Ω≈ç√"}
    calls = provider.calls
    enc = sdk.encrypt_record("org-a", record)
    assert provider.calls == calls + 1           # one DEK fetch per record
    assert set(enc) == set(record) and all(isinstance(v, bytes) for v in enc.values())
    assert b"ana@example.com" not in b"".join(enc.values())
    assert sdk.decrypt_record("org-a", enc) == record


def test_record_field_swap_fails(sdk):
    enc = sdk.encrypt_record("org-a", {"email": "ana@example.com", "name": "Ana"})
    swapped = {"email": enc["name"], "name": enc["email"]}
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt_record("org-a", swapped)
    with pytest.raises(AuthenticationFailed):      # a field blob is not a plain field blob
        sdk.decrypt("org-a", enc["email"])
    renamed = {"mail": enc["email"]}
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt_record("org-a", renamed)


def test_record_aad_binds_fields_to_their_record(sdk):
    r1 = sdk.encrypt_record("org-a", {"email": "one@example.com"}, aad=b"record:1")
    r2 = sdk.encrypt_record("org-a", {"email": "two@example.com"}, aad=b"record:2")
    assert sdk.decrypt_record("org-a", r1, aad=b"record:1") == {"email": "one@example.com"}
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt_record("org-a", {"email": r2["email"]}, aad=b"record:1")


def test_record_spanning_a_rotation(sdk, provider):
    old = sdk.encrypt_record("org-a", {"a": "old"})
    provider.rotate("org-a")
    new = sdk.encrypt_record("org-a", {"b": "new"})
    assert sdk.decrypt_record("org-a", old | new) == {"a": "old", "b": "new"}


def test_record_value_types(sdk):
    with pytest.raises(TypeError):
        sdk.encrypt_record("org-a", {"n": 5})


def test_record_wrong_org(sdk):
    enc = sdk.encrypt_record("org-a", {"f": "v"})
    with pytest.raises(TenantMismatch):
        sdk.decrypt_record("org-b", enc)


# --------------------------------------------------------------------------- over the real cache
class CachedProvider:
    """Provider whose DEKs come through the encrypted KeyCache (as the KMS serves them)."""

    def __init__(self, inner: Provider):
        secret = os.urandom(32)
        self.inner = inner
        self.derives = 0
        self.cache = KeyCache(lambda org, epoch: hmac.digest(secret, f"{org}|{epoch}".encode(),
                                                             hashlib.sha256))

    def dek_for_encrypt(self, org, key_type):
        v = self.inner.active[(org, key_type)]
        return v, self.inner.derivation[(org, key_type, v)], self.dek_for_decrypt(org, key_type, v)

    def dek_for_decrypt(self, org, key_type, version):
        key_id = (key_type, version, None)
        dek = self.cache.get(org, key_id)
        if dek is None:
            self.derives += 1
            dek = self.inner.dek_for_decrypt(org, key_type, version)
            self.cache.put(org, key_id, dek)
        return dek

    def destroy(self, org, key_type, version):
        self.inner.destroy(org, key_type, version)
        self.cache.invalidate(org, key_type, version)


def test_sdk_over_the_encrypted_cache(provider):
    cp = CachedProvider(provider)
    sdk = FieldEncryptor(cp)
    blobs = [sdk.encrypt("org-a", f"v{i}".encode()) for i in range(20)]
    assert [sdk.decrypt("org-a", b) for b in blobs] == [f"v{i}".encode() for i in range(20)]
    assert cp.derives == 1
    s = cp.cache.stats()
    assert s["hits"] == 39 and s["misses"] == 1
    provider.rotate("org-a")
    newer = sdk.encrypt("org-a", b"after")
    cp.destroy("org-a", "field", 1)
    with pytest.raises(KeyDestroyed, match="key destroyed"):
        sdk.decrypt("org-a", blobs[0])
    assert sdk.decrypt("org-a", newer) == b"after"


# --------------------------------------------------------------------------- property
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(org=st.text(min_size=1, max_size=40), plaintext=st.binary(max_size=600),
       aad=st.binary(max_size=64), key_type=st.sampled_from(["field", "database"]))
def test_property_round_trip(provider, org, plaintext, aad, key_type):
    if (org, key_type) not in provider.active:
        provider.create(org, key_type)
    sdk = FieldEncryptor(provider)
    blob = sdk.encrypt(org, plaintext, key_type=key_type, aad=aad)
    header = parse_header(blob)
    assert (header.org_id, header.key_type) == (org, key_type)
    assert sdk.decrypt(org, blob, aad=aad) == plaintext
    with pytest.raises(AuthenticationFailed):
        sdk.decrypt(org, blob, aad=aad + b"!")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=50),
                                                             st.binary(max_size=50)), max_size=6))
def test_property_record_round_trip(sdk, record):
    assert sdk.decrypt_record("org-a", sdk.encrypt_record("org-a", record)) == record
