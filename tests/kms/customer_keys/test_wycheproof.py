"""Project Wycheproof vectors through the KMS side: the cache-only JWE validation and opening
(``kms.customer_keys.cache_only``, ``hsm.keys.byok.open_jwe`` on a throw-away SoftHSM2 token), the
SDK's
AES-GCM
open (``kms.caller.sdk``), and the ECDSA verifications of the project (audit checkpoints, P-256:
``kms.server.auditchain``; release bundles, P-384: ``release.bundle.check_signature``).
Every vector is judged and counted (see tests/wycheproof.py). Time: about 3 s.
"""

from __future__ import annotations

import base64
import functools
import json
from collections import Counter

import pytest
from asn1crypto import cms, keys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from hsm.keys import byok as hbyok
from kms.customer_keys import cache_only
from kms.errors import AuthenticationFailed, KeyUnavailable
from kms.caller.sdk import FieldEncryptor, Header
from kms.server import auditchain
from release import bundle
from release.errors import VerificationError
from tests import wycheproof as wp

_JWE = "json_web_encryption_test.json"


def _b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _header(compact) -> dict:
    try:
        return json.loads(_b64(compact.split(".")[0]))
    except (ValueError, AttributeError, IndexError):
        return {}


def _accepted_alg(header: dict) -> bool:
    return header.get("alg") == "RSA-OAEP" and header.get("enc") == "A256GCM"


def _code(compact, kid: str) -> str:
    with pytest.raises(KeyUnavailable) as refused:
        cache_only.parse_jwe({"kid": kid, "jwe": compact}, kid, "a-nonce-of-this-request")
    return refused.value.code


def test_every_jwe_vector_of_another_algorithm_is_refused_by_the_cache_only_validation():
    """139 vectors: every one whose alg/enc is not RSA-OAEP + A256GCM is refused with
    INCORRECT_ALGORITHM_IN_JWE_HEADER, or ILLEGAL_JWE when it is no compact JWE at all; the two
    in the accepted algorithm carry no jti (one no kid either), so the replay check refuses them
    (MISSING_JTI, KID_MISMATCH) and the next test opens them."""
    codes: Counter = Counter()
    for group in wp.load(_JWE)["testGroups"]:
        for test in group["tests"]:
            header = _header(test["jwe"])
            code = _code(test["jwe"], header.get("kid", "kid"))
            if _accepted_alg(header):   # no jti (and one has no kid): no replay protection
                assert "jti" not in header
                assert code == ("MISSING_JTI" if "kid" in header else "KID_MISMATCH")
            else:
                assert code in ("INCORRECT_ALGORITHM_IN_JWE_HEADER", "ILLEGAL_JWE"), \
                    (test["tcId"], code)
            codes[code] += 1
    assert dict(codes) == {"INCORRECT_ALGORITHM_IN_JWE_HEADER": 124, "ILLEGAL_JWE": 13,
                           "MISSING_JTI": 1, "KID_MISMATCH": 1}
    assert sum(codes.values()) == wp.load(_JWE)["numberOfTests"]


def _jwk_int(jwk: dict, name: str) -> bytes:
    return _b64(jwk[name])


def test_the_jwe_vectors_in_the_accepted_algorithm_open_in_the_token(softhsm_token):
    """RSA-OAEP + A256GCM: the vector's RSA key imported on a throw-away token, the CEK unwrapped
    and the payload AES-GCM-decrypted inside it (hsm.keys.byok.open_jwe, what a cache-only fetch
    runs after the header checks), giving the vector's plaintext; one flipped tag bit is
    refused. One key is RSA-2048, which the BYOK path's RSA-4096 length check refuses first; it
    is opened with the vector's modulus size."""
    from jwcrypto import jwe as jwcrypto_jwe
    token = softhsm_token.token
    opened, sizes = 0, []
    for group in wp.load(_JWE)["testGroups"]:
        for test in group["tests"]:
            if not _accepted_alg(_header(test["jwe"])):
                continue
            assert test["result"] == "valid"
            jwk = group["private"]
            ref = wp.session_key(token, {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                **{attr: _jwk_int(jwk, name) for attr, name in (
                    (Attribute.MODULUS, "n"), (Attribute.PUBLIC_EXPONENT, "e"),
                    (Attribute.PRIVATE_EXPONENT, "d"), (Attribute.PRIME_1, "p"),
                    (Attribute.PRIME_2, "q"), (Attribute.EXPONENT_1, "dp"),
                    (Attribute.EXPONENT_2, "dq"), (Attribute.COEFFICIENT, "qi"))},
                Attribute.UNWRAP: True, Attribute.SENSITIVE: True}, "jwe")
            parsed = jwcrypto_jwe.JWE()
            parsed.deserialize(test["jwe"])
            parts = cache_only.jwe_parts(test["jwe"], parsed.objects)
            size = len(_jwk_int(jwk, "n"))
            sizes.append(size * 8)
            if size != 512:   # a BYOK key is RSA-4096: other sizes are refused up front
                with pytest.raises(hbyok.ByokRefused, match="an RSA-4096 ciphertext is 512"):
                    hbyok.open_jwe(token, ref, **parts)
            assert hbyok.open_jwe(token, ref, **parts, modulus_bytes=size) == \
                bytes.fromhex(test["pt"])
            bad = {**parts, "tag": parts["tag"][:-1] + bytes([parts["tag"][-1] ^ 1])}
            with pytest.raises(hbyok.ByokRefused, match="tag does not verify"):
                hbyok.open_jwe(token, ref, **bad, modulus_bytes=size)
            wp.destroy(token, ref)
            opened += 1
    assert opened == 2 and sorted(sizes) == [2048, 4096]


# --------------------------------------------------------------------------- SDK AES-GCM
def _sdk_gcm(group, test) -> bool:
    if group["ivSize"] != 96 or group["tagSize"] != 128:
        raise wp.Beyond("the HSF field format has a 96-bit nonce and a 128-bit tag")
    header = Header(1, "wycheproof", "field", 1, "PBKDF2", bytes.fromhex(test["iv"]), 0)
    try:
        plain = FieldEncryptor._open(AESGCM(bytes.fromhex(test["key"])), header,
                                     bytes.fromhex(test["ct"] + test["tag"]),
                                     bytes.fromhex(test["aad"]))
    except AuthenticationFailed:
        return False
    return plain == bytes.fromhex(test["msg"])


@pytest.mark.parametrize("part", ["checked", "beyond the format"])
def test_aes_gcm_vectors_through_the_sdk_open(part):
    out = _run_sdk()
    assert out.wrong == []
    if part == "checked":
        assert (out.checked, out.accepted) == (197, 116)
        return
    assert dict(out.beyond) == {
        "the HSF field format has a 96-bit nonce and a 128-bit tag": 119}
    pytest.skip("119 vector(s): the HSF field format has a 96-bit nonce and a 128-bit tag")


@functools.lru_cache(maxsize=None)
def _run_sdk() -> wp.Outcome:
    return wp.run("aes_gcm_test.json", _sdk_gcm)


# --------------------------------------------------------------------------- ECDSA
def _audit_p256(group, test) -> bool:
    """The audit log's checkpoint verification (kms audit verify)."""
    key = auditchain.public_key(bytes.fromhex(group["publicKeyDer"]))
    return auditchain.signature_holds(key, bytes.fromhex(test["msg"]), test["sig"])


def _bundle_p384(group, test) -> bool:
    """The release bundle's signature check (the KMS and `ceremony verify`)."""
    spki = keys.PublicKeyInfo.load(bytes.fromhex(group["publicKeyDer"]))
    try:
        bundle.check_signature(spki, cms.SignedDigestAlgorithm({"algorithm": "sha384_ecdsa"}),
                               bytes.fromhex(test["sig"]), bytes.fromhex(test["msg"]),
                               "wycheproof")
    except VerificationError:
        return False
    return True


@pytest.mark.parametrize("name,check,expected", [
    ("ecdsa_secp256r1_sha256_test.json", _audit_p256, (484, 174)),
    ("ecdsa_secp384r1_sha384_test.json", _bundle_p384, (504, 194))])
def test_ecdsa_vectors_through_the_projects_signature_checks(name, check, expected):
    out = wp.run(name, check)
    assert out.wrong == [] and not out.beyond
    assert (out.checked, out.accepted) == expected
