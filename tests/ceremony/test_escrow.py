"""escrow-export: a region enrolled after a release still receives it, from the escrow bundle,
under quorum, and the primary keeps no copy afterwards (real SoftHSM2 tokens, real subprocesses).
"""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, ObjectClass

from ceremony import plan as plans
from ceremony import runner
from hsm.core import ops
from hsm.core.token import Token
from kms.node import importer
from release import bundle as bundles
from release.certificates import as_asn1
from release.certificates import load as load_cert
from tests.ceremony_kit import kit_fixture

kit = kit_fixture("escrow", regions=("eu", "ap"))


@pytest.fixture(scope="module")
def release(kit):
    """Release ceremony for eu only: ap is 'enrolled later'."""
    return kit.run_release(regions=["eu"])


def escrow_plan(kit, release, *, regions=("ap",), bundle=None) -> plans.Plan:
    text = kit.plan_text(regions=list(regions), release=release.release)
    text = text.replace('type = "release-secrets"', 'type = "escrow-export"')
    text = text[:text.index("[[secrets]]")]
    bundle = bundle or release.output_dir / runner.bundle_name(release, "escrow")
    text += f'[escrow]\nbundle = "{bundle}"\n'
    return kit.write_plan(text)


def run(kit, plan_path):
    kit.open_and_approve(plan_path)
    return kit.cli("run", plan_path, "--env", kit.env_file())


def manifest(kit, path):
    cert = as_asn1(load_cert(kit.pki / f"{kit.primary.label}-signing.pem", "primary signing"))
    return bundles.verify(path.read_bytes(), cert).manifest


def test_a_later_region_receives_the_release_from_escrow_and_the_primary_keeps_no_copy(
        kit, release):
    plan_path = escrow_plan(kit, release)
    p = plans.load(plan_path)
    assert runner.steps(p) == ["open", "approvals", "check-certificates", "check-escrow",
                               "trust-recipients", "export:ap", "verify-bundles", "close"]
    proc = run(kit, plan_path)
    assert proc.returncode == 0, proc.stderr
    kit.countersign(p.output_dir)
    verified = kit.cli("verify", p.output_dir, "--cert", kit.primary_cert, "--officers",
                       kit.pins_file())
    assert verified.returncode == 0, verified.stderr
    # Only the new region's bundle; the same secrets (check values) and salt as the original.
    assert sorted(x.name for x in p.output_dir.glob("bundle-*")) == [
        runner.bundle_name(p, "ap")]
    new = manifest(kit, p.output_dir / runner.bundle_name(p, "ap"))
    old = manifest(kit, release.output_dir / runner.bundle_name(release, "eu"))
    assert new["release"] == old["release"] and new["kdf_salt"] == old["kdf_salt"]
    assert [e["check_value"] for e in new["secrets"]] == [e["check_value"]
                                                          for e in old["secrets"]]
    assert new["ceremony_id"] == p.id and new["region"] == "ap"
    # The ap token imports it like any bundle: unwrap inside, check values compared there.
    ap = kit.regionals["ap"].token
    report = importer.import_bundles(
        ap, region="ap", primary_cert_path=kit.pki / f"{kit.primary.label}-signing.pem",
        bundle_dir=p.output_dir, allow_practice=False, history={}, officers=kit.pins())
    assert list(report.held) == [release.release] and report.refused == {}
    ops.destroy_session_secrets(ap, "release-")
    # The primary holds no secret object afterwards (the restored copies were session objects,
    # destroyed at the end of the run).
    with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
        left = token.run("find", lambda lease: [
            str(o[Attribute.LABEL]) for o in lease.session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY})])
    assert left == []


def test_escrow_export_refuses_a_region_bundle_in_place_of_the_escrow_bundle(kit, release):
    plan_path = escrow_plan(kit, release,
                            bundle=release.output_dir / runner.bundle_name(release, "eu"))
    proc = run(kit, plan_path)
    assert proc.returncode == 2, proc.stderr
    assert "not the escrow bundle" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(plans.load(plan_path).output_dir.glob("bundle-*"))


def test_escrow_export_refuses_a_tampered_escrow_bundle(kit, release, tmp_path):
    src = release.output_dir / runner.bundle_name(release, "escrow")
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / src.name
    bad.write_bytes(bytes(data))
    plan_path = escrow_plan(kit, release, bundle=bad)
    proc = run(kit, plan_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(plans.load(plan_path).output_dir.glob("bundle-*"))
