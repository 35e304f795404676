"""Per-org KEKs (hsm/keys/orgkek.py) on a real SoftHSM2 token: what the token lets a PIN holder do with
one, that a found handle works on any session, and that another process's handle to a KEK this
process destroyed fails at its next use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from pkcs11 import Attribute as A
from pkcs11 import Mechanism as M

from hsm.core._cryptoki import gcm_params
from hsm.core.errors import DecryptionFailed, KeyPolicyViolation
from hsm.keys import orgkek


def test_round_trip_empty_plaintext_and_tag_check(softhsm_token):
    token = softhsm_token.token
    h = orgkek.generate(token, "kms-kek t 1 acme")
    nonce = os.urandom(12)
    sealed = orgkek.encrypt(token, h, "l", nonce, b"", b"state digest")
    assert len(sealed) == 16
    assert orgkek.decrypt(token, h, "l", nonce, sealed, b"state digest") == b""
    with pytest.raises(DecryptionFailed):
        orgkek.decrypt(token, h, "l", nonce, sealed, b"another state")
    assert orgkek.find_all(token) == {h: "kms-kek t 1 acme"}
    assert orgkek.find(token, "kms-kek t 1 acme") == h
    assert orgkek.destroy(token, h, "l") is True
    assert orgkek.destroy(token, h, "l") is False
    with pytest.raises(orgkek.KekGone):
        orgkek.decrypt(token, h, "l", nonce, sealed, b"state digest")
    assert orgkek.find_all(token) == {}


def test_a_pin_holder_cannot_get_a_kek_out_or_repurpose_it(softhsm_token):
    """The user-PIN holder with raw PKCS#11: read the value (CKR_ATTRIBUTE_SENSITIVE 0x11), flip
    CKA_EXTRACTABLE or CKA_WRAP, or copy it (CKR_ACTION_PROHIBITED 0x1B: non-modifiable,
    non-copyable), use it with another mechanism (CKR_MECHANISM_INVALID 0x70) or wrap it out."""
    token = softhsm_token.token
    h = orgkek.generate(token, "kms-kek t 1 pin-holder")
    raw = token.module.raw
    with token.lease() as lease:
        s = lease.session.handle
        assert raw.get_attribute(s, h, A.VALUE)[0] == 0x11
        assert raw.set_attributes(s, h, {A.EXTRACTABLE: True}) == 0x1B
        assert raw.set_attributes(s, h, {A.WRAP: True}) == 0x1B
        assert raw.copy_object(s, h, {A.TOKEN: False})[0] == 0x1B
        assert raw.operation_init("C_SignInit", s, M.AES_CMAC, None, h) == 0x68  # no CKA_SIGN
        params, _keep = gcm_params(os.urandom(12))
        assert raw.operation_init("C_EncryptInit", s, M.AES_GCM, params, h) == 0
        raw.one_shot("C_Encrypt", s, b"x")
        assert raw.operation_init("C_EncryptInit", s, M.AES_ECB, None, h) == 0x70
        wrapper = orgkek.generate(token, "kms-kek t 1 wrapper")
        assert raw.wrap_key(s, M.AES_KEY_WRAP, None, wrapper, h)[0] != 0


_NODE_B = textwrap.dedent("""
    import sys, time, os
    from hsm.core.token import Token
    from hsm.core.pin import Pin
    from hsm.keys import orgkek
    token = Token.open(sys.argv[1], pin=Pin(sys.argv[2]))
    handles = {label: h for h, label in orgkek.find_all(token).items()}
    nonce = bytes(12)
    print("ready", flush=True)
    for line in sys.stdin:
        label = line.strip()
        try:
            orgkek.encrypt(token, handles[label], label, nonce, b"", b"probe")
            print("ok", flush=True)
        except orgkek.KekGone:
            print("gone", flush=True)
""")


def test_another_process_handle_fails_at_its_next_use_after_destroy(softhsm_token):
    """SoftHSM2 processes keep their own view of the token: node B found the KEK before node A
    destroyed it, and B's next use of its cached handle fails (KekGone), with no wait."""
    token = softhsm_token.token
    h = orgkek.generate(token, "kms-kek t 1 shared")
    b = subprocess.Popen([sys.executable, "-c", _NODE_B, softhsm_token.label,
                          softhsm_token.user_pin.reveal()], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                  **softhsm_token.env})
    try:
        assert b.stdout.readline().strip() == "ready"
        b.stdin.write("kms-kek t 1 shared\n"); b.stdin.flush()
        assert b.stdout.readline().strip() == "ok"
        assert orgkek.destroy(token, h, "shared")
        b.stdin.write("kms-kek t 1 shared\n"); b.stdin.flush()
        assert b.stdout.readline().strip() == "gone"
    finally:
        b.stdin.close()
        b.wait(timeout=30)


def test_a_look_alike_kek_a_pin_holder_planted_under_a_label_is_refused_not_used(softhsm_token):
    """The user-PIN holder creates an extractable, copyable AES key with a KEK's CKA_ID and the
    label of a generation to come (or of one they destroyed): found by its label, it would seal
    org state under a key they can read out or copy, so a destroy would shred nothing. find()
    refuses it (KeyPolicyViolation naming the attributes), and a real KEK is still found."""
    token = softhsm_token.token
    label = "kms-kek t 7 planted"
    planted = {**orgkek.template(label), A.EXTRACTABLE: True, A.SENSITIVE: False,
               A.COPYABLE: True}
    with token.lease() as lease:
        rv, _ = token.module.raw.generate_key(lease.session.handle, M.AES_KEY_GEN, planted)
    assert rv == 0
    with pytest.raises(KeyPolicyViolation, match=r"CKA_EXTRACTABLE: got True") as info:
        orgkek.find(token, label)
    assert "CKA_NEVER_EXTRACTABLE: got False" in str(info.value)
    assert "CKA_COPYABLE: got True" in str(info.value)
    # The KEK's own template but not destroyable: the node's destroy would shred nothing.
    undying = {**orgkek.template("kms-kek t 8 planted"), A.DESTROYABLE: False}
    with token.lease() as lease:
        rv, _ = token.module.raw.generate_key(lease.session.handle, M.AES_KEY_GEN, undying)
    assert rv == 0
    with pytest.raises(KeyPolicyViolation, match=r"CKA_DESTROYABLE: got False"):
        orgkek.find(token, "kms-kek t 8 planted")
    real = orgkek.generate(token, "kms-kek t 7 real")
    assert orgkek.find(token, "kms-kek t 7 real") == real
