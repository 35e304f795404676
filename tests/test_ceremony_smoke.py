"""End-to-end release-secrets ceremony on real SoftHSM2 tokens (one primary, three regions)."""

from __future__ import annotations

import subprocess

import pytest

from ceremony import plan as plans
from tests.ceremony_kit import make_kit


@pytest.fixture(scope="module")
def kit(tmp_path_factory, softhsm_session_token_factory):
    root = tmp_path_factory.mktemp("ceremony")
    return make_kit(root, lambda prefix: softhsm_session_token_factory(prefix=prefix))


def test_full_ceremony_closes_verifies_offline_and_openssl_accepts_bundles(kit):
    plan_path = kit.write_plan()
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    out = plans.load(plan_path).output_dir
    proc = kit.cli("verify", out, "--cert", kit.pki / f"{kit.primary.label}-signing.pem")
    assert proc.returncode == 0, proc.stderr
    assert "4 bundles verified" in proc.stdout
    for bundle in sorted(out.glob("bundle-*.p7")):
        v = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                            str(bundle), "-CAfile",
                            str(kit.pki / f"{kit.primary.label}-signing.pem"), "-purpose", "any",
                            "-out", "/dev/null"], capture_output=True, text=True)
        assert v.returncode == 0, (bundle, v.stderr)
