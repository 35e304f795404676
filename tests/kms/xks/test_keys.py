"""XKS keys in the token: ``hsm xks-key create`` (idempotent), ``hsm audit`` recognising them,
the user-PIN holder refused by the token with its CKR code, and the ``[xks]`` configuration's
refusals (no secret in the TOML, bad ids and prefixes, a key served by two key stores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism

from hsm.keys import xks as xkeys
from hsm.core.errors import CKR_BY_VALUE, ObjectExists, UsageError, from_pkcs11
from kms.errors import ConfigError
from kms.xks import config as configs
from tests import xks_kit as kit


def hsm(tt, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **tt.env, "HSM_PIN": tt.user_pin.reveal()}
    return subprocess.run([sys.executable, "-m", "hsm", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def rv(code) -> str:
    code = code[0] if isinstance(code, tuple) else code
    return CKR_BY_VALUE.get(code, f"0x{code:x}") if code else "CKR_OK"


def test_cli_creates_lists_and_audits_xks_keys_idempotently(softhsm_token):
    tt = softhsm_token
    first = hsm(tt, "xks-key", "create", "--token", tt.label, "--id", "k-1")
    assert first.returncode == 0, first.stderr
    assert "'k-1' created" in first.stdout and "usage ENCRYPT,DECRYPT" in first.stdout
    again = hsm(tt, "xks-key", "create", "--token", tt.label, "--id", "k-1")
    assert again.returncode == 0 and "'k-1' exists" in again.stdout
    enc = hsm(tt, "xks-key", "create", "--token", tt.label, "--id", "k-2", "--usage", "encrypt")
    assert enc.returncode == 0 and "usage ENCRYPT" in enc.stdout
    other = hsm(tt, "xks-key", "create", "--token", tt.label, "--id", "k-2", "--usage",
                "decrypt")            # same id, another usage: refused, nothing made
    assert other.returncode == 2 and "not an XKS key with usage decrypt" in other.stderr
    bad = hsm(tt, "xks-key", "create", "--token", tt.label, "--id", "no/slash")
    assert bad.returncode == 2 and "bad XKS key id" in bad.stderr and "Traceback" not in bad.stderr
    listed = hsm(tt, "xks-key", "list", "--token", tt.label)
    assert listed.stdout.split() == ["k-1", "ENCRYPT,DECRYPT", "k-2", "ENCRYPT"]
    audit = hsm(tt, "audit", "--token", tt.label, "--json")
    assert audit.returncode == 0, audit.stdout
    rows = {o["label"]: o for o in json.loads(audit.stdout)["objects"]}
    for label in ("xks-k-1", "xks-k-2"):
        assert rows[label]["role"] == "xks key" and rows[label]["deviations"] == []
        assert rows[label]["allowed_mechanisms"] == ["AES_GCM"]
        assert rows[label]["attributes"]["EXTRACTABLE"] is False
        assert rows[label]["attributes"]["MODIFIABLE"] is False
    assert rows["xks-k-2"]["attributes"]["DECRYPT"] is False


def test_audit_flags_an_xks_key_made_without_the_policy(softhsm_token):
    tok = softhsm_token.token
    with tok.lease() as lease:     # what a careless script would make under the XKS label
        lease.session.generate_key(KeyType.AES, 256, label="xks-weak", store=True, template={
            Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True})
    from hsm import inventory
    row = next(r for r in inventory.audit(tok) if r.label == "xks-weak")
    assert row.role == "xks key"
    assert any("CKA_EXTRACTABLE" in d for d in row.deviations)
    assert any("CKA_ALLOWED_MECHANISMS" in d for d in row.deviations)
    with pytest.raises(Exception, match="weaker than the XKS key policy"):
        xkeys.describe(tok, "weak")
    with pytest.raises(ObjectExists):
        xkeys.create(tok, "weak")


def test_the_user_pin_holder_cannot_widen_read_or_misuse_an_xks_key(softhsm_token):
    tok = softhsm_token.token
    enc_only, _ = xkeys.create(tok, "atk-enc", encrypt=True, decrypt=False)
    raw = tok.module.raw
    with tok.lease() as lease:
        h = lease.session.handle
        key = lease.key(enc_only.ref)
        with pytest.raises(pkcs11.PKCS11Error) as info:
            key[Attribute.VALUE]
        assert from_pkcs11(info.value, operation="read").ckr == "CKR_ATTRIBUTE_SENSITIVE"
        for change in ({Attribute.DECRYPT: True}, {Attribute.EXTRACTABLE: True},
                       {Attribute.SENSITIVE: False}, {Attribute.ALLOWED_MECHANISMS:
                                                      [Mechanism.AES_ECB]}):
            assert rv(raw.set_attributes(h, key.handle, change)) in (
                "CKR_ACTION_PROHIBITED", "CKR_ATTRIBUTE_READ_ONLY"), change
        assert rv(raw.set_attributes(h, key.handle, {Attribute.DECRYPT: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert rv(raw.copy_object(h, key.handle, {Attribute.DECRYPT: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert rv(raw.operation_init("C_DecryptInit", h, Mechanism.AES_GCM, None,
                                     key.handle)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
        assert rv(raw.operation_init("C_EncryptInit", h, Mechanism.AES_ECB, None,
                                     key.handle)) == "CKR_MECHANISM_INVALID"
        wrapper = lease.session.generate_key(KeyType.AES, 256, store=False, template={
            Attribute.WRAP: True, Attribute.LABEL: "atk-wrapper"})
        assert rv(raw.wrap_key(h, Mechanism.AES_KEY_WRAP, None, wrapper.handle,
                               key.handle)) == "CKR_KEY_UNEXTRACTABLE"
    # the layer refuses before it asks the token, by name
    iv, ct, tag = xkeys.encrypt(tok, enc_only, b"data", b"aad")
    with pytest.raises(xkeys.KeyUsageRefused):
        xkeys.decrypt(tok, enc_only, iv, ct, tag, b"aad")


def test_usage_parsing():
    assert xkeys.parse_usage("encrypt,decrypt") == (True, True)
    assert xkeys.parse_usage("decrypt") == (False, True)
    assert xkeys.parse_usage("none") == (False, False)
    with pytest.raises(UsageError):
        xkeys.parse_usage("sign")


# ------------------------------------------------------------------------------ configuration
def _config(tmp_path: Path, keystore: dict, env: dict | None = None, **top) -> Path:
    tls = kit.Tls(tmp_path / "ca.pem", (tmp_path / "s.pem", tmp_path / "s.key"))
    return kit.write_config(tmp_path, "tok", tls, [keystore], **top)


@pytest.mark.parametrize("change, message", [
    ({"path_prefix": "/bad prefix"}, "not a valid XKS path prefix"),
    ({"path_prefix": "/" + "p" * 120}, "not a valid XKS path prefix"),
    ({"keys": ["ok", "bad/id"]}, "not a valid XKS key id"),
    ({"disabled_keys": ["other"]}, "names keys not in keys"),
    ({"requests_per_second": 0}, "must be > 0"),
    ({"mtls_subject": "cks.kms.us-east-1.amazonaws.com"}, "need xks.client_ca"),
])
def test_configuration_refusals(tmp_path, monkeypatch, change, message):
    cred = kit.env_cred(os.environ)
    monkeypatch.setenv(cred.source[4:], cred.secret)
    ks = {"name": "a", "region": "us-east-1", "keys": ["ok"], "credentials": [cred], **change}
    path = _config(tmp_path, ks)
    text = path.read_text().replace('client_ca = ', '# client_ca = ')
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        configs.load(path)


def test_a_secret_is_never_taken_from_the_toml_and_must_look_like_one(tmp_path, monkeypatch):
    cred = kit.Cred(kit.access_key_id(), kit.secret_key(), "")
    ks = {"name": "a", "region": "us-east-1", "keys": ["ok"], "credentials": [cred]}
    for source, message in ((cred.secret, "env:VAR or file:PATH; never the secret"),
                            ("env:XKS_UNSET_VAR", "not set"),
                            ("env:XKS_SHORT", "43-64 characters")):
        cred.source = source
        monkeypatch.setenv("XKS_SHORT", "short")
        with pytest.raises(ConfigError, match=message) as info:
            configs.load(_config(tmp_path, ks))
        assert cred.secret not in str(info.value)
    cred.source, cred.access_key_id = "env:XKS_SHORT", "lowercase-id-not-allowed"
    with pytest.raises(ConfigError, match="20-30 characters"):
        configs.load(_config(tmp_path, ks))


def test_three_credentials_or_a_key_in_two_key_stores_are_refused(tmp_path, monkeypatch):
    creds = [kit.env_cred(os.environ) for _ in range(4)]
    for c in creds:
        monkeypatch.setenv(c.source[4:], c.secret)
    tls = kit.Tls(tmp_path / "ca.pem", (tmp_path / "s.pem", tmp_path / "s.key"))
    three = [{"name": "a", "region": "r", "keys": ["k"], "credentials": creds[:3]}]
    with pytest.raises(ConfigError, match="one or two credentials"):
        configs.load(kit.write_config(tmp_path, "t", tls, three))
    twice = [{"name": "a", "path_prefix": "/a", "region": "r", "keys": ["k"],
              "credentials": [creds[0]]},
             {"name": "b", "path_prefix": "/b", "region": "r", "keys": ["k"],
              "credentials": [creds[1]]}]
    with pytest.raises(ConfigError, match="served by another key store"):
        configs.load(kit.write_config(tmp_path, "t", tls, twice))
    same = [dict(twice[0]), {**twice[1], "path_prefix": "/a", "keys": ["j"]}]
    with pytest.raises(ConfigError, match="used by another key store"):
        configs.load(kit.write_config(tmp_path, "t", tls, same))


def test_the_example_xks_node_is_valid_and_shows_every_key(monkeypatch):
    import re
    example = Path(__file__).resolve().parents[3] / "examples" / "xks-node.toml"
    monkeypatch.setenv("XKS_SECRET_PAYMENTS", kit.secret_key())
    cfg = configs.load(example)
    (ks,) = cfg.keystores
    assert (ks.prefix, ks.region, ks.disabled_keys) == ("/payments", "eu-west-1",
                                                        frozenset({"payments-old"}))
    assert ks.mtls_subject == "cks.kms.eu-west-1.amazonaws.com" and len(ks.rules) == 1
    shown = set(re.findall(r"^\s*(?:#\s*)?([a-z0-9_]+)\s*=", example.read_text(), re.M))
    every = set(configs._FIELDS) | set(configs._KEYSTORE_FIELDS) | \
        set(configs._CREDENTIAL_FIELDS) | set(configs._RULE_FIELDS)
    assert every - {"keystores", "credentials", "rules"} <= shown
