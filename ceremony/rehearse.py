"""`ceremony rehearse PLAN`: the same plan against fresh, throw-away SoftHSM2 tokens.

The rehearsal provisions a primary and one regional token per region in a temporary directory,
substitutes their certificates and fingerprints and throw-away officer keys into a copy of the
plan, forces ``practice = true`` (bundle names and manifests say PRACTICE; a production KMS
refuses them), and runs open -> approvals -> run -> countersign -> verify (with the throw-away
officers pinned). It must run in a process that has
not yet loaded SoftHSM2 (the CLI is one), because SoftHSM2 reads its configuration once.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hsm.core import module as modules
from hsm.core import softhsm
from hsm.core.pin import Pin
from hsm.core.token import Token
from hsm.keys import provision
from release import quorum, signers

from . import approvals, environment
from . import plan as plans
from .countersign import countersign
from .errors import CeremonyError
from .officers import FileSigner
from .runner import Runner
from .transcript import Transcript
from .verify import verify_directory

_USER_PIN_VAR = "HSM_SUITE_REHEARSAL_PIN"
_SO_PIN_VAR = "HSM_SUITE_REHEARSAL_SO_PIN"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if "\n" in text:
        return '"""\n' + text.strip("\n") + '\n"""'
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(data: dict) -> str:
    """A TOML writer for the plan's shape: tables of scalars and arrays of such tables."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(f"[{key}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            out.append("")
        elif isinstance(value, list):
            for item in value:
                out.append(f"[[{key}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
    return "\n".join(out)


def rehearse(plan_path: Path, log=print) -> dict:
    plan = plans.load(plan_path)
    if plan.type != "release-secrets":
        raise CeremonyError("rehearsals are for release-secrets plans")
    if modules.resolve(modules.DEFAULT_MODULE) in modules.loaded_paths():
        raise CeremonyError("SoftHSM2 is already loaded in this process; rehearse from a "
                            "fresh process (the `ceremony rehearse` command)")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"rehearsal-{plan.id}-"))
    out_dir = plan.output_dir.with_name(f"{plan.output_dir.name}-PRACTICE-{stamp}")
    done = False
    try:
        result = _rehearse(plan, work, out_dir, stamp, log)
        done = True
        return result
    finally:
        # The throw-away tokens (practice secrets nobody should reuse) and the work directory
        # always go; a failed rehearsal leaves no half-made PRACTICE directory either.
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            shutil.rmtree(out_dir, ignore_errors=True)


def _rehearse(plan: plans.Plan, work: Path, out_dir: Path, stamp: str, log) -> dict:
    conf = softhsm.write_config(work / "softhsm2.conf", work / "tokens")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    mod = modules.load(modules.DEFAULT_MODULE)
    so_pin, user_pin = Pin(secrets.token_hex(8)), Pin(secrets.token_hex(8))
    pki = work / "pki"
    log(f"rehearsal tokens in {work} (throw-away; PRACTICE)")
    softhsm.init_token_in_process(mod, "primary", so_pin, user_pin)
    with Token.open("primary", pin=user_pin) as primary:
        provision.init_primary(primary, pki)
        fingerprints = {}
        for region in plan.regions:
            label = f"regional-{region.name}"
            softhsm.init_token_in_process(mod, label, so_pin, user_pin)
            with Token.open(label, pin=user_pin) as regional:
                req = provision.init_regional(regional, region.name, pki)
            provision.certify_regional(primary, req.request_path, pki,
                                       confirmed_fingerprint=req.fingerprint)
            fingerprints[region.name] = req.fingerprint.hex()
    keys = {}
    raw: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else [dict(i) for i in v] if isinstance(v, list)
               else v) for k, v in plan.raw.items()}
    for officer in raw["officers"]:
        keys[officer["name"]] = work / "officers" / f"{officer['name']}.key"
        officer["approval_key"] = approvals.new_key(keys[officer["name"]])
    raw["ceremony"]["practice"] = True
    raw["ceremony"]["output_dir"] = str(out_dir.resolve())
    raw["primary"] = {"signing_certificate": str(pki / "primary-signing.pem"),
                      "encryption_certificate": str(pki / "primary-encryption.pem")}
    for entry in raw["regions"]:
        entry["certificate"] = str(pki / f"regional-{entry['name']}.pem")
        entry["fingerprint"] = fingerprints[entry["name"]]
    derived = work / f"{plan.path.stem}.rehearsal.toml"
    derived.write_text(f"# Rehearsal of {plan.path} (digest {plan.digest.hex()}), {stamp}\n"
                       + render(raw))
    practice = plans.load(derived)
    # Named sources, not HSM_PIN: a shell that sourced var/demo-pins.env has HSM_PIN_PRIMARY,
    # which would win over HSM_PIN for a token labelled "primary" (and be the wrong PIN here).
    os.environ[_USER_PIN_VAR], os.environ[_SO_PIN_VAR] = user_pin.reveal(), so_pin.reveal()
    env = environment.Environment(primary_token="primary", user_pin_source=f"env:{_USER_PIN_VAR}",
                                  so_pin_source=f"env:{_SO_PIN_VAR}")
    runner = Runner(practice, env, log=log)
    nonce = runner.open()
    folder = practice.output_dir / "approvals"
    folder.mkdir(exist_ok=True)
    for officer in practice.crypto_officers[:practice.quorum]:
        ap = approvals.sign(practice, nonce, officer.name, keys[officer.name])
        (folder / f"{officer.name}.json").write_text(ap.to_json())
    runner.run()
    # The officers of the quorum countersign every bundle with their throw-away keys, and the
    # outputs are verified against exactly those keys pinned.
    pins: dict[bytes, str] = {}
    closed = Transcript(practice.output_dir).data("close")
    for officer in practice.crypto_officers[:practice.quorum]:
        signer = FileSigner(keys[officer.name])
        countersign(practice.output_dir, pki / "primary-signing.pem", signer, officer.name,
                    bytes.fromhex(closed["release_digest"]))
        pins[signers.fingerprint(signer.spki)] = officer.name
    officer_pins = quorum.Pins((quorum.OfficerSet("0", practice.quorum, pins),),
                               source="rehearsal")
    keys_toml = ", ".join(f'{name} = "{fpr.hex()}"' for fpr, name in pins.items())
    (practice.output_dir / "PRACTICE-officers.toml").write_text(
        f"# The rehearsal's throw-away officers (to re-verify these outputs)\n[[officers]]\n"
        f'from_release = "0"\nm = {practice.quorum}\nkeys = {{ {keys_toml} }}\n')
    result = verify_directory(practice.output_dir, pki / "primary-signing.pem", officer_pins)
    # Keep the practice primary certificate beside the outputs (to re-verify them), and
    # destroy the throw-away tokens: they hold practice secrets nobody should reuse.
    shutil.copy(pki / "primary-signing.pem",
                practice.output_dir / "PRACTICE-primary-signing.pem")
    result.update({"output_dir": str(practice.output_dir), "plan_digest": plan.digest.hex()})
    return result
