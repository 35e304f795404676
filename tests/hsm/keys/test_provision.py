"""Provisioning on real SoftHSM2 tokens: key attributes, certificates, refusal of duplicates."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from asn1crypto import x509 as asn1x509
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.core.errors import HsmError, ObjectExists, UsageError
from hsm.core.token import KeyRef
from hsm.keys import provision
from hsm.keys import x509 as certs
from hsm.keys.keygen import check_private_attributes, generate_keypair
from hsm.keys.roles import PRIMARY_ENCRYPTION, SIGNING_ROLES
from suite import fingerprint as fp


def _raw_attrs(token, ref):
    """The key's policy attributes as the token reports them (raw reads, not our checker)."""
    raw = token.module.raw

    def read(lease):
        h, o = lease.session.handle, lease.key(ref).handle
        bools = {a.name: raw.get_attribute(h, o, a)[1] for a in (
            Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
            Attribute.LOCAL, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
            Attribute.MODIFIABLE, Attribute.COPYABLE)}
        return ({k: v == b"\x01" for k, v in bools.items()},
                raw.get_mechanism_list(h, o, Attribute.ALLOWED_MECHANISMS)[1],
                raw.get_template(h, o, Attribute.UNWRAP_TEMPLATE)[1])
    return token.run("read", read)


def test_primary_keys_have_the_required_attributes(provisioned):
    token = provisioned["primary"].token
    for label in (f"{token.label}-signing", f"{token.label}-encryption"):
        check_private_attributes(token, PRIMARY_ENCRYPTION if label.endswith("encryption")
                                 else SIGNING_ROLES["ecdsa-p384"], label)  # raises if weaker
        bools, mechs, unwrap_tpl = _raw_attrs(token, KeyRef(label, ObjectClass.PRIVATE_KEY))
        assert bools == {"TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
                         "LOCAL": True, "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True,
                         "MODIFIABLE": False, "COPYABLE": False}
        if label.endswith("encryption"):
            assert mechs == [Mechanism.RSA_PKCS_OAEP]
            # The escrow key may only produce session objects extractable under trusted wrap.
            assert unwrap_tpl[Attribute.EXTRACTABLE] == b"\x01"
            assert unwrap_tpl[Attribute.WRAP_WITH_TRUSTED] == b"\x01"
            assert unwrap_tpl[Attribute.SENSITIVE] == b"\x01"
            assert unwrap_tpl[Attribute.TOKEN] == b"\x00"
        else:
            assert mechs == [Mechanism.ECDSA] and unwrap_tpl == {}


def test_regional_key_forces_non_extractable_session_objects(provisioned):
    token = provisioned["regional"].token
    ref = KeyRef(f"{token.label}-encryption", ObjectClass.PRIVATE_KEY)
    bools, mechs, unwrap_tpl = _raw_attrs(token, ref)
    assert bools["MODIFIABLE"] is False and mechs == [Mechanism.RSA_PKCS_OAEP]
    assert (unwrap_tpl[Attribute.SENSITIVE], unwrap_tpl[Attribute.EXTRACTABLE],
            unwrap_tpl[Attribute.TOKEN]) == (b"\x01", b"\x00", b"\x00")
    assert Attribute.ALLOWED_MECHANISMS in unwrap_tpl


def test_key_usages_follow_the_role(provisioned):
    token = provisioned["primary"].token
    enc = KeyRef(f"{token.label}-encryption", ObjectClass.PRIVATE_KEY)
    sig = KeyRef(f"{token.label}-signing", ObjectClass.PRIVATE_KEY)

    def read(ref):
        return token.run("read", lambda lease: lease.key(ref).get_attributes(
            [Attribute.UNWRAP, Attribute.DECRYPT, Attribute.SIGN, Attribute.KEY_TYPE,
             Attribute.MODULUS if ref is enc else Attribute.EC_PARAMS]))
    e = read(enc)
    # UNWRAP without DECRYPT: a wrapped secret cannot be C_Decrypt-ed out of the token.
    assert (e[Attribute.UNWRAP], e[Attribute.DECRYPT], e[Attribute.SIGN]) == (True, False, False)
    assert e[Attribute.KEY_TYPE] == KeyType.RSA and len(e[Attribute.MODULUS]) * 8 == 4096
    s = read(sig)
    assert (s[Attribute.SIGN], s[Attribute.UNWRAP], s[Attribute.DECRYPT]) == (True, False, False)
    assert s[Attribute.KEY_TYPE] == KeyType.EC


def test_key_ids_are_unique_and_link_public_and_private(provisioned):
    token = provisioned["primary"].token
    objs = token.run("scan", lambda lease: [
        (o[Attribute.CLASS], o[Attribute.LABEL], o[Attribute.ID])
        for o in lease.session.get_objects({Attribute.TOKEN: True})])
    by_label = {}
    for cls, label, key_id in objs:
        by_label.setdefault(label, set()).add(key_id)
    assert len(by_label) == 2
    assert all(len(ids) == 1 for ids in by_label.values())  # pub and priv share their CKA_ID
    assert len({next(iter(ids)) for ids in by_label.values()}) == 2


def test_openssl_verifies_every_chain(provisioned):
    out = provisioned["out"]
    root = out / f"{provisioned['primary'].label}-signing.pem"
    leaves = [out / f"{provisioned['primary'].label}-encryption.pem",
              provisioned["regional_cert"].certificate]
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(root),
                           *map(str, leaves)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": OK") == 2
    # The self-signed root verifies against itself too.
    assert subprocess.run(["openssl", "verify", "-CAfile", str(root), str(root)],
                          capture_output=True).returncode == 0


def test_certificates_say_what_they_are(provisioned):
    out = provisioned["out"]
    root = certs.load_pem((out / f"{provisioned['primary'].label}-signing.pem").read_bytes())
    regional = certs.load_pem(provisioned["regional_cert"].certificate.read_bytes())
    assert root.ca and root.self_signed == "maybe"
    assert root.signature_algo == "ecdsa" and root.hash_algo == "sha384"
    assert not regional.ca
    assert regional.key_usage_value.native == {"key_encipherment"}
    assert "region eu" in regional.subject.human_friendly
    assert regional.issuer == root.subject
    assert regional.authority_key_identifier == root.key_identifier
    # The certified key is the regional token's key, byte for byte.
    spki = certs.public_key_info(provisioned["regional"].token,
                                 KeyRef(f"{provisioned['regional'].label}-encryption",
                                        ObjectClass.PUBLIC_KEY))
    assert regional.public_key.dump() == spki.dump()
    assert certs.fingerprint(spki) == provisioned["request"].fingerprint


def test_pkcs11_tool_lists_objects_with_their_attributes(provisioned):
    tt = provisioned["primary"]
    proc = subprocess.run(
        ["pkcs11-tool", "--module", tt.module_path, "--token-label", tt.label, "--login",
         "--pin", tt.user_pin.reveal(), "--list-objects"],
        capture_output=True, text=True, env={**os.environ, **tt.env})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.count("Private Key Object") == 2 and text.count("Public Key Object") == 2
    assert text.count("sensitive, always sensitive, never extractable, local") == 2
    assert f"{tt.label}-signing" in text and f"{tt.label}-encryption" in text


def test_rerun_reports_existing_keys_and_creates_nothing(provisioned):
    token = provisioned["primary"].token
    before = _count_objects(token)
    again = provision.init_primary(token, provisioned["out"])
    assert [o.status for o in again] == ["exists", "exists"]
    assert [o.fingerprint for o in again] == [o.fingerprint for o in provisioned["outcomes"]]
    assert _count_objects(token) == before


def test_existing_label_is_refused(provisioned):
    token = provisioned["primary"].token
    before = _count_objects(token)
    with pytest.raises(ObjectExists) as err:
        generate_keypair(token, PRIMARY_ENCRYPTION, f"{token.label}-encryption")
    assert "already exists" in str(err.value) and f"{token.label}-encryption" in str(err.value)
    assert _count_objects(token) == before


def test_tampered_request_is_refused(provisioned, tmp_path):
    req = json.loads(provisioned["request"].request.read_text())
    spki = bytearray(bytes.fromhex(req["spki_der_hex"]))
    spki[200] ^= 0x01  # inside the modulus: still a valid SPKI, another key
    req["spki_der_hex"] = spki.hex()
    path = tmp_path / "tampered.request.json"
    path.write_text(json.dumps(req))
    with pytest.raises(UsageError, match="fingerprint does not match"):
        provision.read_request(path)


def test_wrong_confirmed_fingerprint_issues_nothing(provisioned, tmp_path):
    out = provisioned["out"]
    target = out / f"{provisioned['regional'].label}.pem"
    before = target.read_bytes()
    wrong = bytes(32)
    with pytest.raises(HsmError, match="does not match"):
        provision.certify_regional(provisioned["primary"].token, provisioned["request"].request,
                                   out, confirmed_fingerprint=wrong)
    assert target.read_bytes() == before


def test_rsa_pss_signing_role(softhsm_token, tmp_path):
    outcomes = provision.init_primary(softhsm_token.token, tmp_path, signing="rsa-pss-3072")
    root = tmp_path / f"{softhsm_token.label}-signing.pem"
    cert = asn1x509.Certificate.load(certs.load_pem(root.read_bytes()).dump())
    assert cert.signature_algo == "rsassa_pss"
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(root), str(root),
                           str(tmp_path / f"{softhsm_token.label}-encryption.pem")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert outcomes[0].fingerprint == fp.spki_sha256(cert.public_key.dump())
    assert SIGNING_ROLES["rsa-pss-3072"].bits == cert.public_key.bit_size


def _count_objects(token) -> int:
    return token.run("count", lambda lease: sum(1 for _ in lease.session.get_objects(
        {Attribute.TOKEN: True})))


def test_nss_is_refused_for_production_keys_naming_what_it_does_not_enforce(nss_token,
                                                                           tmp_path):
    """NSS softokn 3.87 stores CKA_ALLOWED_MECHANISMS but does not enforce it, and has no
    CKA_DESTROYABLE: provisioning production keys there is refused before any key is made."""
    from hsm.core.errors import KeyPolicyViolation

    token = nss_token.token
    before = _count_objects(token)
    with pytest.raises(KeyPolicyViolation) as err:
        provision.init_primary(token, tmp_path)
    assert "does not enforce" in str(err.value)
    assert "CKA_ALLOWED_MECHANISMS" in str(err.value) and "CKA_DESTROYABLE" in str(err.value)
    assert "--allow-weak-token" in str(err.value)
    assert _count_objects(token) == before and not any(tmp_path.iterdir())


def test_nss_keys_fail_the_local_check_and_are_destroyed(nss_token, tmp_path, capsys):
    """With the rehearsal override, NSS softokn still reads CKA_LOCAL back as false even for
    keys it generated: the policy check refuses them rather than trusting the template, and
    leaves no key behind."""
    from hsm.core.errors import KeyPolicyViolation

    token = nss_token.token
    with pytest.raises(KeyPolicyViolation) as err:
        provision.init_primary(token, tmp_path, allow_weak_token=True)
    assert "WARNING" in capsys.readouterr().err
    assert "CKA_LOCAL: got False" in str(err.value)
    assert "NSS Certificate DB-signing" in str(err.value)
    left = token.run("find", lambda lease: list(lease.session.get_objects(
        {Attribute.LABEL: f"{token.label}-signing"})))
    assert left == []
    assert not any(tmp_path.iterdir())  # no certificate written for a refused key


def test_request_names_cannot_steer_the_output_path(provisioned, tmp_path):
    req = json.loads(provisioned["request"].request.read_text())
    for field, value in (("token_label", "../../outside"), ("region", "eu/../x")):
        bad = dict(req, **{field: value})
        path = tmp_path / f"bad-{field}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match="not a plain name"):
            provision.read_request(path)
