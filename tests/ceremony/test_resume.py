"""Kill-and-resume at every checkpoint of a release-secrets ceremony, on real SoftHSM2 tokens.

For every journaled step after "open", the runner is SIGKILLed (through the loudly named test
hook ``ceremony.runner.KILL_ENV``) once *before* the step and once *after its effect but before
its journal record* (``after-op:`` - the dangerous window: the secret is in the token or the
bundle is on disk, but the transcript does not know it). A second ``ceremony run`` must finish
the ceremony, and the outputs must be exactly those of an uninterrupted run: a verifiable
transcript that says where it resumed, every secret and trusted key once in the token, every
bundle once on disk and in the transcript, all bundles with the journaled KDF salt.
"""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
from pkcs11 import Attribute

from ceremony import plan as plans
from ceremony import runner
from ceremony.transcript import FILE, SIGNATURE_FILE, Transcript, load
from hsm.core.token import Token
from hsm.keys import export
from release import bundle as bundles
from release import certificates as certs
from tests.ceremony_kit import kit_fixture

pytestmark = pytest.mark.slow

REGIONS = ("ap", "eu", "us")
SECRETS = ("kdf-seed", "tenant-wrapping-key")  # the two secrets Kit.plan_text always writes
RECIPIENTS = (*REGIONS, "escrow")

# The steps of the kit's plan, computed by the runner itself (checked against the real plan in
# every test, so a change of the step list cannot silently shrink the coverage).
STEPS = runner.steps(SimpleNamespace(
    type="release-secrets", regions=[SimpleNamespace(name=r) for r in REGIONS],
    secrets=[SimpleNamespace(name=s) for s in SECRETS]))
CHECKPOINTS = [f"{phase}:{step}" for step in STEPS if step != "open"
               for phase in ("before", "after-op")]


def _checkpoint_id(checkpoint: str) -> str:
    return checkpoint.replace(":", "-")  # before-generate-kdf-seed, after-op-export-eu


kit = kit_fixture("ceremony-resume", regions=REGIONS)


def _environ(kit, kill_at: str | None = None) -> dict:
    env = kit.environ()
    env.pop(runner.KILL_ENV, None)
    if kill_at is not None:
        env[runner.KILL_ENV] = kill_at
    return env


def _count_label(token: Token, label: str) -> int:
    return token.run("C_FindObjects",
                     lambda lease: len(list(lease.session.get_objects({Attribute.LABEL: label}))),
                     label)


def _ids_of(token: Token, label: str) -> list[bytes]:
    return token.run("C_FindObjects", lambda lease: [
        o[Attribute.ID] for o in lease.session.get_objects({Attribute.LABEL: label})], label)


def _remove_trusted_keys(kit) -> None:
    """Destroy the trusted recipient keys an earlier test made (as the SO, who made them), so
    the trust-recipients checkpoints see the token effect happen in *this* ceremony."""
    with Token.open(kit.primary.label, pin=kit.primary.so_pin, so=True) as so:
        for name in RECIPIENTS:
            label = runner.recipient_label(name)
            so.run("C_DestroyObject", lambda lease, label=label: [
                o.destroy() for o in lease.session.get_objects({Attribute.LABEL: label})], label)
            assert _count_label(so, label) == 0


def _outs(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.mark.parametrize("checkpoint", CHECKPOINTS, ids=[_checkpoint_id(c) for c in CHECKPOINTS])
def test_killed_ceremony_resumes_to_the_same_outputs(kit, checkpoint):
    phase, _, step = checkpoint.partition(":")
    plan_path = kit.write_plan()
    plan = plans.load(plan_path)
    assert runner.steps(plan) == STEPS
    out = plan.output_dir
    cert_path = kit.pki / f"{kit.primary.label}-signing.pem"
    env_file = kit.env_file()
    kit.open_and_approve(plan_path)
    if step == "trust-recipients":
        _remove_trusted_keys(kit)

    # 1. The killed run: it dies by SIGKILL exactly at the checkpoint.
    killed = kit.cli("run", plan_path, "--env", env_file, env=_environ(kit, checkpoint))
    assert killed.returncode == -signal.SIGKILL, _outs(killed)
    journaled = [r["step"] for r in Transcript(out).records]
    # Before the step and after its effect alike, the journal holds exactly the steps before it.
    assert journaled == STEPS[:STEPS.index(step)], journaled
    assert not (out / SIGNATURE_FILE).exists()
    if phase == "after-op":  # prove the dangerous window was really hit: the effect is there
        if step.startswith("generate:"):
            with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
                assert _count_label(token, runner.secret_label(plan, step.split(":", 1)[1])) == 1
        elif step == "trust-recipients":
            with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
                for name in RECIPIENTS:
                    assert _count_label(token, runner.recipient_label(name)) == 1, name
        elif step.startswith("export:"):
            assert (out / runner.bundle_name(plan, step.split(":", 1)[1])).is_file()
        elif step == "record-release":
            with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
                assert plan.release in export.read_states(token)
        elif step == "destroy-secrets":
            with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
                for name in SECRETS:
                    assert _count_label(token, runner.secret_label(plan, name)) == 0, name

    # 2. The resumed run finishes the ceremony.
    resumed = kit.cli("run", plan_path, "--env", env_file, env=_environ(kit))
    assert resumed.returncode == 0, _outs(resumed)

    # 3. Offline verification passes.
    kit.countersign(out)
    verified = kit.cli("verify", out, "--cert", cert_path, "--json", "--officers",
                       kit.pins_file(), env=_environ(kit))
    assert verified.returncode == 0, _outs(verified)
    result = json.loads(verified.stdout)

    # 4. The transcript: every step once, in order, and a resume record saying where it stopped
    #    - none when nothing after "open" had been journaled (the run never got going).
    records = load(out / FILE)
    resumes = [r for r in records if r["step"] == "resume"]
    if journaled == ["open"]:
        assert resumes == []
        assert [r["step"] for r in records] == STEPS
        assert result["resumed"] == 0
    else:
        assert len(resumes) == 1, [r["step"] for r in records]
        assert resumes[0]["data"]["after_step"] == journaled[-1]
        assert resumes[0]["data"]["remaining"] == STEPS[len(journaled):]
        assert [r["step"] for r in records] == journaled + ["resume"] + STEPS[len(journaled):]
        assert result["resumed"] == 1
    assert records[-1]["step"] == "close"
    assert records[-1]["data"]["resumed"] == len(resumes)
    # What the interrupted step had done is adopted, never redone; what it had not is created.
    status = {r["step"]: r["data"] for r in records}
    effect_done = phase == "after-op"
    for name in SECRETS:
        adopted = effect_done and step == f"generate:{name}"
        assert status[f"generate:{name}"]["status"] == ("adopted" if adopted else "created")
    for name in RECIPIENTS:
        adopted = effect_done and step == f"export:{name}"
        assert status[f"export:{name}"]["status"] == ("adopted" if adopted else "created")
    assert status["record-release"]["status"] == \
        ("adopted" if effect_done and step == "record-release" else "recorded")
    assert status["destroy-secrets"]["secrets"] == {
        name: "absent" if effect_done and step == "destroy-secrets" else "destroyed"
        for name in SECRETS}
    if step == "trust-recipients":
        assert {r["status"] for r in status["trust-recipients"]["recipients"].values()} == \
            {"adopted" if effect_done else "created"}

    # 5. The token: no secret left (destroyed after the bundles were verified), each trusted
    #    key once, the release recorded once. Each secret was made once: every bundle carries
    #    the same check value for it (a second generation would differ).
    with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
        for name in SECRETS:
            assert _ids_of(token, runner.secret_label(plan, name)) == [], name
        for name in RECIPIENTS:
            assert _count_label(token, runner.recipient_label(name)) == 1, name
        states = export.read_states(token)  # one record per release, never destroyed
        assert states.count(plan.release) == 1, states
        assert max(states, key=int) == plan.release, states

    # 6. The files: no temporaries, exactly the expected bundles, each journaled once, each
    #    listed in the transcript, each carrying the journaled KDF salt.
    assert sorted(p.name for p in out.rglob(".*.tmp")) == []
    expected_bundles = {runner.bundle_name(plan, r) for r in RECIPIENTS}
    assert {p.name for p in out.iterdir()} == \
        {FILE, SIGNATURE_FILE, runner.APPROVALS_DIR} | expected_bundles
    exports = [r for r in records if r["step"].startswith("export:")]
    assert sorted(r["step"] for r in exports) == sorted(f"export:{r}" for r in RECIPIENTS)
    assert {r["data"]["bundle"] for r in exports} == expected_bundles
    assert sorted(result["bundles"]) == sorted(expected_bundles)
    salts = [r["data"]["kdf_salt"] for r in records if r["step"] == "kdf-salt"]
    assert len(salts) == 1
    primary_cert = certs.as_asn1(certs.load(cert_path, "primary signing"))
    kcvs: dict[str, set] = {}
    for name in sorted(expected_bundles):
        manifest = bundles.verify((out / name).read_bytes(), primary_cert, where=name).manifest
        assert manifest["kdf_salt"] == salts[0], name
        assert manifest["ceremony_id"] == plan.id
        for entry in manifest["secrets"]:
            kcvs.setdefault(entry["name"], set()).add(entry["check_value"]["value"])
    assert {k: len(v) for k, v in kcvs.items()} == {name: 1 for name in SECRETS}


def test_killed_between_close_record_and_head_signature_resumes(kit):
    plan_path = kit.write_plan()
    out = plans.load(plan_path).output_dir
    env_file = kit.env_file()
    kit.open_and_approve(plan_path)
    first = kit.cli("run", plan_path, "--env", env_file, env=_environ(kit))
    assert first.returncode == 0, _outs(first)
    records = load(out / FILE)
    # The on-disk state of a SIGKILL right after the close record was fsynced: the signature is
    # written last, atomically (suite.files.write_new), so it is simply absent.
    (out / SIGNATURE_FILE).unlink()

    resumed = kit.cli("run", plan_path, "--env", env_file, env=_environ(kit))
    assert resumed.returncode == 0, _outs(resumed)
    kit.countersign(out)
    verified = kit.cli("verify", out, "--cert", kit.primary_cert, "--officers",
                       kit.pins_file(), env=_environ(kit))
    assert verified.returncode == 0, _outs(verified)
    assert load(out / FILE) == records  # nothing to redo: only the head gets signed
