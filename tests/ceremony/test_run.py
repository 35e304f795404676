"""The release-secrets ceremony, run as `python -m ceremony` subprocesses on real SoftHSM2 tokens.

One kit per module (a provisioned primary and three certified regional tokens: RSA-4096 keygen is
slow); each test runs its own ceremony with a fresh id, output directory and release id.

Release ids come from one increasing counter (``_release``): a closed ceremony records its release
in the primary, and a later ceremony with a smaller id is refused, so every test asks the counter
whatever order the tests run in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import os
from pathlib import Path

import pytest
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from ceremony import plan as plans
from ceremony import runner
from ceremony.transcript import FILE as TRANSCRIPT
from ceremony.transcript import Transcript
from ceremony.transcript import load as load_transcript
from ceremony.verify import verify_directory
from hsm.core import ops
from hsm.core.errors import HsmError
from hsm.core.token import Token
from hsm.keys import export
from hsm.keys import x509 as hx509
from release import bundle as bundles
from release import certificates
from release.certificates import as_asn1
from release.certificates import load as load_cert
from tests.ceremony_kit import kit_fixture

# Step 2 so that `hi - 1` is never a release another test used: 5000, 5002, 5004, ...
_release = itertools.count(5000, 2)
_label = itertools.count()

KEY_TYPES = {"generic-secret": KeyType.GENERIC_SECRET, "aes": KeyType.AES}
CAPABILITY = {"generic-secret": MechanismFlag.SIGN, "aes": MechanismFlag.ENCRYPT}


kit = kit_fixture("ceremony-run")


# ------------------------------------------------------------------------------------ helpers
def next_release() -> str:
    return str(next(_release))


def new_plan(kit, **kwargs) -> Path:
    kwargs.setdefault("release", next_release())
    return kit.write_plan(**kwargs)


def run(kit, plan_path: Path, *, officers=("alice", "bob"), env_file: Path | None = None,
        environ: dict | None = None):
    kit.open_and_approve(plan_path, officers)
    return kit.cli("run", plan_path, "--env", env_file or kit.env_file(), env=environ)


def run_ok(kit, **kwargs) -> plans.Plan:
    plan_path = new_plan(kit, **kwargs)
    proc = run(kit, plan_path)
    assert proc.returncode == 0, proc.stderr
    return plans.load(plan_path)


def open_primary(kit) -> Token:
    # After the subprocesses finished; the caller closes it (one Token per token per process).
    return Token.open(kit.primary.label, pin=kit.primary.user_pin)


def signing_pem(kit) -> Path:
    return kit.pki / f"{kit.primary.label}-signing.pem"


def primary_cert(kit):
    return as_asn1(load_cert(signing_pem(kit), "primary signing"))


def records(out: Path) -> list[dict]:
    return load_transcript(out / TRANSCRIPT)


def assert_refused(proc, plan_path: Path, *needles: str) -> str:
    """The ceremony stopped cleanly before any bundle was written; return its stderr line."""
    out = plans.load(plan_path).output_dir
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert err.startswith("ceremony: error: "), err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not list(out.glob("bundle-*")), sorted(p.name for p in out.iterdir())
    steps = [r["step"] for r in records(out)]
    assert steps[0] == "open", steps
    assert not any(s.startswith(("generate:", "export:")) or s == "close" for s in steps), steps
    return err


def secret_objects(token: Token, prefix: str) -> dict[str, list[dict]]:
    """Every secret-key object whose label starts with ``prefix``: label -> attribute dicts."""
    attrs = [Attribute.WRAP_WITH_TRUSTED, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
             Attribute.TOKEN, Attribute.ID]

    def read(lease):
        found: dict[str, list[dict]] = {}
        for obj in lease.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = obj[Attribute.LABEL]
            if label.startswith(prefix):
                found.setdefault(label, []).append(obj.get_attributes(attrs))
        return found
    return token.run("C_FindObjects", read)


def kcv_in_token(token: Token, key_type: str, label: str) -> bytes:
    """The key check value recomputed independently of hsm.keys.export (same definition)."""
    ref = ops.secret(label)
    if key_type == "generic-secret":
        return ops.hmac_sha256(token, ref, export.KCV_LABEL)[:8]
    return token.run("C_Sign(AES_CMAC)", lambda lease: lease.key(ref).sign(
        export.KCV_LABEL, mechanism=Mechanism.AES_CMAC), label)[:8]


def unwrap_entry(token: Token, key_label: str, entry: dict, label: str, *, escrow=False):
    """Unwrap the way the key's CKA_UNWRAP_TEMPLATE allows (the only way the token accepts)."""
    return ops.unwrap_release_secret(
        token, ops.private(key_label),
        ops.Wrapped(bytes.fromhex(entry["wrapped"]), entry["wrap"]["mechanism"],
                    {"hash": entry["wrap"]["hash"]}),
        kind=entry["key_type"], usage="sign" if entry["key_type"] == "generic-secret"
        else "encrypt-decrypt", label=label, escrow=escrow)


def destroy_session_objects(token: Token, labels: list[str]) -> None:
    def destroy(lease):
        for label in labels:
            for obj in list(lease.session.get_objects({Attribute.LABEL: label})):
                obj.destroy()
    token.run_on_anchor("C_DestroyObject", destroy)


def trusted_flags(token: Token, label: str) -> list[bool]:
    return token.run("C_FindObjects", lambda lease: [
        o[Attribute.TRUSTED] for o in lease.session.get_objects({Attribute.LABEL: label})])


def count_labelled(token: Token, label: str) -> int:
    return token.run("C_FindObjects", lambda lease: len(list(
        lease.session.get_objects({Attribute.LABEL: label}))))


# ------------------------------------------------------------------------------------ happy path
def test_full_ceremony_journals_every_step_and_leaves_policy_conforming_secrets(kit):
    p = run_ok(kit)
    out = p.output_dir
    assert [r["step"] for r in records(out)] == runner.steps(p)
    assert sorted(x.name for x in out.glob("bundle-*")) == sorted(
        runner.bundle_name(p, r) for r in [*kit.regionals, "escrow"])
    rec = {r["step"]: r["data"] for r in records(out)}
    for s in p.secrets:
        gen = rec[f"generate:{s.name}"]
        assert gen["attributes_read_back"]["WRAP_WITH_TRUSTED"] is True
        assert gen["attributes_read_back"]["MODIFIABLE"] is False
        assert "CKA_ALLOWED_MECHANISMS=" in gen["template"]
        nonce = bytes.fromhex(Transcript(p.output_dir).find("open")["data"]["nonce"])
        assert gen["id"] == runner.secret_id(p, s.name, nonce).hex()
    # After the bundles were verified, the primary keeps no copy: the escrow bundle is the backup.
    assert rec["destroy-secrets"]["secrets"] == {s.name: "destroyed" for s in p.secrets}
    assert rec["destroy-secrets"]["backup"] == runner.bundle_name(p, "escrow")
    token = open_primary(kit)
    try:
        assert secret_objects(token, f"rel-{p.release}-") == {}
        assert p.release in export.read_states(token)
    finally:
        token.close()


def test_regional_tokens_unwrap_their_bundle_and_reproduce_the_check_values(kit):
    p = run_ok(kit)
    cert = primary_cert(kit)
    manifests = {}
    for region in [*kit.regionals, "escrow"]:
        path = p.output_dir / runner.bundle_name(p, region)
        manifests[region] = bundles.verify(path.read_bytes(), cert).manifest
        assert manifests[region]["region"] == region
        assert manifests[region]["release"] == p.release
        assert [e["name"] for e in manifests[region]["secrets"]] == [s.name for s in p.secrets]

    # The same secret reaches every region: the check values agree across bundles.
    for name in (s.name for s in p.secrets):
        values = {m_region: next(e["check_value"] for e in m["secrets"] if e["name"] == name)
                  ["value"] for m_region, m in manifests.items()}
        assert len(set(values.values())) == 1, values

    for region, tt in kit.regionals.items():
        token = tt.token
        made = []
        try:
            for entry in manifests[region]["secrets"]:
                label = f"rx-{region}-{entry['name']}-{next(_label)}"
                unwrap_entry(token, f"{tt.label}-encryption", entry, label)
                made.append(label)
                got = kcv_in_token(token, entry["key_type"], label)
                assert got.hex() == entry["check_value"]["value"], (region, entry["name"])
                assert entry["check_value"]["method"] == (
                    "hmac-sha256-8" if entry["key_type"] == "generic-secret"
                    else "aes-cmac-8")
        finally:
            destroy_session_objects(token, made)

    # A bundle for eu does not open with us's key, nor us's with eu's.
    for src, dst in (("eu", "us"), ("us", "eu")):
        tt = kit.regionals[dst]
        for entry in manifests[src]["secrets"]:
            label = f"cross-{src}-{dst}-{next(_label)}"
            with pytest.raises(HsmError) as info:
                unwrap_entry(tt.token, f"{tt.label}-encryption", entry, label)
            assert "C_UnwrapKey" in str(info.value)
            assert count_labelled(tt.token, label) == 0

    # The escrow bundle opens with the primary's own encryption key, to the same values.
    token = open_primary(kit)
    made = []
    try:
        for entry in manifests["escrow"]["secrets"]:
            label = f"rx-escrow-{entry['name']}-{next(_label)}"
            unwrap_entry(token, f"{kit.primary.label}-encryption", entry, label, escrow=True)
            made.append(label)
            assert kcv_in_token(token, entry["key_type"], label).hex() == \
                entry["check_value"]["value"]
    finally:
        destroy_session_objects(token, made)
        token.close()


def test_token_refuses_to_wrap_a_release_secret_with_a_key_the_so_did_not_trust(kit):
    run_ok(kit)  # the trusted recipient keys exist; the ceremony destroyed its own secrets
    seed = f"rel-test-{next(_label)}-seed"
    eu = kit.regionals["eu"]
    spki = hx509.public_key_info(eu.token, ops.public(f"{eu.label}-encryption"))
    rsa_pub = spki["public_key"].parsed
    modulus = rsa_pub["modulus"].native
    label = f"untrusted-{next(_label)}"
    template = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: False, Attribute.LABEL: label, Attribute.WRAP: True,
        Attribute.ENCRYPT: True,
        Attribute.MODULUS: modulus.to_bytes((modulus.bit_length() + 7) // 8, "big"),
        Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
    }
    token = open_primary(kit)
    export.ensure_secret(token, "generic-secret", seed, os.urandom(16))  # the release policy
    try:
        # The very same regional public key, but created by the user: not CKA_TRUSTED.
        token.run_on_anchor("C_CreateObject", lambda lease: lease.session.create_object(template))
        with pytest.raises(HsmError) as info:
            ops.rsa_oaep_wrap(token, ops.public(label), ops.secret(seed))
        assert info.value.ckr == "CKR_KEY_NOT_WRAPPABLE", str(info.value)
        assert "CKR_KEY_NOT_WRAPPABLE" in str(info.value)

        # The user cannot make a trusted key either, nor lift the secret's trusted-only flag.
        with pytest.raises(HsmError) as info:
            token.run_on_anchor("C_CreateObject", lambda lease: lease.session.create_object(
                {**template, Attribute.LABEL: label + "-t", Attribute.TRUSTED: True}))
        assert info.value.ckr == "CKR_ATTRIBUTE_READ_ONLY", str(info.value)
        # SoftHSM2 2.6.1 leaves the failed session object behind, but never as a trusted key.
        assert trusted_flags(token, label + "-t") in ([], [False])
        with pytest.raises(HsmError) as info:
            token.run("C_SetAttributeValue", lambda lease: lease.key(ops.secret(seed)).__setitem__(
                Attribute.WRAP_WITH_TRUSTED, False))
        # The secret is non-modifiable: the token refuses any attribute change outright.
        assert info.value.ckr == "CKR_ACTION_PROHIBITED", str(info.value)
        assert secret_objects(token, seed)[seed][0][Attribute.WRAP_WITH_TRUSTED] is True

        # Control: the SO-trusted key of the same region does wrap it.
        wrapped = ops.rsa_oaep_wrap(token, ops.public(runner.recipient_label("eu")),
                                    ops.secret(seed))
        assert len(wrapped.data) == 512
    finally:
        destroy_session_objects(token, [label, label + "-t", seed])
        token.close()


def test_practice_run_is_stamped_and_records_nothing(kit):
    token = open_primary(kit)
    try:
        before = export.read_states(token)
    finally:
        token.close()
    p = run_ok(kit, practice=True)
    names = sorted(x.name for x in p.output_dir.glob("bundle-*"))
    assert names == sorted(f"bundle-{p.release}-{r}-PRACTICE.p7"
                           for r in [*kit.regionals, "escrow"])
    cert = primary_cert(kit)
    for name in names:
        m = bundles.verify((p.output_dir / name).read_bytes(), cert).manifest
        assert m["practice"] is True
    rec = {r["step"]: r for r in records(p.output_dir)}
    assert rec["open"]["data"]["practice"] is True
    assert rec["record-release"]["data"]["status"] == "skipped (practice)"
    kit.countersign(p.output_dir)
    assert verify_directory(p.output_dir, signing_pem(kit), kit.pins())["practice"] is True
    token = open_primary(kit)
    try:
        after = export.read_states(token)
    finally:
        token.close()
    assert p.release not in after
    assert after == before


# ------------------------------------------------------------------------------------ refusals
def test_pinned_fingerprint_mismatch_stops_the_ceremony(kit):
    good = kit.fingerprints["us"]
    bad = ("1" if good[0] != "1" else "2") + good[1:]
    plan_path = new_plan(kit, fingerprints={"us": bad})
    err = assert_refused(run(kit, plan_path), plan_path, "(us)", "fingerprint mismatch")
    squashed = err.replace(" ", "").lower()
    assert bad in squashed and good in squashed, err  # names both: what was pinned, what is


def _rsa3072_cert(kit, subject: cx509.Name, issuer: cx509.Name, tag: str) -> tuple[Path, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.UTC)
    cert = (cx509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(cx509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(cx509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = kit.root / f"{tag}-{next(_label)}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize("issuer", ["self", "claims-primary"])
def test_regional_certificate_not_issued_by_the_primary_is_refused(kit, issuer):
    subject = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "rogue eu encryption")])
    primary_subject = cx509.load_pem_x509_certificate(signing_pem(kit).read_bytes()).subject
    path, fpr = _rsa3072_cert(kit, subject, subject if issuer == "self" else primary_subject,
                              f"rogue-{issuer}")
    plan_path = new_plan(kit, certificates={"eu": str(path)}, fingerprints={"eu": fpr})
    needle = "not issued by the primary" if issuer == "self" else "does not verify"
    assert_refused(run(kit, plan_path), plan_path, "eu", needle)


def test_expired_regional_certificate_is_refused(kit):
    eu = kit.regionals["eu"]
    subject_spki = hx509.public_key_info(eu.token, ops.public(f"{eu.label}-encryption"))
    issuer_cert = hx509.load_pem(signing_pem(kit).read_bytes())
    issued = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    token = open_primary(kit)
    try:
        sign_ref = ops.private(f"{kit.primary.label}-signing")
        issuer_spki = hx509.public_key_info(token, ops.public(f"{kit.primary.label}-signing"))
        cert = hx509.issue(
            token, issuer_key=sign_ref,
            signature="ecdsa-sha384" if issuer_spki.algorithm == "ec" else "rsa-pss-sha384",
            subject=hx509.names(role="encryption", token_label=eu.label, organization="hsm-suite",
                                region="eu"),
            subject_spki=subject_spki, issuer_name=issuer_cert.subject, issuer_spki=issuer_spki,
            ca=False, key_usage={"key_encipherment"}, days=1,
            not_before=issued)
    finally:
        token.close()
    path = kit.root / f"expired-eu-{next(_label)}.pem"
    path.write_bytes(hx509.to_pem(cert))
    # Control: while it was valid, the same certificate passed every recipient check.
    certificates.check_recipient(path, certificates.check_primary(signing_pem(kit)),
                                 bytes.fromhex(kit.fingerprints["eu"]), "eu",
                                 now=issued + dt.timedelta(hours=1))
    plan_path = new_plan(kit, certificates={"eu": str(path)})  # the pinned key is right
    assert_refused(run(kit, plan_path), plan_path, "expired", path.name)


def test_too_few_approvals_stop_the_ceremony(kit):
    plan_path = new_plan(kit)
    err = assert_refused(run(kit, plan_path, officers=("alice",)), plan_path,
                         "1 valid approval(s) of the 2 required", "alice")
    assert "bob" not in err


def test_approvals_over_another_nonce_are_refused(kit):
    plan_path = new_plan(kit)
    proc = kit.cli("open", plan_path)
    assert proc.returncode == 0, proc.stderr
    kit.approve(plan_path, os.urandom(32), ("alice", "bob"))
    assert_refused(kit.cli("run", plan_path, "--env", kit.env_file()), plan_path,
                   "0 valid approval(s)", "another ceremony run")


def test_missing_token_stops_the_ceremony(kit):
    plan_path = new_plan(kit)
    assert_refused(run(kit, plan_path, env_file=kit.env_file(primary_token="no-such-token")),
                   plan_path, "no-such-token")


def test_wrong_pin_stops_the_ceremony_without_showing_the_pin(kit):
    plan_path = new_plan(kit)
    wrong = "wrong-" + os.urandom(6).hex()
    environ = {**kit.environ(), "HSM_PIN": wrong}
    proc = run(kit, plan_path, environ=environ)
    assert_refused(proc, plan_path, "CKR_PIN_INCORRECT", "user_pin_source in the --env file")
    assert wrong not in proc.stderr + proc.stdout
    assert kit.primary.user_pin.reveal() not in proc.stderr + proc.stdout


def test_release_not_newer_than_the_recorded_one_is_refused(kit):
    hi = next_release()
    lo = str(int(hi) - 1)
    run_ok(kit, release=hi)
    plan_path = new_plan(kit, release=lo)
    err = assert_refused(run(kit, plan_path), plan_path, "not newer")
    assert f"release {lo}" in err and f"({hi})" in err, err
    token = open_primary(kit)
    try:
        assert count_labelled(token, f"rel-{lo}-kdf-seed") == 0
    finally:
        token.close()


def test_run_of_a_plan_never_opened_is_refused_and_opens_nothing(kit):
    plan_path = new_plan(kit)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was never opened" in proc.stderr and "ceremony open" in proc.stderr
    assert not plans.load(plan_path).output_dir.exists()


# ------------------------------------------------------------------ one ceremony at a time
def _primary_identity(kit) -> tuple[str, str, str]:
    from hsm.core import module as modules
    return (modules.resolve(modules.DEFAULT_MODULE), kit.primary.token.serial,
            kit.primary.label)


def test_a_run_while_another_holds_the_plan_output_or_primary_is_refused_in_one_line(kit):
    """The locks are the kernel's (flock): held here as another run would hold them, the CLI
    refuses at once without touching the journal; released, the same run completes."""
    import subprocess
    import sys

    from ceremony import lock

    plan_path = new_plan(kit)
    out = plans.load(plan_path).output_dir
    kit.open_and_approve(plan_path)
    before = (out / TRANSCRIPT).read_bytes()
    with lock.exclusive(plan_path, out):
        proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert_refused(proc, plan_path, "another ceremony run is using the plan", "resumes")
    assert (out / TRANSCRIPT).read_bytes() == before
    # Another plan on the same primary token: refused too (both would race its release record).
    other = new_plan(kit)
    kit.open_and_approve(other)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ceremony import lock; "
         "ctx = lock.exclusive(Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:]));"
         "ctx.__enter__(); print('held', flush=True); time.sleep(60)",
         str(plan_path), str(out), *_primary_identity(kit)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = kit.cli("run", other, "--env", kit.env_file())
        assert_refused(proc, other, f"the primary token {kit.primary.label!r}")
    finally:
        holder.kill()  # SIGKILL: the kernel drops its locks with it
        holder.wait(10)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    # The token's lock file goes with the run that held it: none piles up.
    assert not lock._token_lock_path(lock.token_key(*_primary_identity(kit))).exists()


def test_two_concurrent_runs_of_one_plan_make_one_ceremony(kit):
    """Started together: one completes, the other is refused (busy, or already closed if it
    came after); one transcript that verifies, one set of secrets."""
    import subprocess  # run_cli blocks: both runs are started here, then waited for
    import sys

    plan_path = new_plan(kit)
    p = plans.load(plan_path)
    kit.open_and_approve(plan_path)
    env_file = kit.env_file()
    procs = [subprocess.Popen([sys.executable, "-m", "ceremony", "run", str(plan_path),
                               "--env", str(env_file)], cwd=kit.root, env=kit.environ(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(300), proc.stderr.read()) for proc in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in refused and len(refused.strip().splitlines()) == 1, refused
    assert "another ceremony run is using" in refused or "already closed" in refused, refused
    steps = [r["step"] for r in records(p.output_dir)]
    assert steps.count("close") == 1 and steps.count("open") == 1, steps
    # One transcript and bundles that verify (the officers' quorum is not this test's subject:
    # nobody has countersigned yet, so it is checked as `ceremony countersign` checks it).
    verify_directory(p.output_dir, signing_pem(kit), None)


# ------------------------------------------------------------------------- the step table
def _plan_of(ceremony_type: str) -> plans.Plan:
    """A plan object of the type, with two regions and two secrets (the table only reads those)."""
    return plans.Plan(path=Path("plan.toml"), digest=b"", id="t", type=ceremony_type,
                      practice=True, output_dir=Path("out"),
                      primary_signing_certificate=Path("s.pem"),
                      primary_encryption_certificate=Path("e.pem"), quorum=1, officers=(),
                      regions=tuple(plans.Region(r, Path(f"{r}.pem"), b"") for r in ("eu", "us")),
                      secrets=(plans.Secret("kdf-seed", "hmac-sha256-seed"),
                               plans.Secret("tenant-wrapping-key", "aes-256")))


@pytest.mark.parametrize("ceremony_type", plans.CEREMONY_TYPES)
def test_every_step_of_every_ceremony_type_resolves_to_its_runner_method(ceremony_type):
    """The plan's types are the table's, every step a plan of the type journals has a handler in
    it, and that handler is a method of the Runner (what `_do` calls)."""
    assert set(runner.STEPS) == set(plans.CEREMONY_TYPES)
    handlers = runner.handlers(ceremony_type)
    journaled = runner.steps(_plan_of(ceremony_type))
    assert journaled[0] == "open" and journaled[-1] == "close"
    for step in journaled:
        handler = handlers[step.partition(":")[0]]
        assert getattr(runner.Runner, handler.__name__) is handler
    if ceremony_type == "release-secrets":
        assert "generate:tenant-wrapping-key" in journaled and "export:escrow" in journaled
    if ceremony_type == "escrow-export":
        assert "export:us" in journaled and "export:escrow" not in journaled


def test_searching_for_a_step_name_finds_its_handler():
    """Each step's name is written once per ceremony type, on the line that names its method:
    `grep '"check-escrow"' ceremony/runner.py` lands on `Runner.step_check_escrow`."""
    source = Path(runner.__file__).read_text().splitlines()
    for ceremony_type, table in runner.STEPS.items():
        for step in table:
            lines = [line for line in source if f'Step("{step.name}", ' in line]
            assert any(f"Runner.{step.handler.__name__}" in line for line in lines), \
                (ceremony_type, step.name)
