"""Project Wycheproof vectors through the driver layer (``hsm.core.ops``, ``hsm.keys.kdf``) on real tokens.

Every vector of each file is run: ``valid`` ones must be accepted, ``invalid`` ones refused, and
the counts are asserted (checked, accepted, and beyond a token's limit, by limit). Vectors a
token cannot take are a separate case per file that skips naming the limit and how many. The
vectors' keys are imported as session objects on throw-away tokens (the only outside key
material the suite ever puts in a token). Time: about 25 s, most of it PBKDF2's 4096
iterations per vector as in-token HMACs.
"""

from __future__ import annotations

import functools

import pytest
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

from hsm.core import ops
from hsm.core.errors import DecryptionFailed
from hsm.keys import kdf
from tests import wycheproof as wp

CHECKED, BEYOND = "checked", "beyond the token's limits"


def _secret(token, kind, key: bytes, usage: dict):
    return wp.session_key(token, {Attribute.CLASS: ObjectClass.SECRET_KEY,
                                  Attribute.KEY_TYPE: kind, Attribute.VALUE: key,
                                  Attribute.SENSITIVE: True, **usage}, "key")


@pytest.fixture(scope="module")
def soft(softhsm_session_token_factory):
    return softhsm_session_token_factory(prefix="wycheproof").token


def _assert(outcome: wp.Outcome, part: str, expected: tuple) -> None:
    """``part`` CHECKED: no vector judged wrongly, the counts as expected; BEYOND: the limits
    met are exactly the expected ones, then skip naming them."""
    assert outcome.wrong == []
    checked, accepted, beyond = expected
    if part == CHECKED:
        assert (outcome.checked, outcome.accepted) == (checked, accepted)
        return
    assert dict(outcome.beyond) == beyond
    if beyond:
        pytest.skip("; ".join(f"{n} vector(s): {why}" for why, n in beyond.items()))


# --------------------------------------------------------------------------- MACs
def _mac(token, kind, sign, group, test) -> bool:
    key = bytes.fromhex(test["key"])
    ref = _secret(token, kind, key, {Attribute.SIGN: True})
    try:
        tag = sign(token, ref, bytes.fromhex(test["msg"]))[:group["tagSize"] // 8]
    finally:
        wp.destroy(token, ref)
    return tag == bytes.fromhex(test["tag"])


@functools.lru_cache(maxsize=None)
def _hmac(token):
    return wp.run("hmac_sha256_test.json",
                  functools.partial(_mac, token, KeyType.GENERIC_SECRET, ops.hmac_sha256),
                  limits={"CKR_KEY_SIZE_RANGE": "SoftHSM2 2.6.1 refuses HMAC-SHA256 keys under "
                                                "32 bytes (CKR_KEY_SIZE_RANGE)"})


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_hmac_sha256_vectors_through_ops(soft, part):
    _assert(_hmac(soft), part, (168, 60, {
        "SoftHSM2 2.6.1 refuses HMAC-SHA256 keys under 32 bytes (CKR_KEY_SIZE_RANGE)": 6}))


@functools.lru_cache(maxsize=None)
def _cmac(token):
    def check(group, test):
        if len(test["key"]) // 2 not in (16, 24, 32):
            # not an AES key: the token must refuse to make it one (or use it)
            with pytest.raises(Exception):
                _mac(token, KeyType.AES, ops.aes_cmac, group, test)
            return False
        return _mac(token, KeyType.AES, ops.aes_cmac, group, test)
    return wp.run("aes_cmac_test.json", check)


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_aes_cmac_vectors_through_ops(soft, part):
    _assert(_cmac(soft), part, (311, 63, {}))


# --------------------------------------------------------------------------- AES-GCM
@functools.lru_cache(maxsize=None)
def _gcm(token):
    def check(group, test):
        if group["tagSize"] != 128:
            raise wp.Beyond("hsm.core.ops.aes_gcm_decrypt takes 128-bit tags only")
        if not 0 < group["ivSize"] <= 96:   # the project's formats all use 12 bytes
            raise wp.Beyond("python-pkcs11 0.10's GCMParams takes 1-12-byte IVs only")
        ref = _secret(token, KeyType.AES, bytes.fromhex(test["key"]),
                      {Attribute.DECRYPT: True})
        try:
            plain = ops.aes_gcm_decrypt(token, ref, bytes.fromhex(test["iv"]),
                                        bytes.fromhex(test["ct"] + test["tag"]),
                                        bytes.fromhex(test["aad"]))
        except DecryptionFailed:
            return False
        finally:
            wp.destroy(token, ref)
        return plain == bytes.fromhex(test["msg"])
    return wp.run("aes_gcm_test.json", check)


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_aes_gcm_vectors_through_the_token(soft, part):
    _assert(_gcm(soft), part, (234, 153, {
        "python-pkcs11 0.10's GCMParams takes 1-12-byte IVs only": 82}))


# --------------------------------------------------------------------------- AES-KWP
@functools.lru_cache(maxsize=None)
def _kwp(token):
    assert token.profile.aes_wrap_choice()[0] in ("AES_KEY_WRAP_PAD", "AES_KEY_WRAP_KWP")

    def check(group, test):
        wrapping = _secret(token, KeyType.AES, bytes.fromhex(test["key"]),
                           {Attribute.UNWRAP: True})
        name = wp.label("kwp")
        try:
            key = ops.aes_unwrap(token, wrapping, bytes.fromhex(test["ct"]),
                                 key_type=KeyType.GENERIC_SECRET, label=name,
                                 capabilities=MechanismFlag(0),
                                 template={Attribute.SENSITIVE: False,
                                           Attribute.EXTRACTABLE: True})
            value = key[Attribute.VALUE]
            key.destroy()
        finally:
            wp.destroy(token, wrapping)
        return value == bytes.fromhex(test["msg"])
    return wp.run("aes_kwp_test.json", check, limits={
        "CKR_WRAPPED_KEY_LEN_RANGE": "SoftHSM2 2.6.1 unwraps no key under 16 bytes with "
                                     "AES_KEY_WRAP_PAD (CKR_WRAPPED_KEY_LEN_RANGE)"})


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_aes_kwp_vectors_through_ops_unwrap(soft, part):
    _assert(_kwp(soft), part, (254, 77, {}))


# --------------------------------------------------------------------------- RSA-OAEP
def _rsa_private(token, key: dict):
    def n(name):
        return int(key[name], 16).to_bytes((len(key[name]) + 1) // 2, "big").lstrip(b"\0") \
            or b"\0"
    return wp.session_key(token, {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: n("modulus"), Attribute.PUBLIC_EXPONENT: n("publicExponent"),
        Attribute.PRIVATE_EXPONENT: n("privateExponent"), Attribute.PRIME_1: n("prime1"),
        Attribute.PRIME_2: n("prime2"), Attribute.EXPONENT_1: n("exponent1"),
        Attribute.EXPONENT_2: n("exponent2"), Attribute.COEFFICIENT: n("coefficient"),
        Attribute.UNWRAP: True, Attribute.SENSITIVE: True}, "rsa")


_NSS_LONG = ("NSS softokn 3.87 does not unwrap a 446-byte message into a generic-secret key "
             "(CKR_TEMPLATE_INCONSISTENT); 190 bytes it does")
_LABEL = "hsm.core.ops.rsa_oaep_unwrap uses the empty label (every format the project reads does)"
_EMPTY = "a 0-byte key cannot be unwrapped into a key object"


def _oaep(token, name: str, hash_name: str):
    keys: dict = {}

    def check(group, test):
        if test["label"]:
            raise wp.Beyond("hsm.core.ops.rsa_oaep_unwrap uses the empty label (every format the "
                            "project reads does)")
        if not test["msg"] and test["result"] == "valid":
            raise wp.Beyond("a 0-byte key cannot be unwrapped into a key object")
        ref = keys.get(id(group)) or keys.setdefault(id(group), _rsa_private(
            token, group["privateKey"]))
        try:
            key = ops.rsa_oaep_unwrap(token, ref, ops.Wrapped(
                bytes.fromhex(test["ct"]), "RSA_PKCS_OAEP", {"hash": hash_name}),
                key_type=KeyType.GENERIC_SECRET, label=wp.label("oaep"),
                capabilities=MechanismFlag(0),
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        except DecryptionFailed:
            return False
        value = key[Attribute.VALUE]
        key.destroy()
        return value == bytes.fromhex(test["msg"])
    try:
        return wp.run(name, check, limits={"CKR_TEMPLATE_INCONSISTENT": _NSS_LONG}
                      if "softokn" in token.module.path else None)
    finally:
        for ref in keys.values():
            wp.destroy(token, ref)


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_rsa_oaep_sha1_vectors_through_the_softhsm_unwrap(soft, part):
    _assert(_oaep_cached(soft, "rsa_oaep_2048_sha1_mgf1sha1_test.json", "sha1"), part,
            (28, 9, {_LABEL: 7, _EMPTY: 1}))


@pytest.mark.parametrize("name,expected", [
    ("rsa_oaep_2048_sha256_mgf1sha256_test.json", (28, 9, {_LABEL: 8, _EMPTY: 1})),
    ("rsa_oaep_4096_sha256_mgf1sha256_test.json", (27, 8, {_LABEL: 8, _EMPTY: 1,
                                                           _NSS_LONG: 1}))])
@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_rsa_oaep_sha256_vectors_through_the_nss_unwrap(nss_token, name, expected, part):
    _assert(_oaep_cached(nss_token.token, name, "sha256"), part, expected)


_oaep_cached = functools.lru_cache(maxsize=None)(_oaep)


# --------------------------------------------------------------------------- PBKDF2
_PBKDF2 = "pbkdf2_hmacsha256_test.json"


def _pbkdf2(token, group, test) -> bool:
    if test["dkLen"] > kdf.MAX_LENGTH:
        raise wp.Beyond(f"hsm.keys.kdf derives at most {kdf.MAX_LENGTH} bytes")
    password = bytes.fromhex(test["password"])
    if not password:
        raise wp.Beyond("a token holds no 0-byte HMAC key (the password is the seed key)")
    seed = _secret(token, KeyType.GENERIC_SECRET, password, {Attribute.SIGN: True})
    try:
        dk = kdf.pbkdf2_hmac_sha256(token, seed, bytes.fromhex(test["salt"]),
                                    test["iterationCount"], test["dkLen"])
    finally:
        wp.destroy(token, seed)
    return dk == bytes.fromhex(test["dk"])


def _long_password(group, test) -> bool:
    return len(test["password"]) // 2 >= 32


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_pbkdf2_vectors_with_32_byte_passwords_through_the_softhsm_kdf(soft, part):
    out = _pbkdf2_run(soft, True)
    _assert(out, part, (4, 4, {}))


@pytest.mark.parametrize("part", [CHECKED, BEYOND])
def test_pbkdf2_vectors_with_short_passwords_through_the_nss_kdf(nss_token, soft, part):
    """SoftHSM2 refuses them as HMAC keys (shown on the first one); NSS softokn takes them."""
    first = next(t for g in wp.load(_PBKDF2)["testGroups"] for t in g["tests"]
                 if 0 < len(t["password"]) // 2 < 32)
    from hsm.core.errors import HsmError
    with pytest.raises(HsmError) as refused:
        _pbkdf2(soft, None, first)
    assert refused.value.ckr == "CKR_KEY_SIZE_RANGE"
    _assert(_pbkdf2_run(nss_token.token, False), part, (55, 55, {
        "a token holds no 0-byte HMAC key (the password is the seed key)": 1}))


@functools.lru_cache(maxsize=None)
def _pbkdf2_run(token, long_passwords: bool):
    return wp.run(_PBKDF2, functools.partial(_pbkdf2, token),
                  select=lambda g, t: _long_password(g, t) == long_passwords)


def test_every_vector_file_is_counted_whole():
    """The select() split of PBKDF2 covers the file; the other files are run whole."""
    assert wp.total(_PBKDF2, lambda g, t: _long_password(g, t)) + \
        wp.total(_PBKDF2, lambda g, t: not _long_password(g, t)) == \
        wp.load(_PBKDF2)["numberOfTests"] == 60
