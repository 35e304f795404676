"""Wycheproof's AES-GCM vectors through the proxy's in-token decryption, on a throw-away token.

The Decrypt handler calls ``hsm.keys.xks.decrypt`` with the AAD framed as the specification says
(lengths of AAD and ciphertext metadata included), so a vector's own AAD cannot travel over
HTTP unchanged; the vectors go to ``hsm.keys.xks.decrypt`` itself, with their AAD as given. Every
AES-256 vector with a 12- or 16-byte IV (the IV lengths the specification allows) and a 16-byte
tag: ``valid`` ones must give the message, ``invalid`` ones must be refused as
``DecryptionFailed`` (the handler's ``InvalidCiphertextException``). Other key and IV sizes
are outside XKS v1 (AES-256 only, IV 12 or 16 bytes) and are not sent.

Importing a known key is test-only code (a session object created with its CKA_VALUE on a
throw-away token); production XKS keys are only ever generated inside the token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.keys import xks as xkeys
from hsm.core.errors import DecryptionFailed, check_rv
from hsm.core.token import KeyRef

VECTORS = Path(__file__).resolve().parents[4] / "shared" / "vectors" / "wycheproof" / \
    "aes_gcm_test.json"


def _cases():
    if not VECTORS.exists():
        return []
    doc = json.loads(VECTORS.read_text())
    return [(g, t) for g in doc["testGroups"] if g["keySize"] == 256
            and g["ivSize"] in (96, 128) and g["tagSize"] == 128 for t in g["tests"]]


CASES = _cases()


def _import(token, key: bytes, n: int) -> xkeys.XksKey:
    """Test only: a known AES-256 key as a decrypt-only, AES-GCM-only session object."""
    label = f"xks-wycheproof-{n}"
    raw = token.module.raw
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
           Attribute.TOKEN: False, Attribute.LABEL: label, Attribute.VALUE: key,
           Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: True,
           Attribute.ENCRYPT: False, Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]}
    token.run_on_anchor("C_CreateObject", lambda lease: check_rv(
        raw.create_object(lease.session.handle, tpl)[0]), label)
    return xkeys.XksKey(f"wycheproof-{n}", KeyRef(label, ObjectClass.SECRET_KEY), False, True)


@pytest.mark.skipif(not CASES, reason=f"Wycheproof vectors not found at {VECTORS} "
                                      "(../shared/vectors relative to the repository)")
def test_wycheproof_aes_256_gcm_through_the_proxys_decrypt(softhsm_token):
    token = softhsm_token.token
    keys: dict[str, xkeys.XksKey] = {}
    seen = {"valid": 0, "invalid": 0}
    for group, case in CASES:
        key = keys.get(case["key"])
        if key is None:
            key = keys[case["key"]] = _import(token, bytes.fromhex(case["key"]), len(keys))
        iv, ct, tag = (bytes.fromhex(case[k]) for k in ("iv", "ct", "tag"))
        aad = bytes.fromhex(case["aad"])
        where = f"tcId {case['tcId']} ({case['comment'] or ', '.join(case['flags'])})"
        if case["result"] == "valid":
            assert xkeys.decrypt(token, key, iv, ct, tag, aad) == bytes.fromhex(case["msg"]), where
        else:
            with pytest.raises(DecryptionFailed):
                xkeys.decrypt(token, key, iv, ct, tag, aad)
                pytest.fail(f"{where}: an invalid vector decrypted")
        seen["valid" if case["result"] == "valid" else "invalid"] += 1
    assert seen["valid"] > 20 and seen["invalid"] > 10, seen
