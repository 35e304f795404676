"""Build what a ceremony needs on real SoftHSM2 tokens: a provisioned primary, certified
regional HSMs, officers with keys (ECDSA files: the token keys have tests of their own), plans,
environment files, and the officer pins a region or `ceremony verify` holds.

Shared by the ceremony tests. RSA-4096 keygen is slow, so a Kit is made once per test module and
each test runs its own ceremony (fresh id, fresh release number, fresh output directory).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hsm.keys import provision
from hsm.testing import TestToken

from ceremony import approvals, plan as plans
from ceremony.countersign import countersign
from ceremony.officers import FileSigner
from ceremony.transcript import Transcript
from release import quorum, signers
from tests.helpers import environ, run_cli

OFFICERS = (("alice", "crypto-officer"), ("bob", "crypto-officer"),
            ("carol", "crypto-officer"), ("wendy", "witness"))
_release = itertools.count(1)


@dataclass
class Kit:
    root: Path
    pki: Path
    primary: TestToken
    regionals: dict[str, TestToken]
    officer_keys: dict[str, Path]
    officer_pubs: dict[str, str]
    fingerprints: dict[str, str] = field(default_factory=dict)

    # --------------------------------------------------------------------- files
    def env_file(self, **overrides) -> Path:
        values = {"primary_token": self.primary.label, "user_pin_source": "env:HSM_PIN",
                  "so_pin_source": "env:HSM_SO_PIN", **overrides}
        path = self.root / f"env-{next(_release)}.toml"
        path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
        return path

    def environ(self) -> dict:
        """Environment for a `ceremony` subprocess: token dir and the primary's PINs."""
        return {**os.environ, **self.primary.env, "HSM_PIN": self.primary.user_pin.reveal(),
                "HSM_SO_PIN": self.primary.so_pin.reveal()}

    def plan_text(self, *, ceremony_id: str | None = None, release: str | None = None,
                  regions: list[str] | None = None, quorum: int = 2, practice: bool = False,
                  fingerprints: dict[str, str] | None = None,
                  certificates: dict[str, str] | None = None, output_dir: str | None = None,
                  extra: str = "") -> str:
        n = next(_release)
        release = release or str(1000 + n)  # increasing, so any test order keeps ids moving up
        ceremony_id = ceremony_id or f"test-{os.getpid()}-{n}"
        regions = regions if regions is not None else sorted(self.regionals)
        fps = {**self.fingerprints, **(fingerprints or {})}
        crts = {r: str(self.pki / f"{self.regionals[r].label}.pem") for r in self.regionals}
        crts.update(certificates or {})
        out = [f'[ceremony]\nid = "{ceremony_id}"\ntype = "release-secrets"\n'
               f'release = "{release}"\npractice = {str(practice).lower()}\n'
               f'output_dir = "{output_dir or "out-" + ceremony_id}"\n{extra}\n',
               f'[primary]\nsigning_certificate = "{self.pki / (self.primary.label + "-signing.pem")}"\n'
               f'encryption_certificate = "{self.pki / (self.primary.label + "-encryption.pem")}"\n\n',
               f"[quorum]\nm = {quorum}\n\n"]
        for name, role in OFFICERS:
            out.append(f'[[officers]]\nname = "{name}"\nrole = "{role}"\n'
                       f'approval_key = """\n{self.officer_pubs[name]}"""\n\n')
        for r in regions:
            out.append(f'[[regions]]\nname = "{r}"\ncertificate = "{crts[r]}"\n'
                       f'fingerprint = "{fps[r]}"\n\n')
        out.append('[[secrets]]\nname = "kdf-seed"\ntype = "hmac-sha256-seed"\n\n'
                   '[[secrets]]\nname = "tenant-wrapping-key"\ntype = "aes-256"\n')
        return "".join(out)

    @staticmethod
    def next_release() -> str:
        """A release id higher than every one this session used so far (one shared counter),
        for a test that needs the same id in two plans."""
        return str(1000 + next(_release))

    def write_plan(self, text: str | None = None, **kwargs) -> Path:
        text = text or self.plan_text(**kwargs)
        path = self.root / f"plan-{next(_release)}.toml"
        path.write_text(text)
        return path

    # --------------------------------------------------------------------- actions
    def approve(self, plan_path: Path, nonce: bytes, officers=("alice", "bob")) -> None:
        p = plans.load(plan_path)
        folder = p.output_dir / "approvals"
        folder.mkdir(parents=True, exist_ok=True)
        for name in officers:
            ap = approvals.sign(p, nonce, name, self.officer_keys[name])
            (folder / f"{name}.json").write_text(ap.to_json())

    def cli(self, *args: str, env: dict | None = None, timeout: int = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        """``python -m ceremony`` in the kit's directory, with the primary's PINs by default."""
        return run_cli("ceremony", *args, env=env or self.environ(), cwd=self.root,
                       timeout=timeout, input=input)

    def run_release(self, *, countersigned=("alice", "bob"), **plan_kwargs) -> plans.Plan:
        """One closed release ceremony (opened, approved by alice and bob, run, its bundles
        countersigned by ``countersigned``); its plan."""
        plan_path = self.write_plan(**plan_kwargs)
        self.open_and_approve(plan_path)
        proc = self.cli("run", plan_path, "--env", self.env_file())
        assert proc.returncode == 0, proc.stderr
        plan = plans.load(plan_path)
        self.countersign(plan.output_dir, countersigned)
        return plan

    @property
    def primary_cert(self) -> Path:
        return self.pki / f"{self.primary.label}-signing.pem"

    def countersign(self, directory: Path, officers=("alice", "bob")) -> None:
        """What `ceremony countersign` does for each officer, in this process (no token)."""
        digest = bytes.fromhex(Transcript(directory).data("close")["release_digest"])
        for name in officers:
            countersign(directory, self.primary_cert, FileSigner(self.officer_keys[name]),
                        name, digest)

    def anchors(self, bundle: Path) -> Path:
        """A CAfile for ``openssl cms -verify`` of ``bundle``: the primary certificate and the
        officers' self-signed certificates it carries (openssl checks every signature; which
        officers count is the readers' pinned quorum, not openssl's)."""
        from asn1crypto import cms
        from hsm.keys.x509 import to_pem
        certs = cms.ContentInfo.load(bundle.read_bytes())["content"]["certificates"]
        path = bundle.with_name(f".{bundle.name}.anchors.pem")
        path.write_bytes(b"".join(to_pem(c.chosen) for c in certs))
        return path

    def previous_format_bundle(self, plan: plans.Plan, region: str) -> bytes:
        """``region``'s bundle of ``plan`` as the version before officers countersigned wrote
        it: a version-1 manifest (no plan digest, no run nonce) signed by the primary alone."""
        from hsm.core import ops
        from hsm.core.token import Token
        from release import bundle as bundles
        from release.certificates import as_asn1, load as load_cert
        cert = as_asn1(load_cert(self.primary_cert, "primary signing"))
        name = f"bundle-{plan.release}-{region}.p7"
        v2 = bundles.verify((plan.output_dir / name).read_bytes(), cert).manifest
        v1 = {k: v for k, v in v2.items() if k not in ("plan_digest", "run_nonce")}
        v1["version"] = 1
        with Token.open(self.primary.label, pin=self.primary.user_pin) as token:
            return bundles.build(v1, cert, "ecdsa-sha384", lambda data: ops.sign(
                token, ops.private(f"{token.label}-signing"), "ecdsa-sha384", data))

    def fingerprint(self, officer: str) -> str:
        return signers.fingerprint(FileSigner(self.officer_keys[officer]).spki).hex()

    def pins_toml(self, m: int = 2, officers=("alice", "bob", "carol"),
                  from_release: str = "1") -> str:
        """An [[officers]] set pinning these kit officers (appended to a node configuration,
        or a pins file for `ceremony verify --officers`)."""
        keys = ", ".join(f'{n} = "{self.fingerprint(n)}"' for n in officers)
        return f'\n[[officers]]\nfrom_release = "{from_release}"\nm = {m}\nkeys = {{ {keys} }}\n'

    def pins_file(self, **kwargs) -> Path:
        path = self.root / f"officers-{next(_release)}.toml"
        path.write_text(self.pins_toml(**kwargs))
        return path

    def pins(self, **kwargs) -> quorum.Pins:
        return quorum.load(self.pins_file(**kwargs))

    def open_and_approve(self, plan_path: Path, officers=("alice", "bob")) -> bytes:
        proc = self.cli("open", plan_path)
        assert proc.returncode == 0, proc.stderr
        nonce = bytes.fromhex(next(line.split()[-1] for line in proc.stdout.splitlines()
                                   if line.startswith("Nonce")))
        self.approve(plan_path, nonce, officers)
        return nonce


def make_kit(root: Path, make_token, regions=("eu", "us", "ap")) -> Kit:
    """Provision a primary and certify one regional HSM per region (RSA-4096 everywhere)."""
    root.mkdir(parents=True, exist_ok=True)  # provisioning refuses an --out with no parent
    pki = root / "pki"
    primary = make_token("primary")
    provision.init_primary(primary.token, pki)
    regionals, fps = {}, {}
    for region in regions:
        tt = make_token(f"regional-{region}")
        req = provision.init_regional(tt.token, region, pki)
        provision.certify_regional(primary.token, req.request, pki,
                                   confirmed_fingerprint=req.fingerprint)
        regionals[region] = tt
        fps[region] = req.fingerprint.hex()
    keys, pubs = {}, {}
    for name, _ in OFFICERS:
        keys[name] = root / "officers" / f"{name}.key"
        pubs[name] = approvals.new_key(keys[name])
    # Close the in-process logins: the ceremony runs in subprocesses, and the SO step needs
    # the primary free of user logins in *its* process only, but keep things simple and clean.
    primary.close()
    return Kit(root, pki, primary, regionals, keys, pubs, fps)


def ceremony_without_pins(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m ceremony`` in ``cwd`` with no HSM_PIN/HSM_SO_PIN in its environment (for the
    commands that must not need a token: plan, approve, keygen, dry runs)."""
    return run_cli("ceremony", *args, env=environ(lambda k: k in ("HSM_PIN", "HSM_SO_PIN")),
                   cwd=cwd)


def kit_fixture(name: str, regions=("eu", "us", "ap")):
    """A module-scoped ``kit`` fixture: :func:`make_kit` once per test module, under a temporary
    directory called ``name``, on the session's SoftHSM2 tokens. In a module: ``kit =
    kit_fixture("escrow", regions=("eu", "ap"))``."""
    import pytest

    @pytest.fixture(scope="module")
    def kit(tmp_path_factory, softhsm_session_token_factory) -> Kit:
        return make_kit(tmp_path_factory.mktemp(name),
                        lambda prefix: softhsm_session_token_factory(prefix=prefix),
                        regions=regions)
    return kit
