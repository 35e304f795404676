"""The real ``hsm`` command in subprocesses, against real SoftHSM2 tokens made for the test session.

Every run gets ``stdin=DEVNULL`` (no terminal, so nothing may prompt) and an environment without
any ``HSM_*`` variable except those a test sets. Provisioning generates RSA-4096 keys, so the
primary and the regional token are provisioned once per module and shared by the tests that only
read them; tests that need an untouched token use the plugin's ``softhsm_token``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsm.testing import TestToken, new_softhsm_token
from suite import fingerprint as fp
from tests.helpers import assert_no_secrets, assert_one_line_error, run_hsm, self_signed_pem

pytestmark = pytest.mark.slow

KWP_0x210A = 0x210A  # SoftHSM2 implements RFC 5649 under CKM_AES_KEY_WRAP_PAD


# ----------------------------------------------------------------------------- helpers
def pin_env(tt: TestToken) -> dict:
    return {"HSM_PIN": tt.user_pin.reveal()}


def objects_on(tt: TestToken) -> list[dict]:
    result = run_hsm(tt, "info", "--token", tt.label, "--objects", "--json", env=pin_env(tt))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["objects"]


def outcome_status(stdout: str, label: str) -> str:
    """'created' / 'exists' / 'certified' from a ``LABEL (role): status`` line."""
    for line in stdout.splitlines():
        if line.startswith(f"{label} ("):
            return line.rsplit(": ", 1)[1]
    raise AssertionError(f"no outcome line for {label} in:\n{stdout}")


def printed_fingerprint(stdout: str, label: str) -> bytes:
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{label} ("):
            hex_line = lines[i + 1]
            assert "SHA-256(SPKI)" in hex_line
            return bytes.fromhex(hex_line.split("SHA-256(SPKI)", 1)[1].replace(" ", ""))
    raise AssertionError(f"no outcome for {label}")


def spki_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def make_module_token(softhsm_module, prefix: str) -> TestToken:
    return new_softhsm_token(softhsm_module, prefix=prefix)


@dataclass
class Primary:
    tt: TestToken
    out: Path
    first: subprocess.CompletedProcess

    @property
    def signing_cert(self) -> Path:
        return self.out / f"{self.tt.label}-signing.pem"

    @property
    def encryption_cert(self) -> Path:
        return self.out / f"{self.tt.label}-encryption.pem"


@dataclass
class Regional:
    tt: TestToken
    request: Path
    data: dict


@pytest.fixture(scope="module")
def primary(softhsm_module, tmp_path_factory) -> Primary:
    tt = make_module_token(softhsm_module, "cli-primary")
    out = tmp_path_factory.mktemp("primary-out")
    first = run_hsm(tt, "init-primary", "--token", tt.label, "--out", str(out), env=pin_env(tt))
    assert first.returncode == 0, first.stderr
    return Primary(tt, out, first)


@pytest.fixture(scope="module")
def regional(softhsm_module, tmp_path_factory) -> Regional:
    tt = make_module_token(softhsm_module, "cli-regional")
    out = tmp_path_factory.mktemp("regional-out")
    result = run_hsm(tt, "init-regional", "--token", tt.label, "--region", "eu-west",
                     "--out", str(out), env=pin_env(tt))
    assert result.returncode == 0, result.stderr
    request = out / f"{tt.label}.request.json"
    return Regional(tt, request, json.loads(request.read_text()))


@pytest.fixture
def certify_out(primary, tmp_path) -> Path:
    """A fresh --out directory holding only the primary signing certificate."""
    out = tmp_path / "certify-out"
    out.mkdir()
    shutil.copy(primary.signing_cert, out)
    return out


def certify(primary: Primary, request: Path, out: Path, typed: str):
    return run_hsm(primary.tt, "certify-regional", "--token", primary.tt.label,
                   "--request", str(request), "--out", str(out), "--fingerprint", typed,
                   env=pin_env(primary.tt))


# ----------------------------------------------------------------------------- hsm info
def test_info_json_profile(softhsm_token, softhsm_module):
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label, "--json",
                     env=pin_env(softhsm_token))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["token_label"] == softhsm_token.label
    assert data["token_serial"]
    if softhsm_module.lib.library_version[:2] == (2, 6):
        assert data["oaep_hashes"] == ["sha1"]  # SoftHSM2 2.6.1: OAEP with SHA-1/MGF1-SHA1 only
        assert data["rsa_aes_key_wrap"] is False
    else:
        assert "sha1" in data["oaep_hashes"]
    assert data["aes_kwp"] == KWP_0x210A
    assert data["aes_key_wrap"] is True
    assert data["trusted_wrap_enforced"] is True
    assert data["hkdf"] is False and data["sp800_108"] is False
    mechanisms = data["mechanisms"]
    assert isinstance(mechanisms, dict) and len(mechanisms) > 20
    for name in ("RSA_PKCS_OAEP", "AES_KEY_WRAP", "AES_KEY_WRAP_PAD", "SHA256_HMAC"):
        assert name in mechanisms
    assert mechanisms["RSA_PKCS_OAEP"]["code"] == "0x9"
    assert "objects" not in data
    assert_no_secrets(result, softhsm_token.user_pin.reveal())


def test_info_objects_of_a_fresh_token_is_empty_after_probing(softhsm_token):
    # the profile probe generates keys: they must be session objects, gone afterwards
    assert objects_on(softhsm_token) == []
    assert objects_on(softhsm_token) == []


def test_info_text_output(softhsm_token):
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label,
                     env=pin_env(softhsm_token))
    assert result.returncode == 0, result.stderr
    assert f"Token      {softhsm_token.label} " in result.stdout
    assert "OAEP       sha1" in result.stdout
    assert "CKA_WRAP_WITH_TRUSTED enforced: yes" in result.stdout


# ----------------------------------------------------------------------------- wrong PIN
WRONG_PIN_ROUTES = ["HSM_PIN", "pin-source-env", "pin-source-file", "uri-pin-source",
                    "uri-pin-value"]


def _wrong_pin_args(route: str, tt: TestToken, wrong: str, tmp_path: Path):
    if route == "HSM_PIN":
        return ["--token", tt.label], {"HSM_PIN": wrong}
    if route == "pin-source-env":
        return ["--token", tt.label, "--pin-source", "env:TEST_WRONG_PIN"], \
            {"TEST_WRONG_PIN": wrong}
    if route == "pin-source-file":
        f = tmp_path / "wrong-pin"
        f.write_text(wrong + "\n")
        return ["--token", tt.label, "--pin-source", f"file:{f}"], {}
    if route == "uri-pin-source":
        return ["--token", f"pkcs11:token={tt.label}?pin-source=env:TEST_WRONG_PIN"], \
            {"TEST_WRONG_PIN": wrong}
    if route == "uri-pin-value":
        return ["--token", f"pkcs11:token={tt.label}?pin-value={wrong}"], {}
    raise AssertionError(route)


@pytest.mark.parametrize("route", WRONG_PIN_ROUTES)
def test_wrong_pin_is_one_line_without_pins(softhsm_token, tmp_path, route):
    wrong = "wrong-" + secrets.token_hex(6)
    args, env = _wrong_pin_args(route, softhsm_token, wrong, tmp_path)
    result = run_hsm(softhsm_token, "info", *args, env=env)
    line = assert_one_line_error(result)
    assert "CKR_PIN_INCORRECT" in line
    assert softhsm_token.label in line
    assert_no_secrets(result, wrong, softhsm_token.user_pin.reveal())


@pytest.mark.parametrize("route", ["HSM_PIN", "uri-pin-value"])
def test_wrong_pin_with_debug_shows_a_traceback_but_no_pin(softhsm_token, tmp_path, route):
    wrong = "wrong-" + secrets.token_hex(6)
    args, env = _wrong_pin_args(route, softhsm_token, wrong, tmp_path)
    result = run_hsm(softhsm_token, "--debug", "info", *args, env=env)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "CKR_PIN_INCORRECT" in result.stderr
    assert_no_secrets(result, wrong, softhsm_token.user_pin.reveal())


def test_right_pin_still_works_after_a_wrong_one(softhsm_token):
    wrong = run_hsm(softhsm_token, "info", "--token", softhsm_token.label,
                    env={"HSM_PIN": "not-" + softhsm_token.user_pin.reveal()})
    assert wrong.returncode != 0
    right = run_hsm(softhsm_token, "info", "--token", softhsm_token.label, "--json",
                    env=pin_env(softhsm_token))
    assert right.returncode == 0, right.stderr


# ----------------------------------------------------------------------------- token selection
@pytest.mark.parametrize("as_uri", [False, True], ids=["label", "uri"])
def test_missing_token_names_it_and_lists_the_tokens_present(softhsm_token, as_uri):
    missing = "no-such-token-" + secrets.token_hex(3)
    target = f"pkcs11:token={missing}" if as_uri else missing
    result = run_hsm(softhsm_token, "info", "--token", target, env=pin_env(softhsm_token))
    line = assert_one_line_error(result)
    assert repr(missing) in line
    assert "tokens present" in line
    present = line.split("tokens present", 1)[1]
    assert repr(softhsm_token.label) in present
    assert_no_secrets(result, softhsm_token.user_pin.reveal())


def test_wrong_serial_does_not_select_the_label(softhsm_token):
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label,
                     "--serial", "0000000000000000", env=pin_env(softhsm_token))
    line = assert_one_line_error(result)
    assert "0000000000000000" in line


# ----------------------------------------------------------------------------- PIN sources
@pytest.mark.parametrize("as_uri", [False, True], ids=["label", "uri"])
def test_no_pin_available_fails_fast_with_a_hint(softhsm_token, as_uri):
    target = f"pkcs11:token={softhsm_token.label}" if as_uri else softhsm_token.label
    result = run_hsm(softhsm_token, "info", "--token", target, timeout=60)
    line = assert_one_line_error(result)
    assert "--pin-source" in line
    assert "HSM_PIN" in line
    assert "PIN" in line.split("[", 1)[0]
    assert result.stdout == ""


def _info_ok(result, tt) -> None:
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_label"] == tt.label
    assert_no_secrets(result, tt.user_pin.reveal())


# HSM_PIN is set to a wrong PIN in these: the explicit source must win over the default.
def test_pin_source_file(softhsm_token, tmp_path):
    f = tmp_path / "user.pin"
    f.write_text(softhsm_token.user_pin.reveal() + "\n")
    f.chmod(0o600)
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label, "--json",
                     "--pin-source", f"file:{f}", env={"HSM_PIN": "wrong-default"})
    _info_ok(result, softhsm_token)


def test_pin_source_env(softhsm_token):
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label, "--json",
                     "--pin-source", "env:TEST_OFFICER_PIN",
                     env={"TEST_OFFICER_PIN": softhsm_token.user_pin.reveal(),
                          "HSM_PIN": "wrong-default"})
    _info_ok(result, softhsm_token)


def test_uri_with_pin_source_as_token(softhsm_token):
    uri = f"pkcs11:token={softhsm_token.label}?pin-source=env:TEST_OFFICER_PIN"
    result = run_hsm(softhsm_token, "info", "--token", uri, "--json",
                     env={"TEST_OFFICER_PIN": softhsm_token.user_pin.reveal(),
                          "HSM_PIN": "wrong-default"})
    _info_ok(result, softhsm_token)


def test_uri_with_serial_and_module_path(softhsm_token, softhsm_module):
    first = run_hsm(softhsm_token, "info", "--token", softhsm_token.label, "--json",
                    env=pin_env(softhsm_token))
    serial = json.loads(first.stdout)["token_serial"]
    uri = (f"pkcs11:token={softhsm_token.label};serial={serial}"
           f"?module-path={softhsm_module.path}&pin-source=env:TEST_OFFICER_PIN")
    result = run_hsm(softhsm_token, "info", "--token", uri, "--json",
                     env={"TEST_OFFICER_PIN": softhsm_token.user_pin.reveal()})
    _info_ok(result, softhsm_token)
    assert json.loads(result.stdout)["token_serial"] == serial


def test_pin_source_naming_a_missing_variable(softhsm_token):
    result = run_hsm(softhsm_token, "info", "--token", softhsm_token.label,
                     "--pin-source", "env:TEST_NOT_SET_ANYWHERE", env=pin_env(softhsm_token))
    line = assert_one_line_error(result)
    assert "env:TEST_NOT_SET_ANYWHERE" in line  # and no silent fallback to HSM_PIN
    assert_no_secrets(result, softhsm_token.user_pin.reveal())


def test_unknown_uri_attribute_is_refused(softhsm_token):
    result = run_hsm(softhsm_token, "info", "--token", f"pkcs11:tokn={softhsm_token.label}",
                     env=pin_env(softhsm_token))
    line = assert_one_line_error(result)
    assert "'tokn'" in line


# ----------------------------------------------------------------------------- init-primary
def test_init_primary_first_run_creates_both_keys_and_certificates(primary):
    a, b = f"{primary.tt.label}-signing", f"{primary.tt.label}-encryption"
    assert outcome_status(primary.first.stdout, a) == "created"
    assert outcome_status(primary.first.stdout, b) == "created"
    signing = x509.load_pem_x509_certificate(primary.signing_cert.read_bytes())
    encryption = x509.load_pem_x509_certificate(primary.encryption_cert.read_bytes())
    # the fingerprints printed for the officers are those of the certified keys
    assert printed_fingerprint(primary.first.stdout, a) == hashlib.sha256(
        spki_der(signing)).digest()
    assert printed_fingerprint(primary.first.stdout, b) == hashlib.sha256(
        spki_der(encryption)).digest()
    assert encryption.issuer == signing.subject
    assert isinstance(encryption.public_key(), rsa.RSAPublicKey)
    assert encryption.public_key().key_size == 4096
    signing.public_key().verify(encryption.signature, encryption.tbs_certificate_bytes,
                                ec.ECDSA(encryption.signature_hash_algorithm))
    assert_no_secrets(primary.first, primary.tt.user_pin.reveal())


def test_init_primary_second_run_reports_exists_and_creates_nothing(primary):
    before = objects_on(primary.tt)
    assert sorted((o["class"], o["label"]) for o in before) == sorted(
        (cls, f"{primary.tt.label}-{role}") for cls in ("private_key", "public_key")
        for role in ("signing", "encryption"))
    certs_before = {p.name: p.read_bytes() for p in primary.out.iterdir()}

    again = run_hsm(primary.tt, "init-primary", "--token", primary.tt.label,
                    "--out", str(primary.out), env=pin_env(primary.tt))
    assert again.returncode == 0, again.stderr
    assert outcome_status(again.stdout, f"{primary.tt.label}-signing") == "exists"
    assert outcome_status(again.stdout, f"{primary.tt.label}-encryption") == "exists"
    assert "created" not in again.stdout

    after = objects_on(primary.tt)
    assert len(after) == len(before) == 4
    key = lambda o: (o["class"], o["label"], o["id"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, before))
    assert {p.name: p.read_bytes() for p in primary.out.iterdir()} == certs_before
    for label in (f"{primary.tt.label}-signing", f"{primary.tt.label}-encryption"):
        assert printed_fingerprint(again.stdout, label) == printed_fingerprint(
            primary.first.stdout, label)


# ----------------------------------------------------------------------------- outputs
def _init_primary_over(tt: TestToken, tmp_path: Path,
                       existing: bytes) -> tuple[subprocess.CompletedProcess, Path]:
    """``hsm init-primary`` into a new --out folder whose signing-certificate file already
    holds ``existing``; the result and that file."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"{tt.label}-signing.pem"
    target.write_bytes(existing)
    result = run_hsm(tt, "init-primary", "--token", tt.label, "--out", str(out),
                     env=pin_env(tt))
    return result, target


def test_existing_output_file_is_never_overwritten(softhsm_token, tmp_path):
    result, target = _init_primary_over(softhsm_token, tmp_path, b"written by someone else\n")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"written by someone else\n"
    # no encryption cert either
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert_no_secrets(result, softhsm_token.user_pin.reveal())


def test_existing_output_file_error_names_the_file(softhsm_token, tmp_path):
    result, target = _init_primary_over(softhsm_token, tmp_path, b"written by someone else\n")
    line = assert_one_line_error(result)
    assert str(target) in line or target.name in line
    assert target.read_bytes() == b"written by someone else\n"


def test_existing_certificate_for_another_key_is_never_overwritten(softhsm_token, tmp_path):
    from cryptography.hazmat.primitives import hashes

    pem = self_signed_pem(ec.generate_private_key(ec.SECP384R1()), "someone else",
                          hashes.SHA384())
    result, target = _init_primary_over(softhsm_token, tmp_path, pem)
    line = assert_one_line_error(result)
    assert str(target) in line
    assert "another key" in line
    assert target.read_bytes() == pem


# ----------------------------------------------------------------------------- certify-regional
def _other_digest() -> bytes:
    return hashlib.sha256(b"some other key").digest()


@pytest.mark.parametrize("typed", [
    lambda real: "00" * 32,
    lambda real: _other_digest().hex(),
    lambda real: " ".join(fp.to_words(_other_digest())),
    lambda real: (real[:31] + bytes([real[31] ^ 1])).hex(),     # one bit off
    lambda real: fp.to_hex(real[16:] + real[:16]),              # halves read in the wrong order
], ids=["zeros", "other-hex", "other-words", "one-bit", "halves-swapped"])
def test_certify_with_a_wrong_fingerprint_writes_nothing(primary, regional, certify_out, typed):
    real = bytes.fromhex(regional.data["fingerprint_sha256"])
    result = certify(primary, regional.request, certify_out, typed(real))
    line = assert_one_line_error(result)
    assert "does not match" in line
    assert sorted(p.name for p in certify_out.iterdir()) == [primary.signing_cert.name]
    assert_no_secrets(result, primary.tt.user_pin.reveal())


@pytest.mark.parametrize("typed", ["ab" * 31, "aardvark adroitness", "not a fingerprint"])
def test_certify_with_an_unreadable_fingerprint_writes_nothing(primary, regional, certify_out,
                                                               typed):
    result = certify(primary, regional.request, certify_out, typed)
    line = assert_one_line_error(result)
    assert "fingerprint" in line
    assert sorted(p.name for p in certify_out.iterdir()) == [primary.signing_cert.name]


def test_certify_without_a_fingerprint_refuses(primary, regional, certify_out):
    result = run_hsm(primary.tt, "certify-regional", "--token", primary.tt.label,
                     "--request", str(regional.request), "--out", str(certify_out),
                     env=pin_env(primary.tt))
    line = assert_one_line_error(result)
    assert "--fingerprint" in line
    assert sorted(p.name for p in certify_out.iterdir()) == [primary.signing_cert.name]


def _flip_hex_digit(hex_text: str, index: int) -> str:
    flipped = format(int(hex_text[index], 16) ^ 0x1, "x")
    return hex_text[:index] + flipped + hex_text[index + 1:]


def test_certify_a_tampered_request_fails_on_the_fingerprint(primary, regional, certify_out,
                                                             tmp_path):
    data = dict(regional.data)
    original = data["spki_der_hex"]
    index = len(original) // 2  # inside the 4096-bit modulus: the DER stays well-formed
    data["spki_der_hex"] = _flip_hex_digit(original, index)
    assert data["spki_der_hex"] != original
    serialization.load_der_public_key(bytes.fromhex(data["spki_der_hex"]))  # still a valid key
    tampered = tmp_path / "tampered.request.json"
    tampered.write_text(json.dumps(data))
    # the officer confirms the genuine fingerprint, read on the regional console
    result = certify(primary, tampered, certify_out, regional.data["fingerprint_sha256"])
    line = assert_one_line_error(result)
    assert "fingerprint does not match" in line
    assert sorted(p.name for p in certify_out.iterdir()) == [primary.signing_cert.name]


def test_certify_a_substituted_key_with_its_own_fingerprint_fails(primary, regional,
                                                                   certify_out, tmp_path):
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    spki = attacker.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    data = dict(regional.data, spki_der_hex=spki.hex(),
                fingerprint_sha256=hashlib.sha256(spki).hexdigest())
    forged = tmp_path / "forged.request.json"
    forged.write_text(json.dumps(data))
    result = certify(primary, forged, certify_out,
                     " ".join(fp.to_words(bytes.fromhex(regional.data["fingerprint_sha256"]))))
    line = assert_one_line_error(result)
    assert "does not match" in line
    assert sorted(p.name for p in certify_out.iterdir()) == [primary.signing_cert.name]


def test_certify_with_the_right_fingerprint_issues_a_certificate(primary, regional, certify_out):
    real = bytes.fromhex(regional.data["fingerprint_sha256"])
    result = certify(primary, regional.request, certify_out, " ".join(fp.to_words(real)))
    assert result.returncode == 0, result.stderr
    assert outcome_status(result.stdout, regional.data["key_label"]) == "certified"
    issued = certify_out / f"{regional.tt.label}.pem"
    cert = x509.load_pem_x509_certificate(issued.read_bytes())
    issuer = x509.load_pem_x509_certificate(primary.signing_cert.read_bytes())
    assert spki_der(cert) == bytes.fromhex(regional.data["spki_der_hex"])
    assert hashlib.sha256(spki_der(cert)).digest() == real
    assert cert.issuer == issuer.subject
    issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
    assert_no_secrets(result, primary.tt.user_pin.reveal())

    pem = issued.read_bytes()
    again = certify(primary, regional.request, certify_out, real.hex())
    assert again.returncode == 0, again.stderr
    assert outcome_status(again.stdout, regional.data["key_label"]) == "exists"
    assert issued.read_bytes() == pem  # never re-issued or overwritten


def test_audit_is_clean_after_provisioning_and_flags_a_weaker_key(regional):
    tt = regional.tt
    clean = run_hsm(tt, "audit", "--token", tt.label, "--json", env=pin_env(tt))
    assert clean.returncode == 0, clean.stderr
    doc = json.loads(clean.stdout)
    roles = {(o["object_class"], o["label"]): o for o in doc["objects"]}
    priv = roles[("private_key", f"{tt.label}-encryption")]
    assert priv["role"] == "regional-encryption" and priv["deviations"] == []
    assert priv["allowed_mechanisms"] == ["RSA_PKCS_OAEP"]
    assert priv["attributes"]["MODIFIABLE"] is False and doc["deviations"] == 0
    # init-regional also made the KMS audit-signing key: raw ECDSA, SIGN only, recognised
    signer = roles[("private_key", f"{tt.label}-audit")]
    assert (signer["role"], signer["deviations"], signer["allowed_mechanisms"]) == (
        "regional-audit-signing", [], ["ECDSA"])
    assert signer["attributes"]["SIGN"] is True and signer["attributes"]["DERIVE"] is False
    # A release secret made the way this suite made them before the key policy (python-pkcs11
    # defaults: modifiable, any mechanism): audit names each missing attribute and fails.
    from pkcs11 import Attribute, KeyType, MechanismFlag
    label = f"rel-legacy-{secrets.token_hex(3)}"
    token = tt.token
    token.run_on_anchor("gen", lambda lease: lease.session.generate_key(
        KeyType.AES, 256, label=label, store=True, capabilities=MechanismFlag.ENCRYPT,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                  Attribute.WRAP_WITH_TRUSTED: True}))
    try:
        flagged = run_hsm(tt, "audit", "--token", tt.label, "--json", env=pin_env(tt))
        assert flagged.returncode == 1, flagged.stderr
        weak = next(o for o in json.loads(flagged.stdout)["objects"] if o["label"] == label)
        text = " ".join(weak["deviations"])
        assert "CKA_MODIFIABLE: got True, want False" in text
        assert "CKA_ALLOWED_MECHANISMS: missing" in text
        assert "CKA_ENCRYPT: got True, want False" in text
        table = run_hsm(tt, "audit", "--token", tt.label, env=pin_env(tt))
        assert table.returncode == 1 and f"{label}" in table.stdout
        assert "re-provision" in table.stdout
    finally:
        token.run_on_anchor("destroy", lambda lease: [
            o.destroy() for o in lease.session.get_objects({Attribute.LABEL: label})])
        tt.close()


def test_init_token_in_process_with_per_token_pins_and_idempotent(softhsm_token):
    """`hsm init-token` runs C_InitToken/C_InitPIN in its own process: the PINs come from
    HSM_SO_PIN_<LABEL>/HSM_PIN_<LABEL> and never appear on any command line."""
    from hsm.core.pin import token_env
    label = f"cli-new-{secrets.token_hex(3)}"
    so, user = secrets.token_hex(8), secrets.token_hex(6)
    env = {token_env("HSM_SO_PIN", label): so, token_env("HSM_PIN", label): user}
    first = run_hsm(softhsm_token, "init-token", "--label", label, env=env)
    assert first.returncode == 0, first.stderr
    assert "initialised with C_InitToken" in first.stdout
    assert_no_secrets(first, so, user)
    # The user PIN works (found through the per-token variable alone), a second run does nothing.
    info = run_hsm(softhsm_token, "info", "--token", label, "--json",
                   env={token_env("HSM_PIN", label): user})
    assert info.returncode == 0, info.stderr
    again = run_hsm(softhsm_token, "init-token", "--label", label, env=env)
    assert again.returncode == 0 and "already exists; nothing done" in again.stdout


@pytest.mark.parametrize("label", ["", "   ", "x" * 33, " padded"])
def test_init_token_refuses_a_bad_label_before_touching_anything(softhsm_token, label):
    result = run_hsm(softhsm_token, "init-token", "--label", label,
                     env={"HSM_SO_PIN": "12345678", "HSM_PIN": "123456"})
    assert "bad token label" in assert_one_line_error(result)


def test_init_regional_refuses_an_out_dir_whose_parent_is_missing(softhsm_token, tmp_path):
    out = tmp_path / "no" / "such" / "dir"
    result = run_hsm(softhsm_token, "init-regional", "--token", softhsm_token.label,
                     "--region", "eu", "--out", str(out), env=pin_env(softhsm_token))
    assert "does not exist" in assert_one_line_error(result)
    assert not (tmp_path / "no").exists()


def test_info_objects_lists_data_objects_without_an_id(softhsm_token):
    """A release record is a CKO_DATA object with no CKA_ID: `hsm info --objects` lists it."""
    from hsm.keys import export
    export.write_state(softhsm_token.token, "4242")
    softhsm_token.close()
    objs = objects_on(softhsm_token)
    assert {"class": "data", "label": "hsm-suite-release-4242", "id": ""} in objs


# ----------------------------------------------------------------------- outputs that cannot be written
def test_init_primary_into_a_read_only_directory_makes_no_key(softhsm_token, tmp_path):
    from tests.helpers import small_filesystem
    with small_filesystem(tmp_path / "ro", read_only=True) as out:
        result = run_hsm(softhsm_token, "init-primary", "--token", softhsm_token.label,
                         "--out", str(out), env=pin_env(softhsm_token))
    line = assert_one_line_error(result)
    assert result.returncode == 2
    assert "Read-only file system" in line and "nothing was made" in line, line
    assert [o for o in objects_on(softhsm_token) if o["class"] != "data"] == []


def test_init_primary_into_a_full_directory_keeps_the_key_pair_and_the_rerun_adopts_it(
        softhsm_token, tmp_path):
    """The signing key pair is made before its certificate can be written: the message says it
    stays on the token, and the same command run again adopts it (never a second key)."""
    from tests.helpers import small_filesystem
    tt, sign = softhsm_token, f"{softhsm_token.label}-signing"
    with small_filesystem(tmp_path / "full") as out:
        result = run_hsm(tt, "init-primary", "--token", tt.label, "--out", str(out),
                         env=pin_env(tt))
        line = assert_one_line_error(result)
        assert result.returncode == 2
        assert "No space left on device" in line and f"the key pair {sign!r} stays" in line
        assert "run the same command again: it adopts the key pair" in line, line
        assert sorted(p.name for p in out.iterdir()) == [".filler"]  # no certificate, no temp
    keys = [(o["class"], o["label"]) for o in objects_on(tt) if o["class"] != "data"]
    assert sorted(keys) == [("private_key", sign), ("public_key", sign)]
    again = run_hsm(tt, "init-primary", "--token", tt.label, "--out", str(out), env=pin_env(tt))
    assert again.returncode == 0, again.stderr
    assert outcome_status(again.stdout, sign) == "exists"
    # A long operation says what it does as it starts (stdout; stderr stays an error's line).
    assert f"generating the RSA-4096 key pair '{tt.label}-encryption'" in again.stdout
    assert "generating" not in again.stdout.split(f"'{tt.label}-encryption'")[1]
    cert = x509.load_pem_x509_certificate((out / f"{sign}.pem").read_bytes())
    assert [o["label"] for o in objects_on(tt)].count(sign) == 2  # one pair, adopted
    assert cert.subject == cert.issuer


# ----------------------------------------------------------------------------- hints that lead somewhere
def test_hints_name_the_real_options_variables_and_files(softhsm_token, tmp_path):
    """Each hint names what exists: HSM_PIN_<LABEL> and --pin-source for a wrong user PIN, the
    SO's own variables for a wrong SO PIN, --so-pin-source in init-token; a missing token is
    said to be missing (not asked for a PIN); a missing SOFTHSM2_CONF file is named (not
    "CKR 0x5"); a private key given as a wrapping key is one line."""
    from cryptography.hazmat.primitives.asymmetric import rsa as crsa

    from hsm.core.pin import token_env
    tt = softhsm_token
    per_token = token_env("HSM_PIN", tt.label)
    line = assert_one_line_error(run_hsm(tt, "info", "--token", tt.label,
                                         env={"HSM_PIN": "wrong-" + secrets.token_hex(4)}))
    assert "the user PIN is wrong" in line and f"${per_token}" in line and "--pin-source" in line
    key = crsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "import-key.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "import-key.pub.pem"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    line = assert_one_line_error(run_hsm(
        tt, "cloud-key", "trust", "--token", tt.label, "--provider", "aws", "--wrapping-key",
        str(private), "--fingerprint", "00" * 32, env=pin_env(tt)))
    assert "is a private key" in line, line
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    line = assert_one_line_error(run_hsm(
        tt, "cloud-key", "trust", "--token", tt.label, "--provider", "aws", "--wrapping-key",
        str(public), "--fingerprint", hashlib.sha256(spki).hexdigest(),
        env={**pin_env(tt), "HSM_SO_PIN": "wrong-so-" + secrets.token_hex(4)}))
    assert "security officer (SO) PIN is wrong" in line, line
    assert f"${token_env('HSM_SO_PIN', tt.label)}" in line and "--so-pin-source" in line
    line = assert_one_line_error(run_hsm(tt, "init-token", "--label", "new-" + tt.label[:20]))
    assert "--so-pin-source" in line and "--pin-source env" not in line, line
    line = assert_one_line_error(run_hsm(tt, "info", "--token", "no-such-token"))
    assert "no token with label='no-such-token'" in line and "PIN" not in line, line
    line = assert_one_line_error(run_hsm(tt, "info", "--token", tt.label, env={
        **pin_env(tt), "SOFTHSM2_CONF": str(tmp_path / "missing.conf")}))
    assert f"SOFTHSM2_CONF names {tmp_path / 'missing.conf'}, which does not exist" in line
