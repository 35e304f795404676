"""The ``kms`` command: a regional KMS node driven from the shell (the demo's front end).

Every command starts the node from its configuration (token login, bundle import into session
objects) and stops it: the HSM holds release secrets only while a process runs.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import json
import sys
from pathlib import Path

from hsm.commands import options as cliutil
from hsm.keys.byok import OAEP_HASHES
from hsm.core.errors import UsageError

from kms.node import config as configs
from kms import key_rules
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms


def _kms(args) -> Kms:
    kms = Kms(configs.load(_config_path(args)))
    kms.start()
    if kms.store.kind == "postgresql":
        # Nodes sharing the store drop their cached DEKs of a key changed here.
        import functools

        from kms.server.invalidation import announce_once
        kms.announce = functools.partial(announce_once, kms.config.store, "cli")
    return kms


def _config_path(args) -> str:
    if not args.config:
        raise configs.ConfigError(f"kms {args.command}: --config NODE.toml is required")
    return args.config


def cmd_serve(args) -> int:
    from kms.server import supervisor
    from kms.xks import worker as xks_node   # a TOML whose only table is [xks]: an XKS proxy
    if xks_node.is_xks_only(_config_path(args)):
        return xks_node.serve(args.config, host=args.host, port=args.port, workers=args.workers)
    cfg = configs.load(_config_path(args))
    if cfg.service is None:
        raise configs.ConfigError(f"{cfg.path}: no [service] section",
                                  hint="see docs/kms.md, The service")
    s = cfg.service
    workers = args.workers if args.workers is not None else s.workers
    if not 1 <= workers <= 64:
        raise configs.ConfigError("--workers must be 1-64")
    run = xks_node.beside(cfg, args.host) if cfg.xks is not None else None   # and an XKS listener
    return supervisor.serve(cfg, host=args.host or s.host,
                            port=s.port if args.port is None else args.port, workers=workers,
                            run=run)


def cmd_audit(args) -> int:
    """Verify audit segments offline: files, or a directory's segments in writing order."""
    from kms.server import auditchain
    key = args.key
    if key is not None:
        key = key.replace(":", "").replace(" ", "").lower()
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise configs.ConfigError("--key must be the audit key's SHA-256 fingerprint, 64 hex "
                                      "digits (`hsm fingerprint --token T --key T-audit`)")
    files = auditchain.segments([Path(p) for p in args.paths])
    if not files:
        raise configs.ConfigError(f"no audit segments (audit-w*.jsonl) in {' '.join(args.paths)}")
    broken = False
    newest: dict[int, tuple[int, Path, bool]] = {}   # worker -> (k, path, signed) of its last
    for path in files:
        try:
            verdict = auditchain.verify(path, key=key)
        except OSError as exc:
            raise configs.ConfigError(f"cannot read audit log {path}: {exc.strerror}") from None
        print(verdict.line(key))
        broken |= not verdict.intact
        order = auditchain.segment_order(path)
        if order is not None and (order[0] not in newest or order[1] >= newest[order[0]][0]):
            newest[order[0]] = (order[1], path, verdict.signed)
    if key is not None:
        # Older segments are covered by the signed `previous` link of the one after them; the
        # newest is covered by nothing but its own checkpoints. A file writer who replaces it
        # with an unsigned (keyless or legacy) chain must not pass a check against the pin.
        for _, path, signed in newest.values():
            if not signed:
                print(f"{path}: the newest segment of its worker is not signed, so the pinned "
                      "key covers none of it (an unsigned chain can be rewritten by anyone who "
                      "can write the file)")
                broken = True
    return 1 if broken else 0


def cmd_init(args) -> int:
    from kms.store import Store
    cfg = configs.load(_config_path(args))
    Store.open(cfg.store).close()
    print(f"store ready: {cfg.store}")
    return 0


def cmd_import(args) -> int:
    with _kms(args) as kms:
        for line in kms.report.lines():
            print(line)
        if not kms.releases and not kms.report.refused:
            print(f"kms: error: no release bundle (bundle-*.p7) for region "
                  f"{kms.config.region!r} under {kms.config.bundle_dir}",
                  file=sys.stderr)
            return 5
        return 0 if kms.releases and not kms.report.refused else 4


def cmd_status(args) -> int:
    with _kms(args) as kms:
        status = kms.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"region {status['region']}, token {status['token']}, releases held: "
              f"{', '.join(status['releases']) or 'none'}")
        for name, why in status["refused"].items():
            print(f"  refused {name}: {why}")
        for t in status["tenants"]:
            print(f"  tenant {t['org']} ({t['type']})")
        print("  cache: " + ", ".join(
            f"{k.replace('_', ' ')} {round(v, 1) if isinstance(v, float) else v}"
            for k, v in status["cache"].items()))
    return 0


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(
        timespec="seconds")


# `tenant upload` is the deprecated name of `tenant byok-upload` (HTTP /byok-upload), kept until
# the next release; HTTP /upload is another thing: raw material, not a BYOK-wrapped secret.
_TENANT_NEEDS = {"create": ("org",), "rotate": ("org",), "byok-upload": ("org", "secret", "hash"),
                 "upload": ("org", "secret", "hash"), "destroy": ("org", "version"),
                 "list": ("org",), "export": ("org", "file"), "import": ("file",)}


def cmd_tenant(args) -> int:
    missing = [f"--{name}" for name in _TENANT_NEEDS[args.action]
               if getattr(args, name) is None]
    if missing:
        raise UsageError(f"`kms tenant {args.action}` needs {' and '.join(missing)}")
    if args.action == "create" and args.source == "ekm":
        raise UsageError("`kms tenant create` makes the first secret from the HSM; an EKM "
                         "org's keys come from its AWS KMS root key",
                         hint=f"run `kms tenant create --org {args.org} --no-secret`, then "
                              f"`kms ekm add --org {args.org} --key-id ARN`, then `kms tenant "
                              f"rotate --org {args.org} --source ekm`; nothing was made")
    if args.action == "import" and args.org is not None:
        _backup_must_be_of(Path(args.file), args.org)
    with _kms(args) as kms:
        if args.action == "create":
            kms.create_tenant(args.org, args.type)
            if args.no_secret:
                print(f"tenant {args.org} ({args.type}): no secret yet (upload, register or "
                      "rotate one)")
                return 0
            row = kms.generate_secret(args.org, args.key_type)
            print(f"tenant {args.org} ({args.type}): {row.key_type} secret v{row.version} "
                  f"{row.state}")
        elif args.action == "rotate":
            if args.source == "ekm":
                from kms.customer_keys import ekm
                row = ekm.rotate(kms, args.org, args.key_type)
            else:
                row = kms.rotate(args.org, args.key_type)
            print(f"{args.org}: {row.key_type} key v{row.version} ACTIVE ({row.source})"
                  + (", previous archived" if row.version > 1 else ""))
        elif args.action in ("byok-upload", "upload"):
            from kms.customer_keys import byok
            row = byok.upload(kms, args.org, args.key_type, Path(args.secret), Path(args.hash),
                              derivation=args.derivation, oaep=args.oaep)
            print(f"{args.org}: uploaded {row.key_type} secret v{row.version} ({row.derivation})"
                  f" ACTIVE, usable from {_when(row.usable_from)}"
                  + ("; previous archived" if row.version > 1 else ""))
        elif args.action == "destroy":
            row = kms.destroy(args.org, args.key_type, args.version)
            print(f"{args.org}: {row.key_type} secret v{row.version} DESTROYED "
                  "(wrapped material erased; cached DEKs invalidated)")
            print(f"{args.org}: the key-encryption key that wrapped it was destroyed in the HSM "
                  "now, so no copy of the store revives it; a copy of the regional token made "
                  f"before now could, until {_when(kms.clock() + key_rules.TOKEN_COPY_RETENTION)} "
                  "(token copies are kept at most "
                  f"{key_rules.TOKEN_COPY_RETENTION / key_rules.DAY:g} "
                  "days: docs/store.md)")
            from kms.node import advice
            if not advice.has_active(kms, args.org, args.key_type):
                print(f"kms: warning: {args.org} has no ACTIVE {args.key_type} key now: "
                      f"encryption is refused until it has one; "
                      + advice.next_key(kms, args.org, args.key_type), file=sys.stderr)
        elif args.action == "list":
            for row in kms.secrets(args.org):
                print(f"{row.key_type:<9} v{row.version:<3} {row.state:<9} {row.source:<8} "
                      f"{row.derivation:<6} release {row.release} created {_when(row.created_at)}"
                      f" usable {_when(row.usable_from)}")
        elif args.action == "export":
            path = kms.export_backup(args.org, Path(args.file))
            print(f"backup of {args.org} written to {path} (encrypted in the HSM)")
        elif args.action == "import":
            org = kms.import_backup(Path(args.file))
            print(f"backup of {org} imported")
    return 0


def _backup_must_be_of(path: Path, org: str) -> None:
    """`tenant import --org X` restores X or nothing: the backup names its org in the clear
    (bound to its ciphertext, so the HSM refuses an edited one on import)."""
    from suite.files import read_regular
    try:
        named = json.loads(read_regular(path, 64 << 20, what="tenant backup")).get("org")
    except (OSError, ValueError, AttributeError):
        return  # not readable as a backup: the import itself says why
    if named != org:
        raise UsageError(f"backup {path} is of org {named!r}, not --org {org!r}",
                         hint="give the backup of that org, or leave --org out; nothing was "
                              "imported")


def cmd_ekm(args) -> int:
    from kms.customer_keys import ekm
    if args.action == "policy":
        # Needs no node: the document is computed from the arguments alone.
        missing = [f"--{n.replace('_', '-')}" for n in ("org", "principal", "key_arn")
                   if getattr(args, n) is None]
        if missing:
            raise UsageError(f"`kms ekm policy` needs {' and '.join(missing)}")
        print(json.dumps(ekm.policy_document(args.org, args.principal, args.key_arn), indent=2))
        return 0
    if args.org is None or args.key_id is None:
        raise UsageError("`kms ekm add` needs --org and --key-id")
    with _kms(args) as kms:
        spec = ekm.register(kms, args.org, args.key_id, endpoint_url=args.endpoint_url,
                            aws_region=args.aws_region, ca_bundle=args.ca_bundle)
    print(f"{args.org}: EKM root key {spec['key_id']} registered (region {spec['aws_region']}); "
          "`kms tenant rotate --source ekm` makes a key under it")
    return 0


def cmd_byok(args) -> int:
    from kms.customer_keys import byok
    if args.action == "wrap":      # the customer's side: no node, no HSM
        if args.cert is None or args.out is None or (args.generate == (args.input is not None)):
            raise UsageError("`kms byok wrap` needs --cert, --out and one of --generate / --in")
        secret = None if args.generate else byok.read_secret_file(Path(args.input))
        from kms.customer_keys.byok_pins import default_path
        pinning = byok.Pinning(Path(args.pin_file) if args.pin_file else default_path(),
                               org=args.org, accept=args.accept_new_key)
        a, b = byok.wrap(Path(args.cert), Path(args.out), secret=secret, hash_name=args.oaep,
                         pinning=pinning)
        print(f"wrote {a} and {b} (RSA-OAEP {args.oaep}); upload both with "
              "`kms tenant byok-upload`")
        return 0
    if args.org is None or args.out is None:
        raise UsageError("`kms byok certificate` needs --org and --out")
    with _kms(args) as kms:
        info = byok.certificate(kms, args.org, Path(args.out), purpose=args.purpose)
    print(f"{args.org}: BYOK {args.purpose} certificate written to {args.out} (key "
          f"{info['label']}, SPKI SHA-256 {info['spki_sha256']}, read from the token: give it "
          f"to the customer out of band, `kms byok wrap` pins it); signed by the regional "
          f"issuer, SPKI SHA-256 {info['issuer_sha256']}")
    return 0


def cmd_cache_only(args) -> int:
    from kms.customer_keys import cache_only
    with _kms(args) as kms:
        row = cache_only.register(kms, args.org, args.key_type, args.url, args.kid,
                                 client_cert=args.client_cert, client_key=args.client_key,
                                 ca=args.ca, basic_auth_env=args.basic_auth_env)
    print(f"{args.org}: {row.key_type} key v{row.version} ACTIVE is cache-only (kid {args.kid} "
          f"at {args.url})" + ("; previous archived" if row.version > 1 else ""))
    return 0


def cmd_keyservice(args) -> int:
    from kms.customer_keys import reference_service
    for name in ("keys", "cert", "key"):
        if not Path(getattr(args, name)).exists():
            raise UsageError(f"--{name} {getattr(args, name)} does not exist")
    reference_service.serve(Path(args.keys), Path(args.cert), Path(args.key), port=args.port,
                     client_ca=Path(args.client_ca) if args.client_ca else None)
    return 0


def cmd_encrypt(args) -> int:
    with _kms(args) as kms:
        sdk = FieldEncryptor(kms)
        data = args.text.encode() if args.text is not None else sys.stdin.buffer.read()
        print(base64.b64encode(sdk.encrypt(args.org, data, key_type=args.key_type)).decode())
    return 0


def cmd_decrypt(args) -> int:
    with _kms(args) as kms:
        sdk = FieldEncryptor(kms)
        text = args.blob if args.blob is not None else sys.stdin.read()
        try:
            blob = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("the ciphertext is not base64 (what `kms encrypt` prints)") from None
        sys.stdout.buffer.write(sdk.decrypt(args.org, blob) + b"\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliutil.parser("kms", __doc__.splitlines()[0])
    parser.add_argument("--config", help="the node's KMS configuration (TOML); every command "
                        "but `audit`, `ekm policy` and `byok wrap` (customer side) need it")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create or migrate the store").set_defaults(func=cmd_init)
    sub.add_parser("import", help="import the release bundles; report refusals").set_defaults(
        func=cmd_import)
    p = sub.add_parser("status", help="releases held, tenants, cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("tenant", help="tenant secrets")
    p.add_argument("action", choices=["create", "rotate", "byok-upload", "upload", "destroy",
                                      "list", "export", "import"],
                   help="byok-upload: a secret wrapped by `kms byok wrap` (`upload` is its "
                        "deprecated name, kept until the next release)")
    p.add_argument("--org")
    p.add_argument("--type", default="production", help="org type (create)")
    p.add_argument("--key-type", default=key_rules.KEY_TYPES[0], choices=key_rules.KEY_TYPES)
    p.add_argument("--version", type=int)
    p.add_argument("--file", help="backup file (export/import)")
    p.add_argument("--no-secret", action="store_true",
                   help="create: no HSM secret (the first key comes from the customer)")
    p.add_argument("--source", choices=["hsm", "ekm"], default="hsm",
                   help="rotate: where the new key comes from")
    p.add_argument("--secret", help="byok-upload: secret.b64 from `kms byok wrap`")
    p.add_argument("--hash", help="byok-upload: secret.sha256.b64 from `kms byok wrap`")
    p.add_argument("--derivation", choices=key_rules.DERIVATIONS, default="PBKDF2",
                   help="byok-upload: PBKDF2 (a tenant secret) or NONE (the DEK itself)")
    p.add_argument("--oaep", choices=tuple(OAEP_HASHES), default="sha1",
                   help="byok-upload: the OAEP hash the secret was wrapped with")
    p.set_defaults(func=cmd_tenant)
    p = sub.add_parser("byok", help="BYOK: per-org certificates (KMS) and wrapping (customer)")
    p.add_argument("action", choices=["certificate", "wrap"])
    p.add_argument("--org", help="certificate: the org; wrap: the org you expect the "
                   "certificate to be for (default: the one it names)")
    p.add_argument("--purpose", choices=["seed", "dek"], default="seed",
                   help="certificate: seed (PBKDF2 uploads, cache-only keys) or dek (NONE)")
    p.add_argument("--out", help="certificate: the PEM file; wrap: the output directory")
    p.add_argument("--cert", help="wrap: the org's BYOK certificate (PEM)")
    p.add_argument("--generate", action="store_true", help="wrap: a fresh secret (OS CSPRNG)")
    p.add_argument("--in", dest="input", help="wrap: a file with your 32-byte secret")
    p.add_argument("--oaep", choices=tuple(OAEP_HASHES), default="sha1",
                   help="wrap: RSA-OAEP hash (MGF1 the same); default SHA-1")
    p.add_argument("--pin-file", default=None, help="wrap: the file of pinned BYOK keys "
                   "(default: $HSM_SUITE_BYOK_PINS, else "
                   "$XDG_CONFIG_HOME/hsm-suite/byok-pins.json)")
    p.add_argument("--accept-new-key", default=None, metavar="SHA256",
                   help="wrap: accept (and pin) a different key for the org, named by the exact "
                        "SPKI SHA-256 `kms byok certificate` printed")
    p.set_defaults(func=cmd_byok)
    p = sub.add_parser("cache-only", help="cache-only keys: the DEK hosted by the customer")
    p.add_argument("action", choices=["add"])
    p.add_argument("--org", required=True)
    p.add_argument("--key-type", default=key_rules.KEY_TYPES[0], choices=key_rules.KEY_TYPES)
    p.add_argument("--url", required=True, help="the key service's base URL (https://...)")
    p.add_argument("--kid", required=True)
    p.add_argument("--client-cert")
    p.add_argument("--client-key")
    p.add_argument("--ca", help="CA file to verify the key service's certificate")
    p.add_argument("--basic-auth-env", help="environment variable holding USER:PASSWORD")
    p.set_defaults(func=cmd_cache_only)
    p = sub.add_parser("keyservice", help="the reference customer key service (cache-only)")
    p.add_argument("action", choices=["serve"])
    p.add_argument("--keys", required=True, help="directory of <kid>.dek and <kid>.pem")
    p.add_argument("--cert", required=True, help="TLS server certificate (PEM)")
    p.add_argument("--key", required=True, help="TLS server private key (PEM)")
    p.add_argument("--client-ca", help="require client certificates issued by this CA")
    p.add_argument("--port", type=int, default=8443)
    p.set_defaults(func=cmd_keyservice)
    p = sub.add_parser("ekm", help="External Key Management: the root key in the customer's "
                                   "AWS KMS")
    p.add_argument("action", choices=["policy", "add"])
    p.add_argument("--org")
    p.add_argument("--principal", help="policy: the regional KMS's IAM principal ARN")
    p.add_argument("--key-arn", help="policy: the customer's key ARN")
    p.add_argument("--key-id", help="add: the customer's key ARN")
    p.add_argument("--endpoint-url", help="add: AWS KMS endpoint (default: AWS's own)")
    p.add_argument("--aws-region", help="add: default the ARN's region")
    p.add_argument("--ca-bundle", help="add: CA file to verify the endpoint's TLS certificate")
    p.set_defaults(func=cmd_ekm)
    p = sub.add_parser("encrypt", help="encrypt a field for an org (prints base64)")
    p.add_argument("--org", required=True)
    p.add_argument("--key-type", default=key_rules.KEY_TYPES[0], choices=key_rules.KEY_TYPES)
    p.add_argument("text", nargs="?")
    p.set_defaults(func=cmd_encrypt)
    p = sub.add_parser("decrypt", help="decrypt a base64 blob for an org")
    p.add_argument("--org", required=True)
    p.add_argument("blob", nargs="?")
    p.set_defaults(func=cmd_decrypt)
    p = sub.add_parser("serve", help="run the node as the mTLS JSON service ([service])")
    p.add_argument("--host", help="listen address (default: service.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: service.port; 0 = any)")
    p.add_argument("--workers", type=int, help="worker processes (default: service.workers)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("audit", help="check audit segments offline: chain and signed checkpoints")
    p.add_argument("action", choices=["verify"])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="segment files, or an audit directory (every segment in it)")
    p.add_argument("--key", default=None, metavar="FINGERPRINT",
                   help="the region's audit key fingerprint (SHA-256 hex, as `hsm fingerprint "
                        "--key TOKEN-audit` prints): checkpoints by any other key are refused")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cliutil.main("kms", build_parser(), argv)
