"""Upgrading trusted keys made before they had a CKA_WRAP_TEMPLATE (issue 15), and the probe.

A trusted key cannot gain a wrap template (SoftHSM2 refuses to add array attributes later), so
the SO re-creates it - `hsm retrust` after the officer confirmed its fingerprint, or the next
ceremony's trust step - and `hsm audit` flags it until then. Real SoftHSM2 tokens, the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.core import _cryptoki, ops
from hsm.core.errors import CKR_BY_VALUE, check_rv
from hsm.core.token import Token
from hsm.keys import attributes, export
from tests.helpers import assert_one_line_error, run_hsm

LABEL = "trusted-eu"


def _pins(tt) -> dict:
    return {"HSM_PIN": tt.user_pin.reveal(), "HSM_SO_PIN": tt.so_pin.reveal()}


def _old_trusted_key(tt) -> str:
    """A trusted recipient as the previous version made it (no CKA_WRAP_TEMPLATE), created by
    the SO; returns its SPKI fingerprint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    n = key.public_numbers().n
    template = {**attributes.TRUSTED_RECIPIENT.creation_attributes(), Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.LABEL: LABEL, Attribute.ID: b"old-eu",
                Attribute.MODULUS: n.to_bytes((n.bit_length() + 7) // 8, "big"),
                Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
    del template[Attribute.WRAP_TEMPLATE]
    so = Token.open(tt.label, pin=tt.so_pin, so=True)
    try:
        so.run_on_anchor("create", lambda lease: check_rv(
            so.module.raw.create_object(lease.session.handle, template)[0]))
    finally:
        so.close()
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                          ).hexdigest()


def _wrap_results(tt) -> dict:
    """What the trusted key wraps, with the user PIN: a release secret (the ceremony's
    template) and a cloud-key-like AES key (CMAC + KWP, trusted-wrap)."""
    token = Token.open(tt.label, pin=tt.user_pin)
    raw = token.module.raw
    try:
        seed = f"rel-up-{os.urandom(3).hex()}"
        export.ensure_secret(token, "generic-secret", seed, b"up-id")
        with token.lease() as lease:
            h = lease.session.handle
            rv, cloudish = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True,
                Attribute.SIGN: True, Attribute.ALLOWED_MECHANISMS: [
                    Mechanism.AES_CMAC, Mechanism.AES_KEY_WRAP_PAD]})
            check_rv(rv)
            oaep = _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(Mechanism.SHA_1), 1, 1, None, 0)
            wrapping = lease.key(ops.public(LABEL)).handle
            got = {name: CKR_BY_VALUE.get(raw.wrap_key(h, Mechanism.RSA_PKCS_OAEP, oaep,
                                                       wrapping, key)[0], "CKR_OK")
                   for name, key in (("release secret", lease.key(ops.secret(seed)).handle),
                                     ("cloud-like key", cloudish))}
        export.destroy_secret(token, seed, b"up-id")
        return got
    finally:
        token.close()


def test_a_trusted_key_made_before_wrap_templates_is_flagged_and_retrusted(softhsm_token):
    tt = softhsm_token
    fpr = _old_trusted_key(tt)
    assert _wrap_results(tt) == {"release secret": "CKR_OK", "cloud-like key": "CKR_OK"}
    audit = run_hsm(tt, "audit", "--token", tt.label, "--json", env=_pins(tt))
    assert audit.returncode == 1
    old = next(o for o in json.loads(audit.stdout)["objects"] if o["label"] == LABEL)
    assert [d.split(",")[0] for d in old["deviations"]] == [
        "CKA_WRAP_TEMPLATE: missing (any trusted-wrap key may be wrapped"]
    table = run_hsm(tt, "audit", "--token", tt.label, env=_pins(tt))
    assert f"`hsm retrust --token {tt.label} --label {LABEL} --fingerprint HEX`" in table.stdout
    # A fingerprint other than the key's: refused, one line, nothing changed.
    wrong = run_hsm(tt, "retrust", "--token", tt.label, "--label", LABEL, "--fingerprint",
                    "00" * 32, env=_pins(tt))
    assert f"{LABEL!r} is not the key whose fingerprint was confirmed (token: {fpr})" in \
        assert_one_line_error(wrong)
    assert _wrap_results(tt)["cloud-like key"] == "CKR_OK"
    done = run_hsm(tt, "retrust", "--token", tt.label, "--label", LABEL, "--fingerprint", fpr,
                   env=_pins(tt))
    assert done.returncode == 0 and "re-created by the security officer" in done.stdout, \
        done.stderr
    assert _wrap_results(tt) == {"release secret": "CKR_OK",
                                 "cloud-like key": "CKR_KEY_NOT_WRAPPABLE"}
    clean = run_hsm(tt, "audit", "--token", tt.label, "--json", env=_pins(tt))
    assert clean.returncode == 0, clean.stdout
    again = run_hsm(tt, "retrust", "--token", tt.label, "--label", LABEL, "--fingerprint", fpr,
                    env=_pins(tt))
    assert again.returncode == 0 and "nothing changed" in again.stdout


def test_the_ceremony_trust_step_recreates_an_old_trusted_key(softhsm_token):
    """The same key, certified and pinned, met by the ceremony's trust step: re-created with
    the template (journaled as 're-created'); the next run adopts it."""
    from asn1crypto import keys as asn1keys
    tt = softhsm_token
    _old_trusted_key(tt)
    so = Token.open(tt.label, pin=tt.so_pin, so=True)
    try:
        from hsm.keys import x509 as hx
        spki = hx.public_key_info(so, ops.public(LABEL))
        spki = asn1keys.PublicKeyInfo.load(spki.dump())
        assert export.ensure_trusted_public_key(so, LABEL, b"old-eu", spki) == "re-created"
        assert export.ensure_trusted_public_key(so, LABEL, b"old-eu", spki) == "adopted"
    finally:
        so.close()
    assert _wrap_results(tt)["cloud-like key"] == "CKR_KEY_NOT_WRAPPABLE"


def test_profile_probes_wrap_template_enforcement(hsm_token):
    """SoftHSM2 2.6.1 enforces CKA_WRAP_TEMPLATE; NSS softokn 3.87 does not (measured: it wraps
    a key its template does not admit), and is listed as missing it, so it is refused for
    production keys."""
    prof = hsm_token.token.profile
    if hsm_token.backend == "softhsm2":
        assert prof.wrap_template_enforced is True
        assert "CKA_WRAP_TEMPLATE" not in prof.missing_enforcement()
    else:
        # NSS softokn 3.87 wraps the key the template does not admit: not enforced.
        assert prof.wrap_template_enforced is False
        assert "CKA_WRAP_TEMPLATE" in prof.missing_enforcement()
