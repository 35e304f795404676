"""The ``ceremony`` command: plan, open, approve, run, verify, rehearse.

A ceremony is run in three moves so approvals bind to *this* run: ``ceremony open PLAN`` draws a
fresh nonce and prints it with the plan digest; each crypto officer runs ``ceremony approve``;
``ceremony run PLAN`` checks the quorum and performs the steps. ``ceremony verify`` checks the
outputs offline, with no HSM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsm import fingerprint as fp
from hsm import cliutil
from hsm.errors import UsageError
from hsm.files import write_new

from hsm import export, policy

from . import approvals, environment, plan as plans, runner
from .errors import ApprovalError
from .transcript import Transcript

STEP_DETAILS = {
    "open": "draw a 256-bit nonce; journal plan digest, officers, quorum",
    "approvals": "verify >= M Ed25519 approvals over (plan digest || nonce) from crypto officers",
    "check-certificates": "each recipient certificate: issued by the primary signing "
                          "certificate, valid now, keyEncipherment, RSA >= 3072, SHA-256(SPKI) "
                          "equals the pinned fingerprint",
    "check-release": "user session: the release id is newer than every release recorded in "
                     "the primary HSM (CKO_DATA 'hsm-suite-release-<id>', non-destroyable)",
    "trust-recipients": "SO session: C_CreateObject per recipient {"
                        + export.applied_trusted_template() + "}",
    "kdf-salt": "C_GenerateRandom 32 bytes (public; goes into every manifest)",
    "check-values": "key check values: HMAC-SHA256(seed, label)[:8] via CKM_SHA256_HMAC; "
                    "AES-CMAC(key, label)[:8] via CKM_AES_CMAC (never an AES-ECB block)",
    "verify-bundles": "read every bundle back and verify it against the primary certificate",
    "check-escrow": "verify the escrow bundle against the primary certificate: region escrow, "
                    "the plan's release, addressed to this primary's key, a release it recorded",
    "destroy-secrets": "C_DestroyObject each release secret on the primary: the escrow bundle "
                       "is the only backup; no usable copy stays on the primary",
    "record-release": "C_CreateObject CKO_DATA 'hsm-suite-release-<id>' {"
                      + policy.describe_template(policy.RELEASE_RECORD.attributes)
                      + "} (not in practice runs)",
    "close": "journal the summary; the primary signing key signs the transcript head",
    "certify-regional": "issue the regional certificate after the pinned fingerprint matched",
}


def _detail(p: plans.Plan, step: str) -> str:
    name, _, arg = step.partition(":")
    if name == "generate":
        s = next(x for x in p.secrets if x.name == arg)
        kind = "CKM_GENERIC_SECRET_KEY_GEN" if s.key_type == "generic-secret" else \
            "CKM_AES_KEY_GEN"
        return (f"{kind} {s.bits} bits, label {runner.secret_label(p, arg)!r}, id "
                "sha256(id, name, practice, run nonce)[:16]: {"
                + export.applied_template(s.key_type) + "}; read back against it")
    if name == "export" and p.type == "escrow-export":
        return ("C_UnwrapKey of each escrow secret with the primary encryption key into a "
                "session object {" + policy.describe_template(policy.ESCROW_UNWRAP_TEMPLATE)
                + "}, check value compared, then C_WrapKey CKM_RSA_PKCS_OAEP with "
                f"{runner.recipient_label(arg)!r} -> {runner.bundle_name(p, arg)} (O_EXCL); "
                "the session objects are destroyed when the run ends")
    if name == "export":
        return (f"C_WrapKey CKM_RSA_PKCS_OAEP (strongest hash the token accepts, recorded) with "
                f"{runner.recipient_label(arg)!r}; CMS SignedData signed by the primary "
                f"signing key -> {runner.bundle_name(p, arg)} (O_EXCL)")
    return STEP_DETAILS.get(name, "")


def cmd_plan(args) -> int:
    p = plans.load(args.plan)
    missing = [str(f) for f in p.input_files() if not f.is_file()]
    if missing:
        raise UsageError(f"plan {p.path} names files that do not exist: {', '.join(missing)}",
                         hint="paths are relative to the plan file's directory")
    print(f"Plan {p.path}: ceremony {p.id!r} ({p.type})"
          + (f", release {p.release}" if p.release else "")
          + (" - PRACTICE" if p.practice else ""))
    print("\n".join(fp.display(p.digest, title="Digest", indent="", width=7)))
    print(f"Quorum  {p.quorum} of {len(p.crypto_officers)} crypto officers: "
          + ", ".join(o.name for o in p.crypto_officers))
    for o in p.officers:
        if o.role != "crypto-officer":
            print(f"        {o.role}: {o.name}")
    for r in p.regions:
        print(f"Region  {r.name}: {r.certificate}  pinned {fp.to_hex(r.fingerprint)}")
    print(f"Output  {p.output_dir}\nSteps:")
    for i, step in enumerate(runner.steps(p), 1):
        print(f"  {i:2}. {step:<24} {_detail(p, step)}")
    return 0


def cmd_open(args) -> int:
    p = plans.load(args.plan)
    nonce = runner.Runner(p, environment.load(args.env)).open()
    print(f"Ceremony {p.id} opened in {p.output_dir}")
    print(f"Plan digest {p.digest.hex()}")
    print(f"Nonce       {nonce.hex()}")
    print("Each crypto officer now runs: ceremony approve --plan PLAN --officer NAME --key KEY")
    return 0


def cmd_approve(args) -> int:
    p = plans.load(args.plan)
    if args.nonce:
        try:
            nonce = bytes.fromhex(args.nonce)
        except ValueError:
            raise UsageError("--nonce must be the hex nonce `ceremony open` printed") from None
    else:
        opened = Transcript(p.output_dir).find("open")
        if opened is None:
            raise UsageError(f"ceremony not opened in {p.output_dir}", hint="give --nonce")
        nonce = bytes.fromhex(opened["data"]["nonce"])
    _check_before_approving(p, nonce, args.officer)
    approval = approvals.sign(p, nonce, args.officer, Path(args.key))
    out = Path(args.out) if args.out else p.output_dir / runner.APPROVALS_DIR / \
        f"{args.officer}.json"
    write_new(out, approval.to_json().encode())
    print(f"{args.officer} approved plan {p.digest.hex()[:16]}... nonce {nonce.hex()[:16]}... "
          f"-> {out}")
    return 0


def _check_before_approving(p: plans.Plan, nonce: bytes, officer: str) -> None:
    """Refuse an approval that could never count *before* it is written: a written file takes
    the officer's name in approvals/, and their real approval would then be refused as
    "already exists"."""
    listed = {o.name: o.role for o in p.officers}
    if officer in listed and listed[officer] != "crypto-officer":
        raise ApprovalError(f"{officer!r} is a {listed[officer]} in the plan; only crypto "
                            "officers approve", hint="nothing was written")
    if len(nonce) != 32:
        raise UsageError(f"--nonce has {len(nonce)} bytes; a ceremony nonce has 32 (64 hex "
                         "digits)", hint="copy the nonce `ceremony open` printed; nothing was "
                                         "written")
    opened = Transcript(p.output_dir).find("open") if p.output_dir.is_dir() else None
    if opened is not None:
        if opened["data"]["plan_digest"] != p.digest.hex():
            raise ApprovalError(f"{p.output_dir} holds a ceremony of another plan (or this "
                                "plan changed after it was opened)", hint="nothing was written")
        if nonce.hex() != opened["data"]["nonce"]:
            raise ApprovalError(f"--nonce is not the nonce of the ceremony opened in "
                                f"{p.output_dir} ({opened['data']['nonce'][:16]}...)",
                                hint="approve this run's nonce (omit --nonce to use it); "
                                     "nothing was written")


def cmd_run(args) -> int:
    p = plans.load(args.plan)
    if args.dry_run:
        print("Dry run: nothing is touched.")
        return cmd_plan(args)
    if args.confirm_words or (sys.stdin is not None and sys.stdin.isatty()):
        for r in p.regions:
            typed = input(f"Type the fingerprint words read on the {r.name} console: ")
            try:
                if fp.parse_fingerprint(typed) != r.fingerprint:
                    raise UsageError(f"the words for {r.name} do not match the plan's pinned "
                                     "fingerprint", hint="stop the ceremony and investigate")
            except ValueError as exc:
                raise UsageError(f"cannot read the words for {r.name}: {exc}") from None
    if Transcript(p.output_dir).find("open") is None:
        raise UsageError(f"ceremony {p.id} was never opened in {p.output_dir}",
                         hint="run `ceremony open PLAN`, collect the officers' approvals of its "
                              "nonce, then `ceremony run PLAN`")
    run = runner.Runner(p, environment.load(args.env), interactive=True)
    run.open()
    tr = run.run()
    print(f"Ceremony {p.id} closed: {len(tr.records)} transcript records, head {tr.head}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify_directory
    result = verify_directory(Path(args.directory), Path(args.cert))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"OK: ceremony {result['ceremony_id']}, {result['records']} records, "
              f"{len(result['bundles'])} bundles verified"
              + (f", resumed {result['resumed']}x" if result["resumed"] else "")
              + (" (PRACTICE)" if result["practice"] else ""))
    return 0


def cmd_rehearse(args) -> int:
    if args.dry_run:
        print("Dry run: nothing is touched; a rehearsal would run these steps against "
              "throw-away SoftHSM2 tokens, every output stamped PRACTICE.")
        return cmd_plan(args)
    from .rehearse import rehearse
    result = rehearse(Path(args.plan))
    print(f"REHEARSAL OK (PRACTICE): {result['records']} records, "
          f"{len(result['bundles'])} bundles verified in {result['output_dir']}")
    return 0


def cmd_keygen(args) -> int:
    pub = approvals.new_key(Path(args.out))
    print(pub, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliutil.parser("ceremony", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="validate a plan; print its digest and every step")
    p.add_argument("plan")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("open", help="start a ceremony run: fresh nonce for the approvals")
    p.add_argument("plan")
    p.add_argument("--env", help="environment file (module, token, PIN sources)")
    p.set_defaults(func=cmd_open)
    p = sub.add_parser("approve", help="an officer signs (plan digest || nonce)")
    p.add_argument("--plan", required=True)
    p.add_argument("--officer", required=True)
    p.add_argument("--key", required=True, help="the officer's Ed25519 approval key (PEM)")
    p.add_argument("--nonce", help="the run's nonce (default: read from the output directory)")
    p.add_argument("--out", help="approval file (default: OUTPUT/approvals/OFFICER.json)")
    p.set_defaults(func=cmd_approve)
    p = sub.add_parser("run", help="check the approvals and perform (or resume) the ceremony")
    p.add_argument("plan")
    p.add_argument("--env", help="environment file (module, token, PIN sources)")
    p.add_argument("--dry-run", action="store_true", help="print the steps; touch nothing")
    p.add_argument("--confirm-words", action="store_true",
                   help="ask for each region's fingerprint words even without a terminal")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("verify", help="verify a closed ceremony offline (no HSM)")
    p.add_argument("directory")
    p.add_argument("--cert", required=True, help="the primary signing certificate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("rehearse", help="run the plan against throw-away SoftHSM2 tokens, "
                                        "outputs stamped PRACTICE")
    p.add_argument("plan")
    p.add_argument("--dry-run", action="store_true", help="print the steps; touch nothing")
    p.set_defaults(func=cmd_rehearse)
    p = sub.add_parser("keygen", help="make an officer's Ed25519 approval key; prints the "
                                      "public key for the plan")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cliutil.main("ceremony", build_parser(), argv)
