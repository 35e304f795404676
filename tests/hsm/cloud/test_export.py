"""Cloud BYOK export through the real ``hsm cloud-key`` command on a real SoftHSM2 token.

The test plays each provider: it makes the provider's RSA import key pair with
``cryptography``, has the SO trust the public half, runs the export, unwraps what the provider
would receive exactly as the provider documents it, and checks the key against the printed check
value (and the value printed when the key was created). Then every refusal the issue names.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.core.token import Token
from hsm.keys import export as hsm_export
from tests import cloud_kit as ck
from tests.helpers import assert_no_secrets, assert_one_line_error, run_hsm

pytestmark = pytest.mark.slow
KID = "https://contoso.managedhsm.azure.net/keys/KEKforBYOK/0123456789abcdef"


@pytest.fixture(scope="module")
def cloud(softhsm_session_token_factory, tmp_path_factory):
    tt = softhsm_session_token_factory(prefix="cloud")
    root = tmp_path_factory.mktemp("cloud")
    r = run_hsm(tt, "cloud-key", "create", "--token", tt.label, "--label", "ck",
                env=ck.pins(tt))
    assert r.returncode == 0, r.stderr
    keys = {bits: ck.new_rsa(bits) for bits in (2048, 3072, 4096)}
    return {"tt": tt, "root": root, "kcv": ck.printed_check_value(r.stdout), "rsa": keys}


# (provider, algorithm, import key bits, key file form, OAEP hash, RSA-AES)
CASES = [
    ("aws", "RSAES_OAEP_SHA_1", 2048, "b64der", "sha1", False),
    ("aws", "RSA_AES_KEY_WRAP_SHA_1", 4096, "b64der", "sha1", True),
    ("gcp-csek", "RSA_OAEP_SHA1", 2048, "cert", "sha1", False),
    ("gcp-kms", "RSA_OAEP_3072_SHA1_AES_256", 3072, "pem", "sha1", True),
    ("gcp-kms", "RSA_OAEP_4096_SHA1_AES_256", 4096, "pem", "sha1", True),
    ("azure", "CKM_RSA_AES_KEY_WRAP", 4096, "pem", "sha1", True),
    ("alibaba", "RSAES_OAEP_SHA_1", 2048, "b64der", "sha1", False),
]


@pytest.mark.parametrize("provider,algorithm,bits,form,hash_name,rsa_aes", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_export_unwraps_at_the_provider_to_the_key_with_its_check_value(
        cloud, provider, algorithm, bits, form, hash_name, rsa_aes):
    tt, root, priv = cloud["tt"], cloud["root"], cloud["rsa"][bits]
    key_file = ck.write_key(priv, root / f"{provider}-{algorithm}.key", form)
    r = ck.trust(tt, provider, key_file, priv, words=provider in ("azure", "gcp-csek"))
    assert r.returncode == 0, r.stderr
    assert "CKA_TRUSTED" in r.stdout
    extra = ["--algorithm", algorithm]
    if provider in ("aws", "alibaba"):
        (root / f"{algorithm}.token").write_bytes(b"opaque-import-token-" + os.urandom(8))
        extra += ["--import-token", str(root / f"{algorithm}.token")]
    if provider == "azure":
        extra += ["--kid", KID]
    out = root / f"out-{provider}-{algorithm}"
    r = ck.export(tt, "ck", provider, key_file, out, *extra)
    assert r.returncode == 0, r.stderr
    assert_no_secrets(r, tt.user_pin.reveal(), tt.so_pin.reveal())
    manifest = json.loads((out / "export.json").read_text())
    assert {k: manifest[k] for k in ("provider", "algorithm", "key")} == {
        "provider": provider, "algorithm": algorithm, "key": "ck"}
    assert manifest["wrapped_file"] in manifest["files"]
    assert all((out / f).is_file() for f in manifest["files"])
    printed = ck.printed_check_value(r.stdout)
    assert printed == manifest["check_value"] == cloud["kcv"]

    wrapped = ck.provider_payload(provider, out)
    if rsa_aes:
        assert len(wrapped) == bits // 8 + 40  # OAEP(AES-256) || KWP(AES-256)
    key = ck.provider_unwrap(priv, wrapped, hash_name, rsa_aes)
    assert len(key) == 32
    assert ck.kcv(key) == printed

    assert re.search(r"^next: ", r.stdout, re.M)
    if provider == "aws":
        assert (out / "ImportToken.bin").read_bytes() == (root / f"{algorithm}.token").read_bytes()
        assert "aws kms import-key-material" in r.stdout and "--expiration-model" in r.stdout
    if provider == "azure":
        ck.check_byok_schema(json.loads((out / "ck.byok").read_text()), KID)
        assert "--byok-file" in r.stdout
    if rsa_aes:  # SoftHSM2 2.6.1 has no CKM_RSA_AES_KEY_WRAP: the SO-trusted ephemeral route
        assert "composed" in manifest["wrap"]


def test_audit_recognises_the_cloud_key_and_the_import_keys(cloud):
    tt = cloud["tt"]
    r = run_hsm(tt, "audit", "--token", tt.label, "--json", env=ck.pins(tt))
    rows = {o["label"]: o for o in json.loads(r.stdout)["objects"]}
    assert rows["ck"]["role"] == "cloud key" and rows["ck"]["deviations"] == []
    imports = [o for o in rows.values() if o["label"].startswith("cloud-import-")]
    assert imports and all(o["role"] == "cloud import key" and not o["deviations"]
                           for o in imports)


# ------------------------------------------------------------------------------ refusals
def _no_outputs(out) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_export_to_an_import_key_nobody_trusted_is_refused(cloud):
    tt, root = cloud["tt"], cloud["root"]
    priv = cloud["rsa"][2048]
    key_file = ck.write_key(priv, root / "untrusted.pem")
    out = root / "out-untrusted"
    line = assert_one_line_error(ck.export(tt, "ck", "azure", key_file, out, "--kid", KID))
    assert "is not trusted" in line and "hsm cloud-key trust" in line
    assert _no_outputs(out)


@pytest.mark.parametrize("fingerprint", [None, "wrong"], ids=["unconfirmed", "wrong"])
def test_trust_without_the_right_fingerprint_trusts_nothing(cloud, fingerprint):
    tt, root = cloud["tt"], cloud["root"]
    priv, other = ck.new_rsa(2048), cloud["rsa"][3072]
    key_file = ck.write_key(priv, root / f"unconfirmed-{fingerprint}.pem")
    args = ["cloud-key", "trust", "--token", tt.label, "--provider", "aws",
            "--wrapping-key", str(key_file)]
    if fingerprint:
        args += ["--fingerprint", ck.fingerprint(other)]
    line = assert_one_line_error(run_hsm(tt, *args, env=ck.pins(tt)))
    assert ("no fingerprint confirmation" if fingerprint is None else "does not match") in line
    (root / "t.token").write_bytes(b"t")
    out = root / f"out-unconfirmed-{fingerprint}"
    line = assert_one_line_error(ck.export(tt, "ck", "aws", key_file, out, "--import-token",
                                           str(root / "t.token"),
                                           "--algorithm", "RSAES_OAEP_SHA_1"))
    assert "is not trusted" in line and _no_outputs(out)


@pytest.mark.parametrize("kind", ["rsa-1024", "ec-p256"])
def test_trust_refuses_weak_or_non_rsa_keys(cloud, kind):
    tt, root = cloud["tt"], cloud["root"]
    priv = ck.new_rsa(1024) if kind == "rsa-1024" else ec.generate_private_key(ec.SECP256R1())
    key_file = ck.write_key(priv, root / f"{kind}.pem")
    line = assert_one_line_error(ck.trust(tt, "azure", key_file, priv))
    assert ("RSA-1024 is too weak" if kind == "rsa-1024" else "must be RSA, got ec") in line


def test_unknown_algorithm_is_refused(cloud):
    tt, root = cloud["tt"], cloud["root"]
    key_file = ck.write_key(cloud["rsa"][4096], root / "unknown.pem")
    line = assert_one_line_error(ck.export(tt, "ck", "azure", key_file, root / "out-unknown",
                                           "--kid", KID, "--algorithm", "RSAES_PKCS1_V1_5"))
    assert "unknown azure algorithm 'RSAES_PKCS1_V1_5'" in line and "CKM_RSA_AES_KEY_WRAP" in line


@pytest.mark.parametrize("provider,algorithm,bits,works", [
    ("aws", "RSAES_OAEP_SHA_256", 2048, "RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_1"),
    ("aws", "RSA_AES_KEY_WRAP_SHA_256", 2048, "RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_1"),
    ("gcp-kms", "RSA_OAEP_3072_SHA256_AES_256", 3072,
     "RSA_OAEP_3072_SHA1_AES_256, RSA_OAEP_4096_SHA1_AES_256"),
    ("gcp-kms", "RSA_OAEP_4096_SHA256", 4096,
     "RSA_OAEP_3072_SHA1_AES_256, RSA_OAEP_4096_SHA1_AES_256"),
    ("alibaba", "RSAES_OAEP_SHA_256", 2048, "RSAES_OAEP_SHA_1"),
])
def test_sha256_algorithms_are_refused_on_softhsm_naming_its_limit_and_what_works(
        cloud, provider, algorithm, bits, works):
    tt, root = cloud["tt"], cloud["root"]
    key_file = ck.write_key(cloud["rsa"][bits], root / f"sha256-{algorithm}.pem")
    (root / "s.token").write_bytes(b"t")
    extra = ["--import-token", str(root / "s.token")] if provider != "gcp-kms" else []
    out = root / f"out-sha256-{algorithm}"
    line = assert_one_line_error(ck.export(tt, "ck", provider, key_file, out, "--algorithm",
                                           algorithm, *extra))
    assert "needs RSA-OAEP with SHA-256" in line and "RSA-OAEP with SHA-1 only" in line
    assert f"algorithms that work on this token: {works}" in line
    assert _no_outputs(out)


def test_an_existing_output_file_stops_the_export_before_anything_is_wrapped(cloud):
    tt, root = cloud["tt"], cloud["root"]
    priv = cloud["rsa"][2048]
    key_file = ck.write_key(priv, root / "exists.pem", "cert")
    assert ck.trust(tt, "gcp-csek", key_file, priv).returncode == 0
    out = root / "out-exists"
    out.mkdir()
    (out / "export.json").write_text("mine\n")
    line = assert_one_line_error(ck.export(tt, "ck", "gcp-csek", key_file, out))
    assert "already exists" in line and "nothing was wrapped" in line
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]
    assert (out / "export.json").read_text() == "mine\n"


def test_release_secrets_and_other_keys_are_never_exported(cloud):
    """A release secret has the same attributes as a cloud key but another mechanism list and
    id: the command refuses it (and the token would too, test_adversary). A key the user made
    with CKA_ID but not the policy, and a private key, are refused as well."""
    tt, root = cloud["tt"], cloud["root"]
    priv = cloud["rsa"][4096]
    key_file = ck.write_key(priv, root / "release.pem")
    assert ck.trust(tt, "azure", key_file, priv).returncode in (0,)
    with Token.open(tt.label, pin=tt.user_pin) as tok:
        hsm_export.ensure_secret(tok, "aes", "rel-9-twk", os.urandom(16))
        tok.run_on_anchor("gen", lambda lease: lease.session.generate_key(
            hsm_export.KeyType.AES, 256, label="plain-aes", store=True, template={
                hsm_export.Attribute.ID: b"hsm-cloud:plain", hsm_export.Attribute.SENSITIVE: True,
                hsm_export.Attribute.EXTRACTABLE: True}))
    for key, why in (("rel-9-twk", "was not made by `hsm cloud-key create`"),
                     ("plain-aes", "was not made by `hsm cloud-key create`"),
                     (f"{tt.label}-nope", "no secret key labelled")):
        out = root / f"out-refused-{key}"
        line = assert_one_line_error(ck.export(tt, key, "azure", key_file, out, "--kid", KID))
        assert why in line, line
        assert _no_outputs(out)


def test_create_twice_reports_the_key_and_refuses_a_label_in_use_by_another_object(cloud):
    tt = cloud["tt"]
    r = run_hsm(tt, "cloud-key", "create", "--token", tt.label, "--label", "ck",
                env=ck.pins(tt))
    assert r.returncode == 0, r.stderr
    assert "'ck' exists" in r.stdout and ck.printed_check_value(r.stdout) == cloud["kcv"]
    line = assert_one_line_error(run_hsm(tt, "cloud-key", "create", "--token", tt.label,
                                         "--label", "ck", "--bits", "128", env=ck.pins(tt)))
    assert "is not an AES-128 cloud key" in line
    with Token.open(tt.label, pin=tt.user_pin) as tok:
        hsm_export.ensure_secret(tok, "aes", "rel-8-twk", os.urandom(16))
    line = assert_one_line_error(run_hsm(tt, "cloud-key", "create", "--token", tt.label,
                                         "--label", "rel-8-twk", env=ck.pins(tt)))
    assert "exists and is not an AES-256 cloud key" in line


def test_a_key_of_the_wrong_size_for_the_provider_is_refused(cloud):
    tt = cloud["tt"]
    r = run_hsm(tt, "cloud-key", "create", "--token", tt.label, "--label", "ck128",
                "--bits", "128", env=ck.pins(tt))
    assert r.returncode == 0, r.stderr
    key_file = ck.write_key(cloud["rsa"][2048], cloud["root"] / "size.pem", "cert")
    ck.trust(tt, "gcp-csek", key_file, cloud["rsa"][2048])
    line = assert_one_line_error(ck.export(tt, "ck128", "gcp-csek", key_file,
                                           cloud["root"] / "out-size"))
    assert "imports 256-bit AES keys, this key has 128 bits" in line


def test_an_output_directory_that_cannot_be_written_leaves_nothing(cloud):
    """Read-only: refused before the token wraps anything. Full: the wrap happened, but no
    file and no empty directory is left (all of the provider's files and export.json, or none)."""
    from tests.helpers import small_filesystem
    tt, root = cloud["tt"], cloud["root"]
    priv = cloud["rsa"][2048]
    key_file = ck.write_key(priv, root / "unwritable.pem", "cert")
    assert ck.trust(tt, "gcp-csek", key_file, priv).returncode == 0
    with small_filesystem(root / "ro", read_only=True) as ro:
        r = ck.export(tt, "ck", "gcp-csek", key_file, ro / "out")
        line = assert_one_line_error(r)
        assert r.returncode == 2 and "Read-only file system" in line, line
        assert "nothing was made" in line
    with small_filesystem(root / "full") as full:
        r = ck.export(tt, "ck", "gcp-csek", key_file, full / "out")
        line = assert_one_line_error(r)
        assert r.returncode == 2 and "No space left on device" in line, line
        assert sorted(p.name for p in full.iterdir()) == [".filler"]
