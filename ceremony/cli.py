"""The ``ceremony`` command: plan, open, approve, run, countersign, verify, rehearse, keygen.

A ceremony is run in four moves so approvals bind to *this* run and the release to its
officers: ``ceremony open PLAN`` draws a fresh nonce and prints it with the plan digest; each
crypto officer runs ``ceremony approve``; ``ceremony run PLAN`` checks the quorum, performs the
steps and shows the release digest; each officer then runs ``ceremony countersign``, which adds
their signature to every bundle (regions accept a release only with M officers they pin).
``ceremony verify`` checks the outputs offline, with no HSM. Officers' keys live on their own
tokens (``--token URI``); key files (``--key``) are for rehearsals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from hsm.commands import options
from hsm.core.errors import UsageError
from hsm.keys import attributes, export
from suite import fingerprint as fp
from suite.files import write_new

from . import approvals, environment, officers
from . import plan as plans
from . import runner
from .errors import ApprovalError
from .transcript import Transcript

STEP_DETAILS = {
    "open": "draw a 256-bit nonce; journal plan digest, officers, quorum",
    "approvals": "verify >= M officer approvals (ECDSA, on the officers' tokens) over "
                 "(plan digest || nonce) from crypto officers",
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
                      + attributes.describe_template(attributes.RELEASE_RECORD.attributes)
                      + "} (not in practice runs)",
    "close": "journal the summary and the release digest (SHA-256 over every manifest); the "
             "primary signing key signs the transcript head; the digest is shown for the "
             "officers' countersignatures (`ceremony countersign`, after the run)",
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
                "session object {" + attributes.describe_template(attributes.ESCROW_UNWRAP_TEMPLATE)
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
    for o in p.crypto_officers:
        spki = approvals.spki_of(o.approval_key)
        print(f"Officer {o.name}: key SHA-256(SPKI) {fp.to_hex(hashlib.sha256(spki).digest())}")
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
    with officers.signer_of(args) as signer:
        approval = approvals.sign(p, nonce, args.officer, signer=signer)
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
    from release import quorum

    from .verify import verify_directory
    result = verify_directory(Path(args.directory), Path(args.cert),
                              quorum.load(Path(args.officers)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"OK: ceremony {result['ceremony_id']}, {result['records']} records, "
              f"{len(result['bundles'])} bundles verified"
              + (f", resumed {result['resumed']}x" if result["resumed"] else "")
              + (" (PRACTICE)" if result["practice"] else ""))
        signed = sorted({n for names in result["officers"].values() for n in names})
        print(f"    countersigned by {', '.join(signed)} (officers pinned in {args.officers})")
    return 0


def cmd_countersign(args) -> int:
    from .countersign import countersign, release_digest_of
    directory, cert = Path(args.directory), Path(args.cert)
    digest, names = release_digest_of(directory, cert)
    print(f"Ceremony {directory}: {len(names)} bundles ({', '.join(names)})")
    if not args.digest and not (sys.stdin is not None and sys.stdin.isatty()):
        raise UsageError("no release digest confirmed", hint="pass --digest HEX|WORDS: the "
                         "release digest the ceremony showed at its close, as you noted it")
    confirmed = options.confirm_fingerprint(digest, args.digest,
                                            "the ceremony showed at its close")
    with officers.signer_of(args) as signer:
        outcomes = countersign(directory, cert, signer, args.officer, confirmed)
    for o in outcomes:
        print(f"  {o.bundle}: {o.status} by {args.officer}")
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
    if bool(args.out) == bool(args.token):
        raise UsageError("give exactly one of --token URI (the officer's own token) or --out "
                         "FILE (a key file, for rehearsals)")
    curve = {"p256": "secp256r1", "p384": "secp384r1"}[args.curve]
    if args.out:
        spki = officers.new_key_file(Path(args.out), args.curve)
    else:
        from hsm.keys import officer
        token = options.open_token(args, pin_prompt="Officer token PIN: ")
        try:
            parsed = options.token_target(args)[3]
            label = parsed.object if parsed is not None and parsed.object else \
                officer.DEFAULT_LABEL
            spki = officer.generate(token, label, curve=curve,
                                    allow_weak_token=args.allow_weak_token)
        finally:
            token.close()
    print(officers.describe(spki), end="")
    return 0


def _add_signer_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--officer", required=True)
    p.add_argument("--token", metavar="URI", help=f"the officer's token (RFC 7512 URI, e.g. "
                   f"pkcs11:token=alice;object=ceremony-officer?pin-source=file:PIN): {what} "
                   "is made inside it")
    p.add_argument("--serial", help="select the token by serial as well")
    options.add_module_args(p)
    p.add_argument("--pin-source", metavar="env:VAR|file:PATH",
                   help="the officer token's PIN (default: $HSM_PIN_<LABEL>, else a prompt)")
    p.add_argument("--key", help="an officer key file instead of a token (rehearsals)")


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("ceremony", __doc__.splitlines()[0])
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
    _add_signer_args(p, "the approval")
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
    p.add_argument("--officers", required=True, metavar="TOML",
                   help="the pinned officer sets ([[officers]]): a pins file or a KMS node "
                        "configuration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("countersign", help="an officer signs every bundle of a closed "
                                           "ceremony (no primary HSM needed)")
    p.add_argument("directory")
    p.add_argument("--cert", required=True, help="the primary signing certificate")
    p.add_argument("--digest", metavar="HEX|WORDS",
                   help="the release digest the ceremony showed at its close (asked for at a "
                        "terminal otherwise)")
    _add_signer_args(p, "the signature")
    p.set_defaults(func=cmd_countersign)
    p = sub.add_parser("rehearse", help="run the plan against throw-away SoftHSM2 tokens, "
                                        "outputs stamped PRACTICE")
    p.add_argument("plan")
    p.add_argument("--dry-run", action="store_true", help="print the steps; touch nothing")
    p.set_defaults(func=cmd_rehearse)
    p = sub.add_parser("keygen", help="make an officer's ECDSA key in their token (or a file, "
                                      "for rehearsals); prints the public key for the plan and "
                                      "its fingerprint for the regions")
    p.add_argument("--token", metavar="URI", help="generate inside this token (RFC 7512 URI; "
                   "object=LABEL names the key, default ceremony-officer)")
    p.add_argument("--serial", help="select the token by serial as well")
    options.add_module_args(p)
    p.add_argument("--pin-source", metavar="env:VAR|file:PATH",
                   help="the officer token's PIN (default: $HSM_PIN_<LABEL>, else a prompt)")
    p.add_argument("--allow-weak-token", action="store_true",
                   help="a token that does not enforce the key policy (rehearsals only)")
    p.add_argument("--out", help="a key file instead (rehearsals)")
    p.add_argument("--curve", choices=("p256", "p384"), default="p256")
    p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    return options.main("ceremony", build_parser(), argv)
