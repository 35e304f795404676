"""End-to-end release-secrets ceremony on real SoftHSM2 tokens (one primary, three regions)."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import cmac, hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms

from ceremony import plan as plans
from ceremony import runner
from hsm.keys import export, provision
from release import bundle as bundles
from release import certificates
from tests.ceremony_kit import kit_fixture
from tests.helpers import assert_secrets_absent, secret_forms

kit = kit_fixture("ceremony")


def test_full_ceremony_closes_verifies_offline_and_openssl_accepts_bundles(kit):
    plan_path = kit.write_plan()
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    out = plans.load(plan_path).output_dir
    # Not yet countersigned: the readers refuse the release, naming the missing officers.
    proc = kit.cli("verify", out, "--cert", kit.primary_cert, "--officers", kit.pins_file())
    assert proc.returncode == 2 and "no officer signatures" in proc.stderr, proc.stderr
    kit.countersign(out)
    proc = kit.cli("verify", out, "--cert", kit.primary_cert, "--officers", kit.pins_file())
    assert proc.returncode == 0, proc.stderr
    assert "4 bundles verified" in proc.stdout and "countersigned by alice, bob" in proc.stdout
    for bundle in sorted(out.glob("bundle-*.p7")):
        v = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                            str(bundle), "-CAfile", str(kit.anchors(bundle)), "-purpose", "any",
                            "-out", "/dev/null"], capture_output=True, text=True)
        assert v.returncode == 0, (bundle, v.stderr)


def _enrollment_plan(kit, request: Path, fingerprint: str, name: str) -> Path:
    text = kit.plan_text(ceremony_id=name, regions=[])
    head = text.split("[[secrets]]")[0]
    head = head.replace('type = "release-secrets"', 'type = "regional-enrollment"')
    head = "\n".join(line for line in head.splitlines() if not line.startswith("release = "))
    head += f'\n[enrollment]\nrequest = "{request}"\nfingerprint = "{fingerprint}"\n'
    return kit.write_plan(head)


def test_regional_enrollment_ceremony_certifies_and_is_recorded(kit, softhsm_session_token_factory):
    new = softhsm_session_token_factory(prefix="regional-sa")
    req = provision.init_regional(new.token, "sa", kit.pki)
    plan_path = _enrollment_plan(kit, req.request, req.fingerprint.hex(), "enroll-sa-ok")
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    cert = kit.pki / f"{new.label}.pem"
    root = kit.pki / f"{kit.primary.label}-signing.pem"
    v = subprocess.run(["openssl", "verify", "-CAfile", str(root), str(cert)],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    out = plans.load(plan_path).output_dir
    steps = [json.loads(line)["step"] for line in (out / "transcript.jsonl").read_text().splitlines()]
    assert steps == ["open", "approvals", "certify-regional", "close"]
    assert kit.cli("verify", out, "--cert", root, "--officers", kit.pins_file()).returncode == 0


def test_enrollment_with_a_wrong_pinned_fingerprint_issues_nothing(kit,
                                                                 softhsm_session_token_factory):
    new = softhsm_session_token_factory(prefix="regional-af")
    req = provision.init_regional(new.token, "af", kit.pki)
    wrong = bytes(32).hex()
    plan_path = _enrollment_plan(kit, req.request, wrong, "enroll-af-bad")
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode != 0 and "does not match" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (kit.pki / f"{new.label}.pem").exists()


def _host_recipient(kit, region: str):
    """A recipient whose private key the test holds: an RSA-4096 key made on the host, certified
    by the kit's (throw-away) primary through the ordinary request route. The ceremony wraps the
    release secrets to it as to any certified region, so the test can learn their bytes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(spki).digest()
    label = f"host-recipient-{region}"
    request = kit.root / f"{label}.request.json"
    request.write_text(json.dumps({
        "version": provision.REQUEST_VERSION, "kind": "regional-encryption-certification-request",
        "region": region, "token_label": label, "token_serial": "0",
        "key_label": f"{label}-encryption", "key_id": digest[:8].hex(), "spki_der_hex": spki.hex(),
        "fingerprint_sha256": digest.hex(), "created": "2030-01-01T00:00:00+00:00"}))
    try:
        cert = provision.certify_regional(kit.primary.token, request, kit.pki,
                                          confirmed_fingerprint=digest).certificate
    finally:
        kit.primary.close()  # the ceremony subprocess needs the primary free of our login
    return key, cert, digest.hex()


def _unwrap_on_host(key, entry: dict) -> bytes:
    """The secret in a bundle entry, RSA-OAEP-decrypted with the host key; its check value must
    be the one the ceremony computed inside the primary HSM (so these are the real bytes)."""
    assert entry["wrap"]["mechanism"] == "RSA_PKCS_OAEP" and entry["wrap"]["label"] == ""
    h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}[entry["wrap"]["hash"]]
    secret = key.decrypt(bytes.fromhex(entry["wrapped"]),
                         padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))
    assert len(secret) * 8 == entry["bits"]
    if entry["key_type"] == "generic-secret":
        kcv = ("hmac-sha256-8", hmac.new(secret, export.KCV_LABEL, hashlib.sha256).digest()[:8])
    else:
        mac = cmac.CMAC(algorithms.AES(secret))
        mac.update(export.KCV_LABEL)
        kcv = ("aes-cmac-8", mac.finalize()[:8])
    assert (kcv[0], kcv[1].hex()) == (entry["check_value"]["method"],
                                      entry["check_value"]["value"]), entry["name"]
    return secret


def test_no_pin_or_secret_material_in_any_output_file(kit):
    """C13 on a real run: neither the PINs nor the release secrets themselves (learnt through a
    host-held recipient key, confirmed by their check values) are in any file the ceremony
    wrote or in its output, raw, hex or base64."""
    host_key, host_cert, host_fp = _host_recipient(kit, "hostkey")
    plan_path = kit.write_plan(regions=[*sorted(kit.regionals), "hostkey"],
                               certificates={"hostkey": str(host_cert)},
                               fingerprints={"hostkey": host_fp})
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    p = plans.load(plan_path)
    out = p.output_dir
    manifest = bundles.verify((out / runner.bundle_name(p, "hostkey")).read_bytes(),
                              certificates.as_asn1(certificates.load(
                                  kit.pki / f"{kit.primary.label}-signing.pem",
                                  "primary signing"))).manifest
    secrets = [_unwrap_on_host(host_key, entry) for entry in manifest["secrets"]]
    assert [e["name"] for e in manifest["secrets"]] == [s.name for s in p.secrets]
    assert len(set(secrets)) == len(p.secrets) == 2
    pins = [kit.primary.user_pin.reveal().encode(), kit.primary.so_pin.reveal().encode()]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {f"bundle-{p.release}-{r}.p7" for r in [*kit.regionals, "escrow", "hostkey"]} <= \
        {f.name for f in files} and (out / "transcript.jsonl") in files
    assert assert_secrets_absent(secrets + pins, files) == len(files)
    for stream in (proc.stdout, proc.stderr):
        for value in secrets + pins:
            assert not any(form.decode("latin-1") in stream for form in secret_forms(value))


def test_rehearsal_runs_the_plan_on_throwaway_tokens_stamped_practice(kit, tmp_path):
    plan_path = kit.write_plan(regions=["eu"])
    # As after `. var/demo-pins.env`: per-token PIN variables of *other* tokens labelled
    # "primary" must not override the throw-away tokens' PINs. TMPDIR: to see what is left.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**{k: v for k, v in kit.environ().items()
              if k not in ("SOFTHSM2_CONF", "HSM_PIN", "HSM_SO_PIN")},
           "HSM_PIN_PRIMARY": "not-this-one", "HSM_SO_PIN_PRIMARY": "nor-this-one",
           "TMPDIR": str(scratch)}
    proc = kit.cli("rehearse", plan_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert list(scratch.iterdir()) == []  # no /tmp/rehearsal-... left behind
    assert "REHEARSAL OK (PRACTICE)" in proc.stdout
    out = Path(proc.stdout.strip().split(" in ")[-1])
    assert "PRACTICE" in out.name
    bundles = sorted(p.name for p in out.glob("bundle-*.p7"))
    assert bundles and all(name.endswith("-PRACTICE.p7") for name in bundles)
    # The real output directory is untouched, and the rehearsal verifies with its own root.
    assert not plans.load(plan_path).output_dir.exists()
    check = kit.cli("verify", out, "--cert", out / "PRACTICE-primary-signing.pem",
                    "--officers", out / "PRACTICE-officers.toml")
    assert check.returncode == 0 and "(PRACTICE)" in check.stdout


def test_rehearsal_dry_run_touches_nothing(kit):
    plan_path = kit.write_plan()
    proc = kit.cli("rehearse", plan_path, "--dry-run")
    assert proc.returncode == 0 and "touch" in proc.stdout and "export:eu" in proc.stdout
    assert not plans.load(plan_path).output_dir.exists()
    out = plans.load(plan_path).output_dir
    assert not list(out.parent.glob(f"{out.name}-PRACTICE-*"))


def test_confirm_words_stops_when_the_typed_words_differ(kit):
    from suite import fingerprint as fp
    plan_path = kit.write_plan(regions=["eu"])
    kit.open_and_approve(plan_path)
    wrong = " ".join(fp.to_words(bytes(32)))
    proc = kit.cli("run", plan_path, "--env", kit.env_file(), "--confirm-words",
                   input=wrong + "\n")
    assert proc.returncode == 2 and "do not match the plan's pinned fingerprint" in proc.stderr
    out = plans.load(plan_path).output_dir
    assert not list(out.glob("bundle-*"))
    right = " ".join(fp.to_words(bytes.fromhex(kit.fingerprints["eu"])))
    proc = kit.cli("run", plan_path, "--env", kit.env_file(), "--confirm-words",
                   input=right + "\n")
    assert proc.returncode == 0, proc.stderr


def test_escrow_must_go_to_this_primarys_own_encryption_key(kit):
    """The escrow recipient is not pinned in the plan: a certificate path pointing at another
    certified key (here a regional one) must not receive every secret."""
    text = kit.plan_text(regions=["eu"])
    regional = str(kit.pki / f"{kit.regionals['us'].label}.pem")
    text = text.replace(str(kit.pki / f"{kit.primary.label}-encryption.pem"), regional)
    plan_path = kit.write_plan(text)
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 2 and "escrow bundle would go to another key" in proc.stderr
    assert not list(plans.load(plan_path).output_dir.glob("bundle-*"))


def test_a_later_run_with_the_same_ceremony_id_never_adopts_earlier_secrets(kit):
    """Secrets are tied to a run (its nonce), not to a reusable ceremony id: a production run
    after a practice run of the same id and release generates its own secrets."""
    release = kit.next_release()  # not a fixed id: other tests' releases must stay orderable
    practice = kit.write_plan(kit.plan_text(ceremony_id="same-id", release=release,
                                            regions=["eu"], practice=True,
                                            output_dir="out-same-practice"))
    kit.open_and_approve(practice)
    assert kit.cli("run", practice, "--env", kit.env_file()).returncode == 0
    production = kit.write_plan(kit.plan_text(ceremony_id="same-id", release=release,
                                              regions=["eu"], output_dir="out-same-prod"))
    kit.open_and_approve(production)
    proc = kit.cli("run", production, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr

    def journal(plan_path):
        out = plans.load(plan_path).output_dir
        return [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    made = [r["data"] for r in journal(production) if r["step"].startswith("generate:")]
    assert [m["status"] for m in made] == ["created", "created"]
    assert all(m["label"].startswith(f"rel-{release}-") for m in made)
    kcv = {r["step"]: r["data"] for r in journal(production) if r["step"] == "check-values"}
    practice_kcv = {r["step"]: r["data"] for r in journal(practice) if r["step"] == "check-values"}
    assert kcv != practice_kcv  # other secrets than the practice run's


def test_a_region_cannot_be_called_escrow(kit):
    text = kit.plan_text(regions=["eu"]).replace('name = "eu"', 'name = "escrow"')
    with pytest.raises(plans.PlanError, match="reserved for the escrow bundle"):
        plans.load(kit.write_plan(text))


def test_an_interrupted_rehearsal_leaves_no_practice_directory_and_no_tokens(kit, tmp_path):
    """SIGINT in the middle: one line, exit 130, and neither release-N-PRACTICE-... nor the
    throw-away tokens' /tmp/rehearsal-... stays behind."""
    import signal
    import subprocess
    import sys

    plan_path = kit.write_plan(regions=["eu"])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**{k: v for k, v in kit.environ().items() if k != "SOFTHSM2_CONF"},
           "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "ceremony", "rehearse", str(plan_path)],
                            cwd=kit.root, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("rehearsal tokens in ")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.strip() == "ceremony: interrupted", err
    out = plans.load(plan_path).output_dir
    assert list(scratch.iterdir()) == []
    assert not list(out.parent.glob(f"{out.name}-PRACTICE-*"))
