"""The ``hsm`` command: initialise tokens, provision primary and regional HSMs, inspect tokens.

Errors print one line on stderr and exit non-zero; ``--debug`` shows the traceback. PINs come
from ``--pin-source`` (env:VAR, file:PATH), ``HSM_PIN``/``HSM_SO_PIN``, a PKCS#11 URI's
pin-source, or a prompt; they are never printed or logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hsm.core import module as modules
from hsm.core import pin as pins
from hsm.core import softhsm
from hsm.core.errors import HsmError, TokenNotFound, UsageError
from hsm.core.token import KeyRef, Token
from hsm.keys import provision
from hsm.keys import x509 as certs
from hsm.keys.roles import DEFAULT_SIGNING, SIGNING_ROLES
from suite import fingerprint as fp

from . import options


def _add_token_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--token", required=required, metavar="LABEL|URI",
                   help="token label, or a PKCS#11 URI "
                        "(pkcs11:token=...;serial=...?pin-source=...)")
    p.add_argument("--serial", help="select the token by serial as well")
    options.add_module_args(p)
    p.add_argument("--pin-source", default=None, metavar="env:VAR|file:PATH",
                   help="where the user PIN comes from (default: $HSM_PIN_<LABEL>, the label "
                        "upper-cased with '-' as '_', else $HSM_PIN, else a prompt)")


def _open_token(args, *, login: bool = True) -> Token:
    return options.open_token(args, login=login)


def _progress(message: str) -> None:
    """What a long operation is doing, as it starts (stdout, before the result; stderr stays
    the one line of an error)."""
    print(message, flush=True)


def _print_outcomes(outcomes) -> None:
    for outcome in outcomes:
        print("\n".join(outcome.lines()))


# ------------------------------------------------------------------------------ commands
def cmd_init_token(args) -> int:
    """C_InitToken and C_InitPIN in this process, on every module: the PINs never appear on a
    command line (``softhsm2-util --pin`` would show them in /proc/PID/cmdline)."""
    label = args.label
    if not label.strip() or len(label.encode("utf-8")) > 32 or label != label.strip():
        raise UsageError(f"bad token label {label!r}",
                         hint="1 to 32 bytes, no leading or trailing blanks")
    module = options.module_of(args)
    real = modules.resolve(module)
    mod = modules.load(module, args.module_params)
    from hsm.core.token import find_token
    try:
        find_token(mod, label=label)
        print(f"token {label!r} already exists; nothing done"
              + (" (`make clean` removes the demo tokens)"
                 if real == modules.resolve(modules.DEFAULT_MODULE) else ""))
        return 0
    except TokenNotFound:
        pass
    so_pin = pins.resolve(args.so_pin_source, default_env="HSM_SO_PIN", token_label=label,
                          prompt=f"New SO PIN for token {label}: ")
    user_pin = pins.resolve(args.pin_source, default_env="HSM_PIN", token_label=label,
                            prompt=f"New user PIN for token {label}: ")
    # SoftHSM2 always offers a spare slot; other modules only if they have an uninitialised
    # one. A hardware HSM is normally initialised with its vendor's tool: say so.
    try:
        softhsm.init_token_in_process(mod, label, so_pin, user_pin)
    except HsmError as exc:
        if real == modules.resolve(modules.DEFAULT_MODULE):
            raise
        raise HsmError(f"cannot initialise a token with {real}: {exc}",
                       hint="initialise it with the vendor's tool (NSS: certutil -N -d sql:DIR; "
                            "hardware HSMs: their admin utility), then use --token LABEL") from exc
    where = (f"SoftHSM2, {os.environ.get('SOFTHSM2_CONF')}"
             if real == modules.resolve(modules.DEFAULT_MODULE) else real)
    print(f"token {label!r} initialised with C_InitToken ({where})")
    return 0


def cmd_init_primary(args) -> int:
    with _open_token(args) as token:
        outcomes = provision.init_primary(token, Path(args.out), signing=args.signing,
                                          organization=args.org,
                                          allow_weak_token=args.allow_weak_token,
                                          progress=_progress)
    _print_outcomes(outcomes)
    return 0


def cmd_init_regional(args) -> int:
    with _open_token(args) as token:
        outcome = provision.init_regional(token, args.region, Path(args.out),
                                          allow_weak_token=args.allow_weak_token,
                                          progress=_progress)
        audit_key, _ = provision.init_audit_key(token, allow_weak_token=args.allow_weak_token)
    _print_outcomes([outcome, audit_key])
    print("Read the encryption key's fingerprint to the primary officer; they type it into "
          "`hsm certify-regional`. Keep the audit key's fingerprint with the region's records: "
          "`kms audit verify --key` checks the audit log against it.")
    return 0


def cmd_certify_regional(args) -> int:
    request = provision.read_request(Path(args.request))
    digest = bytes.fromhex(request["fingerprint_sha256"])
    print(f"Request for region {request['region']!r}, token {request['token_label']!r} "
          f"(serial {request['token_serial']}), key {request['key_label']!r}")
    confirmed = options.confirm_fingerprint(digest, args.fingerprint,
                                            "read on the regional console")
    with _open_token(args) as token:
        outcome = provision.certify_regional(token, Path(args.request), Path(args.out),
                                             confirmed_fingerprint=confirmed,
                                             organization=args.org)
    _print_outcomes([outcome])
    return 0


def cmd_fingerprint(args) -> int:
    with _open_token(args) as token:
        from pkcs11 import ObjectClass
        parsed = options.token_target(args)[3]
        label = args.key or (parsed.object if parsed else None) or f"{token.label}-encryption"
        spki = certs.public_key_info(token, KeyRef(label, ObjectClass.PUBLIC_KEY))
        digest = certs.fingerprint(spki)
    if args.hex_only:
        print(digest.hex())
        return 0
    print(f"{label}:")
    print("\n".join(fp.display(digest)))
    return 0


def cmd_retrust(args) -> int:
    """Re-create a trusted recipient made before trusted keys had a CKA_WRAP_TEMPLATE (a key
    cannot gain one): as the SO, after the officer confirms the key's fingerprint."""
    from pkcs11 import ObjectClass

    from hsm.keys import export
    with options.open_so(args) as so:
        spki = certs.public_key_info(so, KeyRef(args.label, ObjectClass.PUBLIC_KEY))
        print(f"Trusted key {args.label!r} on token {so.label!r}:")
        confirmed = options.confirm_fingerprint(
            certs.fingerprint(spki), args.fingerprint,
            "from the region's certificate or console (or this primary's encryption key)")
        status = export.retrust(so, args.label, confirmed)
    print(f"{args.label}: " + ("re-created by the security officer with its wrap template "
                               "(release secrets only)" if status == "re-created" else
                               "already carries its wrap template; nothing changed"))
    return 0


def cmd_info(args) -> int:
    with _open_token(args, login=not args.no_login) as token:
        prof = token.profile
        objects = _list_objects(token) if args.objects else None
    if args.json:
        data = json.loads(prof.to_json())
        if objects is not None:
            data["objects"] = objects
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"Token      {prof.token_label} (serial {prof.token_serial}, model {prof.token_model})")
    print(f"Library    {prof.library}")
    print(f"OAEP       {', '.join(prof.oaep_hashes) or 'unusable'}   (preferred: "
          f"{prof.oaep_hashes and prof.oaep_choice()[0] or '-'})")
    print(f"AES wrap   KWP: {'0x%x' % prof.aes_kwp if prof.aes_kwp else 'no'}   "
          f"RFC 3394: {'yes' if prof.aes_key_wrap else 'no'}   "
          f"RSA_AES_KEY_WRAP: {'yes' if prof.rsa_aes_key_wrap else 'no'}")
    print(f"KDFs       HKDF: {_yn(prof.hkdf)}   SP800-108: {_yn(prof.sp800_108)}   "
          f"PBKDF2: {_yn(prof.pbkdf2)}")
    print(f"Trusted    CKA_WRAP_WITH_TRUSTED enforced: {_yn(prof.trusted_wrap_enforced)}   "
          f"CKA_WRAP_TEMPLATE enforced: {_yn(prof.wrap_template_enforced)}")
    print(f"Policy     enforced: CKA_UNWRAP_TEMPLATE {_yn(prof.unwrap_template_enforced)}   "
          f"CKA_ALLOWED_MECHANISMS {_yn(prof.allowed_mechanisms_enforced)}   "
          f"CKA_MODIFIABLE {_yn(prof.modifiable_enforced)}   "
          f"CKA_DESTROYABLE {_yn(prof.destroyable_enforced)}")
    missing = prof.missing_enforcement()
    print("           " + ("production keys may be provisioned here" if not missing else
                           "production keys are refused here (not enforced: "
                           + ", ".join(missing) + ")"))
    print(f"ECDSA      with hash on token: {_yn(prof.ecdsa_with_hash)}")
    for note in prof.notes:
        print(f"Note       {note}")
    print(f"\n{'mechanism':<32} {'code':>10} {'min':>6} {'max':>6}  flags")
    for entry in sorted(prof.mechanisms.values(), key=lambda e: e.code):
        print(f"{entry.name:<32} {entry.code:>#10x} {entry.min_key or '':>6} "
              f"{entry.max_key or '':>6}  {' '.join(entry.flags)}")
    if objects is not None:
        print(f"\n{'class':<12} {'label':<32} id")
        for obj in objects:
            print(f"{obj['class']:<12} {obj['label']:<32} {obj['id']}")
    return 0


def cmd_audit(args) -> int:
    """Every token object, its attributes, and each deviation from its role's policy; exit 1
    when there is one (so a script or a monitoring job can alert on it)."""
    from hsm import inventory
    from hsm.keys import attributes, export
    with _open_token(args) as token:
        rows = inventory.audit(token)
        label = token.label
    bad = sum(1 for r in rows if r.deviations)
    if args.json:
        print(json.dumps({"token": label, "objects": inventory.as_json(rows),
                          "deviations": bad}, indent=2))
        return 1 if bad else 0
    print(f"{'class':<12} {'label':<36} {'role':<28} status")
    for r in rows:
        status = "ok" if r.role != "unrecognised" and not r.deviations else (
            f"{len(r.deviations)} deviation(s)" if r.deviations else "-")
        print(f"{r.object_class:<12} {r.label:<36} {r.role:<28} {status}")
        for d in r.deviations:
            print(f"    ! {d}")
        if r.role == attributes.TRUSTED_RECIPIENT.name and \
                export.only_wrap_template_missing(r.deviations):
            print(f"    -> made before wrap templates: the SO re-creates it with `hsm retrust "
                  f"--token {label} --label {r.label} --fingerprint HEX` (HEX: the SPKI SHA-256 "
                  "of its certificate), or the next ceremony does")
    print(f"\n{len(rows)} object(s), {bad} with deviations from policy"
          + ("" if not bad else " - keys cannot be fixed in place: re-provision them, "
             "or re-create a trusted key as shown"))
    return 1 if bad else 0


def cmd_xks_create(args) -> int:
    from hsm.keys import xks
    encrypt, decrypt = xks.parse_usage(args.usage)
    xks.label_of(args.id)       # a bad id stops before the PIN prompt
    with _open_token(args) as token:
        key, status = xks.create(token, args.id, encrypt=encrypt, decrypt=decrypt,
                                 allow_weak_token=args.allow_weak_token)
    print(f"XKS key {key.key_id!r} {status}: AES-256, label {key.ref.label!r}, usage "
          f"{','.join(key.usage) or 'none'}")
    return 0


def cmd_xks_list(args) -> int:
    from hsm.keys import xks
    with _open_token(args) as token:
        keys = [xks.describe(token, key_id) for key_id in xks.list_keys(token)]
    for key in keys:
        print(f"{key.key_id:<40} {','.join(key.usage) or 'none'}")
    return 0


def _yn(value) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def _list_objects(token: Token) -> list[dict]:
    """Class, label and CKA_ID of every token object (the audit's reader: a data object, such as
    a release record, has no CKA_ID)."""
    from hsm import inventory
    return [{"class": r.object_class, "label": r.label, "id": r.id}
            for r in inventory.audit(token)]


# ------------------------------------------------------------------------------ parser
def _add_weak_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-weak-token", action="store_true",
                   help="rehearsal only: provision even if the token does not enforce the key "
                        "policy (a loud warning is printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("hsm", __doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log each token operation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-token", help="create a token (C_InitToken in-process)")
    p.add_argument("--label", required=True)
    options.add_module_args(p)
    p.add_argument("--so-pin-source", default=None, metavar="env:VAR|file:PATH",
                   help="SO PIN source (default: $HSM_SO_PIN_<LABEL>, else $HSM_SO_PIN, else a "
                        "prompt)")
    p.add_argument("--pin-source", default=None, metavar="env:VAR|file:PATH",
                   help="user PIN source (default: $HSM_PIN_<LABEL>, else $HSM_PIN, else a "
                        "prompt)")
    p.set_defaults(func=cmd_init_token)

    p = sub.add_parser("init-primary", help="signing + encryption key pairs and certificates")
    _add_token_args(p)
    p.add_argument("--out", required=True, help="directory for the certificates")
    p.add_argument("--signing", default=DEFAULT_SIGNING, choices=sorted(SIGNING_ROLES))
    p.add_argument("--org", default=provision.DEFAULT_ORG, help="organisation in the subjects")
    _add_weak_arg(p)
    p.set_defaults(func=cmd_init_primary)

    p = sub.add_parser("init-regional", help="regional encryption key pair + certification request")
    _add_token_args(p)
    p.add_argument("--region", required=True)
    p.add_argument("--out", required=True, help="directory for the request file")
    _add_weak_arg(p)
    p.set_defaults(func=cmd_init_regional)

    p = sub.add_parser("certify-regional", help="issue a regional certificate from a request")
    _add_token_args(p)
    p.add_argument("--request", required=True, help="the regional side's .request.json")
    p.add_argument("--out", required=True, help="directory holding the primary certificates")
    p.add_argument("--fingerprint", default=None,
                   help="the fingerprint read on the regional console (hex or PGP words)")
    p.add_argument("--org", default=provision.DEFAULT_ORG)
    p.set_defaults(func=cmd_certify_regional)

    p = sub.add_parser("fingerprint", help="SHA-256 fingerprint of a public key on a token")
    _add_token_args(p)
    p.add_argument("--key", default=None, help="public key label (default: the URI's object, "
                   "else TOKEN-encryption)")
    p.add_argument("--hex-only", action="store_true", help="print only the hex digest")
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("retrust", help="re-create a trusted key made before wrap templates "
                       "(SO PIN, after its fingerprint is confirmed)")
    _add_token_args(p)
    p.add_argument("--label", required=True, help="trusted-REGION or trusted-escrow")
    p.add_argument("--fingerprint", default=None,
                   help="SHA-256 of the key's SPKI from an independent source (hex or words)")
    p.add_argument("--so-pin-source", default=None, metavar="env:VAR|file:PATH",
                   help="SO PIN source (default: $HSM_SO_PIN, else a prompt)")
    p.set_defaults(func=cmd_retrust)

    p = sub.add_parser("info", help="the token's capability profile")
    _add_token_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--objects", action="store_true", help="also list the token objects")
    p.add_argument("--no-login", action="store_true", help="do not log in (public view)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("audit", help="every object, its attributes and deviations from policy")
    _add_token_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_audit)

    from hsm.cloud import cli as cloud_cli
    cloud_cli.register(sub, _add_token_args, _add_weak_arg, _open_token)
    p = sub.add_parser("xks-key", help="AWS KMS external key store keys: create, list")
    xks = p.add_subparsers(dest="xks_command", required=True)
    c = xks.add_parser("create", help="an AES-256 XKS key, generated in the token")
    _add_token_args(c)
    c.add_argument("--id", required=True, help="the externalKeyId AWS KMS will use")
    c.add_argument("--usage", default="encrypt,decrypt",
                   help="encrypt,decrypt (default) | encrypt | decrypt | none")
    _add_weak_arg(c)
    c.set_defaults(func=cmd_xks_create)
    c = xks.add_parser("list", help="the XKS keys on the token and their usage")
    _add_token_args(c)
    c.set_defaults(func=cmd_xks_list)
    return parser


def _logging(args) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    return options.main("hsm", build_parser(), argv, before=_logging)
