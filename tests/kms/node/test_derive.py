"""DEK derivation inside the token (hsm.keys.kdf, kms.node.derive) on real SoftHSM2 and NSS softokn
tokens.

The central proof: a KNOWN seed is imported into the token (test only: C_CreateObject with
CKA_VALUE, sensitive, SIGN) and the in-token PBKDF2 must equal ``hashlib.pbkdf2_hmac`` byte for
byte. Production seeds are generated or unwrapped inside the token and never seen by the host;
the last tests use such a seed.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsm.keys import kdf
from hsm.core import ops
from hsm.core.errors import HsmError, ObjectNotFound, UsageError
from hsm.testing import require_mechanism, unique_label
from hsm.core.token import KeyRef
from kms.node import derive
from kms.node.derive import KeyContext, dek_salt, derive_dek
from tests.helpers import run_threads

FIXTURE_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def import_seed(token, value: bytes, *, sign: bool = True) -> KeyRef:
    """Test only: a known generic-secret value as a sensitive, non-extractable session object."""
    label = unique_label("kdf-seed")
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
           Attribute.VALUE: value, Attribute.LABEL: label, Attribute.TOKEN: False,
           Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: sign,
           Attribute.VERIFY: False, Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
           Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.DERIVE: False}
    token.run_on_anchor("C_CreateObject", lambda lease: lease.session.create_object(tpl), label)
    return ops.secret(label)


@pytest.fixture
def seeded(hsm_token):
    """(token, seed KeyRef, seed value) on each backend; 32 bytes works on both."""
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    value = os.urandom(32)
    return hsm_token.token, import_seed(hsm_token.token, value), value


# --------------------------------------------------------------------------- hsm.keys.kdf vs
# hashlib
@pytest.mark.parametrize("iterations", [1, 2, 1000])
@pytest.mark.parametrize("length", [16, 32, 33, 64, 100])
def test_pbkdf2_equals_hashlib(seeded, iterations, length):
    token, seed, value = seeded
    salt = os.urandom(32)
    got = kdf.pbkdf2_hmac_sha256(token, seed, salt, iterations, length)
    assert len(got) == length
    assert got == hashlib.pbkdf2_hmac("sha256", value, salt, iterations, length)


def test_pbkdf2_rfc7914_vector(hsm_token):
    """A published PBKDF2-HMAC-SHA256 vector (RFC 7914 §11), not just self-consistency.

    Its password ("passwd", 6 bytes) is shorter than SoftHSM2's 32-byte HMAC minimum, so that
    backend gets the same password zero-padded to 64 bytes: HMAC pads a short key with zeros to
    the block size, so the padded key is the same HMAC key.
    """
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    password = b"passwd" if hsm_token.backend == "nss" else b"passwd".ljust(64, b"\0")
    seed = import_seed(hsm_token.token, password)
    got = kdf.pbkdf2_hmac_sha256(hsm_token.token, seed, b"salt", 1, 64)
    assert got.hex() == ("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
                         "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783")


def test_seed_longer_than_the_hmac_block(hsm_token):
    """A 100-byte seed (HMAC hashes keys longer than 64 bytes first) still matches hashlib."""
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    value = os.urandom(100)
    seed = import_seed(hsm_token.token, value)
    salt = os.urandom(16)
    assert kdf.pbkdf2_hmac_sha256(hsm_token.token, seed, salt, 3, 40) == \
        hashlib.pbkdf2_hmac("sha256", value, salt, 3, 40)


def test_short_seed_nss_accepts_softhsm_refuses(hsm_token):
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    value = os.urandom(20)
    seed = import_seed(hsm_token.token, value)
    salt = b"short-seed"
    if hsm_token.backend == "nss":
        assert kdf.pbkdf2_hmac_sha256(hsm_token.token, seed, salt, 5) == \
            hashlib.pbkdf2_hmac("sha256", value, salt, 5, 32)
    else:
        with pytest.raises(HsmError) as info:
            kdf.pbkdf2_hmac_sha256(hsm_token.token, seed, salt, 5)
        assert info.value.ckr == "CKR_KEY_SIZE_RANGE"
        assert seed.label in str(info.value) and "PBKDF2" in str(info.value)


@settings(max_examples=12, deadline=None, suppress_health_check=FIXTURE_HEALTH)
@given(salt=st.binary(max_size=80), iterations=st.integers(1, 12),
       length=st.integers(1, 96))
def test_pbkdf2_equals_hashlib_random(seeded, salt, iterations, length):
    token, seed, value = seeded
    assert kdf.pbkdf2_hmac_sha256(token, seed, salt, iterations, length) == \
        hashlib.pbkdf2_hmac("sha256", value, salt, iterations, length)


def test_salt_may_be_any_bytes_like(seeded):
    token, seed, value = seeded
    want = hashlib.pbkdf2_hmac("sha256", value, b"abc", 2, 32)
    assert kdf.pbkdf2_hmac_sha256(token, seed, bytearray(b"abc"), 2) == want
    assert kdf.pbkdf2_hmac_sha256(token, seed, memoryview(b"abc"), 2) == want
    assert kdf.pbkdf2_hmac_sha256(token, seed, b"", 2) == \
        hashlib.pbkdf2_hmac("sha256", value, b"", 2, 32)


def test_whole_derivation_is_one_token_run(seeded, monkeypatch):
    """One Token.run (one lease, one lookup) however many blocks and iterations."""
    token, seed, value = seeded
    calls = []
    real_run = token.run

    def counting_run(operation, fn, *args):
        calls.append(operation)
        return real_run(operation, fn, *args)

    monkeypatch.setattr(token, "run", counting_run)
    out = kdf.pbkdf2_hmac_sha256(token, seed, b"s", 50, 100)  # 4 blocks x 50 C_Sign
    assert out == hashlib.pbkdf2_hmac("sha256", value, b"s", 50, 100)
    assert calls == ["PBKDF2(C_Sign SHA256_HMAC)"]


def test_concurrent_derivations_agree(seeded):
    token, seed, value = seeded
    want = {i: hashlib.pbkdf2_hmac("sha256", value, bytes([i]), 200, 32) for i in range(8)}
    got = run_threads(8, lambda i: kdf.pbkdf2_hmac_sha256(token, seed, bytes([i]), 200))
    assert dict(enumerate(got)) == want


def test_native_pbkdf2_is_reported_not_used(hsm_token):
    expected = hsm_token.backend == "nss"  # NSS softokn lists CKM_PKCS5_PBKD2, SoftHSM2 does not
    assert kdf.native_pbkdf2_available(hsm_token.token.profile) is expected
    assert kdf.native_pbkdf2_available(hsm_token.token) is expected


# --------------------------------------------------------------------------- bad inputs (kdf)
@pytest.mark.parametrize("kwargs, match", [
    ({"iterations": 0}, "iterations must be >= 1, got 0"),
    ({"iterations": -5}, "iterations must be >= 1, got -5"),
    ({"iterations": True}, "iterations must be an int, not bool"),
    ({"iterations": 2.0}, "iterations must be an int, not float"),
    ({"length": 0}, "length must be between 1 and 1024 bytes, got 0"),
    ({"length": 1025}, "length must be between 1 and 1024 bytes, got 1025"),
    ({"length": "32"}, "length must be an int, not str"),
    ({"salt": "text"}, r"salt must be bytes, not str \(encode it first\)"),
    ({"salt": None}, "salt must be bytes, not NoneType"),
    ({"seed": "kdf-seed"}, r"seed must be a KeyRef \(hsm.core.ops.secret\(label\)\), not str"),
    ({"seed": ops.public("kdf-seed")}, "seed 'kdf-seed' must be a secret key, not a public_key"),
])
def test_bad_kdf_inputs_fail_before_the_token(softhsm_token, kwargs, match, monkeypatch):
    token = softhsm_token.token
    args = {"seed": ops.secret("kdf-seed"), "salt": b"salt", "iterations": 10, "length": 32}
    args.update(kwargs)
    monkeypatch.setattr(token, "run", lambda *a: pytest.fail("the token was called"))
    with pytest.raises(kdf.KdfParameterError, match=match) as info:
        kdf.pbkdf2_hmac_sha256(token, **args)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


def test_missing_seed_names_it(hsm_token):
    label = unique_label("absent-seed")
    with pytest.raises(ObjectNotFound, match=label):
        kdf.pbkdf2_hmac_sha256(hsm_token.token, ops.secret(label), b"salt", 3)


def test_seed_without_sign_is_refused(hsm_token):
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    seed = import_seed(hsm_token.token, os.urandom(32), sign=False)
    with pytest.raises(HsmError) as info:
        kdf.pbkdf2_hmac_sha256(hsm_token.token, seed, b"salt", 3)
    assert info.value.operation == "PBKDF2(C_Sign SHA256_HMAC)"
    assert info.value.object_label == seed.label
    assert info.value.token == hsm_token.token.label
    assert info.value.ckr == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    assert "CKA_SIGN" in str(info.value)


# --------------------------------------------------------------------------- KeyContext encoding
def decode_context(data: bytes) -> KeyContext:
    """Test-side parser of the encoding: if every encoding parses back to its context, the
    encoding is injective."""
    pos = 0

    def take(n):
        nonlocal pos
        assert pos + n <= len(data)
        pos += n
        return data[pos - n:pos]

    def lp():
        return take(struct.unpack(">I", take(4))[0])

    assert lp() == derive.CONTEXT_TAG
    org, key_type = lp().decode(), lp().decode()
    version = struct.unpack(">Q", take(8))[0]
    flag = take(1)
    fragment = None if flag == b"\x00" else lp().decode()
    assert flag in (b"\x00", b"\x01") and pos == len(data)
    return KeyContext(org, key_type, version, fragment)


texts = st.text(min_size=1, max_size=12)
contexts = st.builds(KeyContext, org_id=texts, key_type=texts,
                     version=st.integers(0, 2**64 - 1),
                     fragment=st.none() | st.text(max_size=12))


@settings(max_examples=300)
@given(contexts)
def test_context_encoding_round_trips(ctx):
    data = ctx.encode()
    assert data.startswith(struct.pack(">I", len(derive.CONTEXT_TAG)) + derive.CONTEXT_TAG)
    assert decode_context(data) == ctx


@settings(max_examples=300)
@given(contexts, contexts)
def test_different_contexts_encode_differently(a, b):
    assert (a.encode() == b.encode()) == (a == b)


@pytest.mark.parametrize("a, b", [
    (KeyContext("a", "bc", 1), KeyContext("ab", "c", 1)),
    (KeyContext("org", "field", 1, None), KeyContext("org", "field", 1, "")),
    (KeyContext("org", "field", 1, "x"), KeyContext("orgx", "field", 1)),
    (KeyContext("org", "field", 1), KeyContext("org", "field", 256)),
    (KeyContext("org", "field\x00", 1), KeyContext("org", "field", 1, "\x00")),
    (KeyContext("é", "k", 1), KeyContext("e\u0301", "k", 1)),  # no normalisation: distinct ids
])
def test_split_and_boundary_collisions_are_impossible(a, b):
    assert a != b and a.encode() != b.encode()
    assert dek_salt(b"k" * 32, b"t" * 32, a) != dek_salt(b"k" * 32, b"t" * 32, b)


@pytest.mark.parametrize("fields, match", [
    (("", "field", 1), "org_id must not be empty"),
    (("org", "", 1), "key_type must not be empty"),
    ((7, "field", 1), "org_id must be a str, not int"),
    (("org", b"field", 1), "key_type must be a str, not bytes"),
    (("org", "field", -1), "version must be between 0 and 2\\*\\*64-1, got -1"),
    (("org", "field", 2**64), "version must be between 0 and 2\\*\\*64-1"),
    (("org", "field", True), "version must be an int, not bool"),
    (("org", "field", "1"), "version must be an int, not str"),
    (("org", "field", 1, 5), "fragment must be a str, not int"),
    (("org\ud800", "field", 1), "org_id is not valid Unicode text"),
    (("o" * 1025, "field", 1), "org_id is 1025 bytes in UTF-8; at most 1024"),
])
def test_bad_context_is_refused_where_it_is_built(fields, match):
    with pytest.raises(derive.DerivationInputError, match=match):
        KeyContext(*fields)


def test_context_is_frozen_and_hashable():
    ctx = KeyContext("org", "field", 1)
    with pytest.raises(AttributeError):
        ctx.version = 2  # type: ignore[misc]
    assert {ctx: 1}[KeyContext("org", "field", 1)] == 1


# --------------------------------------------------------------------------- dek_salt
def test_dek_salt_is_unambiguous():
    ctx = KeyContext("org", "field", 1)
    t = os.urandom(32)
    base = dek_salt(b"A" * 32, t, ctx)
    assert len(base) == 32 and base == dek_salt(b"A" * 32, t, ctx)
    # moving a byte across the kdf_salt / tenant_secret boundary changes the salt
    assert dek_salt(b"A" * 31, b"A" + t, ctx) != dek_salt(b"A" * 32, t, ctx)
    assert dek_salt(b"B" * 32, t, ctx) != base
    assert dek_salt(b"A" * 32, os.urandom(32), ctx) != base
    assert dek_salt(b"A" * 32, t, KeyContext("org", "field", 2)) != base


@pytest.mark.parametrize("args, match", [
    ((b"", b"t" * 32), "kdf_salt must be at least 1 bytes, got 0"),
    (("salt", b"t" * 32), "kdf_salt must be bytes, not str"),
    ((b"s" * 32, b"t" * 15), "tenant_secret must be at least 16 bytes, got 15"),
    ((b"s" * 32, None), "tenant_secret must be bytes, not NoneType"),
])
def test_dek_salt_bad_inputs(args, match):
    with pytest.raises(derive.DerivationInputError, match=match):
        dek_salt(*args, KeyContext("org", "field", 1))
    with pytest.raises(derive.DerivationInputError, match="ctx must be a KeyContext, not tuple"):
        dek_salt(b"s" * 32, b"t" * 32, ("org", "field", 1))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- derive_dek
def test_derive_dek_equals_hashlib_over_dek_salt(seeded):
    token, seed, value = seeded
    kdf_salt, tenant = os.urandom(32), os.urandom(32)
    ctx = KeyContext("org-1", "field", 3)
    dek = derive_dek(token, seed, kdf_salt, tenant, ctx, 1000)
    assert len(dek) == 32
    assert dek == hashlib.pbkdf2_hmac("sha256", value, dek_salt(kdf_salt, tenant, ctx), 1000, 32)


def test_every_context_field_changes_the_dek_and_same_inputs_repeat(seeded):
    token, seed, _ = seeded
    kdf_salt, tenant = os.urandom(32), os.urandom(32)
    contexts_ = [KeyContext("org-1", "field", 1), KeyContext("org-2", "field", 1),
                 KeyContext("org-1", "database", 1), KeyContext("org-1", "field", 2),
                 KeyContext("org-1", "database", 1, "frag-1"),
                 KeyContext("org-1", "database", 1, "frag-2"),
                 KeyContext("org-1", "database", 1, "")]
    deks = [derive_dek(token, seed, kdf_salt, tenant, c, 50) for c in contexts_]
    assert len(set(deks)) == len(deks)
    assert [derive_dek(token, seed, kdf_salt, tenant, c, 50) for c in contexts_] == deks
    # the release salt, the tenant secret and the iteration count matter too
    ctx = contexts_[0]
    assert derive_dek(token, seed, os.urandom(32), tenant, ctx, 50) != deks[0]
    assert derive_dek(token, seed, kdf_salt, os.urandom(32), ctx, 50) != deks[0]
    assert derive_dek(token, seed, kdf_salt, tenant, ctx, 51) != deks[0]


def test_seed_generated_inside_the_token_derives_deterministically(hsm_token):
    """The production shape: a seed that the host never sees and cannot read."""
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    token = hsm_token.token
    refs = []
    for _ in range(2):
        label = unique_label("kdf-seed-gen")
        ops.generate_session_key(token, KeyType.GENERIC_SECRET, 256, label,
                                 capabilities=MechanismFlag.SIGN)
        refs.append(ops.secret(label))
    attrs = token.run("read", lambda lease: lease.key(refs[0]).get_attributes(
        [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN]))
    assert attrs == {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                     Attribute.TOKEN: False}
    with pytest.raises(HsmError, match="CKR_ATTRIBUTE_SENSITIVE"):  # the value cannot be read
        token.run("read", lambda lease: lease.key(refs[0])[Attribute.VALUE])
    kdf_salt, tenant, ctx = os.urandom(32), os.urandom(32), KeyContext("org", "field", 1)
    first = derive_dek(token, refs[0], kdf_salt, tenant, ctx, 100)
    assert derive_dek(token, refs[0], kdf_salt, tenant, ctx, 100) == first
    assert derive_dek(token, refs[1], kdf_salt, tenant, ctx, 100) != first


def test_derive_dek_bad_inputs_fail_before_the_token(softhsm_token, monkeypatch):
    token = softhsm_token.token
    monkeypatch.setattr(token, "run", lambda *a: pytest.fail("the token was called"))
    seed, ctx = ops.secret("seed"), KeyContext("org", "field", 1)
    with pytest.raises(kdf.KdfParameterError, match="iterations must be >= 1, got 0"):
        derive_dek(token, seed, b"s" * 32, b"t" * 32, ctx, 0)
    with pytest.raises(derive.DerivationInputError, match="tenant_secret must be at least 16"):
        derive_dek(token, seed, b"s" * 32, b"t", ctx, 10)


def test_kms_derive_does_not_import_pkcs11():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(derive))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              if node.module}
    assert not any(n == "pkcs11" or n.startswith("pkcs11.") for n in names)
