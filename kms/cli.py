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

from hsm import cliutil
from hsm.errors import UsageError

from . import config as configs
from .sdk import FieldEncryptor
from .service import Kms


def _kms(args) -> Kms:
    kms = Kms(configs.load(_config_path(args)))
    kms.start()
    return kms


def _config_path(args) -> str:
    if not args.config:
        raise configs.ConfigError(f"kms {args.command}: --config NODE.toml is required")
    return args.config


def _announce(kms, op: str, org: str, key_type: str, version: int | None = None) -> None:
    """Nodes sharing a PostgreSQL store drop their cached DEKs of a key changed here."""
    if kms.store.kind == "postgresql":
        from .invalidation import Publisher
        pub = Publisher(kms.config.store, name="cli")
        pub.announce(op, org, key_type, version)
        pub.close()


def cmd_serve(args) -> int:
    from .server import supervisor
    cfg = configs.load(_config_path(args))
    if cfg.service is None:
        raise configs.ConfigError(f"{cfg.path}: no [service] section",
                                  hint="see README, The KMS service")
    s = cfg.service
    workers = args.workers if args.workers is not None else s.workers
    if not 1 <= workers <= 64:
        raise configs.ConfigError("--workers must be 1-64")
    return supervisor.serve(cfg, host=args.host or s.host,
                            port=s.port if args.port is None else args.port, workers=workers)


def cmd_audit(args) -> int:
    from .server import audit
    try:
        count, why = audit.verify(Path(args.file))
    except OSError as exc:
        raise configs.ConfigError(f"cannot read audit log {args.file}: {exc.strerror}") from None
    if why is not None:
        print(f"{args.file}: chain broken at {why}")
        return 1
    print(f"{args.file}: {count} records, chain intact")
    return 0


def cmd_init(args) -> int:
    from .store import Store
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


_TENANT_NEEDS = {"create": ("org",), "rotate": ("org",), "destroy": ("org", "version"),
                 "list": ("org",), "export": ("org", "file"), "import": ("file",)}


def cmd_tenant(args) -> int:
    missing = [f"--{name}" for name in _TENANT_NEEDS[args.action]
               if getattr(args, name) is None]
    if missing:
        raise UsageError(f"`kms tenant {args.action}` needs {' and '.join(missing)}")
    with _kms(args) as kms:
        if args.action == "create":
            kms.create_tenant(args.org, args.type)
            row = kms.generate_secret(args.org, args.key_type)
            print(f"tenant {args.org} ({args.type}): {row.key_type} secret v{row.version} "
                  f"{row.state}")
        elif args.action == "rotate":
            row = kms.rotate(args.org, args.key_type)
            _announce(kms, "rotate", args.org, args.key_type)
            print(f"{args.org}: {row.key_type} secret v{row.version} ACTIVE, previous archived")
        elif args.action == "destroy":
            row = kms.destroy(args.org, args.key_type, args.version)
            _announce(kms, "destroy", args.org, args.key_type, args.version)
            print(f"{args.org}: {row.key_type} secret v{row.version} DESTROYED "
                  "(wrapped material erased; cached DEKs invalidated)")
        elif args.action == "list":
            for row in kms.store.secrets(args.org):
                print(f"{row.key_type:<9} v{row.version:<3} {row.state:<9} {row.source:<8} "
                      f"{row.derivation:<6} release {row.release} created {_when(row.created_at)}"
                      f" usable {_when(row.usable_from)}")
        elif args.action == "export":
            path = kms.export_backup(args.org, Path(args.file))
            print(f"backup of {args.org} written to {path} (encrypted in the HSM)")
        elif args.action == "import":
            org = kms.import_backup(Path(args.file))
            _announce(kms, "import", org, None)
            print(f"backup of {org} imported")
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
    parser = argparse.ArgumentParser(prog="kms", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--config", help="the node's KMS configuration (TOML); every command "
                        "but `audit` needs it")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create or migrate the store").set_defaults(func=cmd_init)
    sub.add_parser("import", help="import the release bundles; report refusals").set_defaults(
        func=cmd_import)
    p = sub.add_parser("status", help="releases held, tenants, cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("tenant", help="tenant secrets")
    p.add_argument("action", choices=["create", "rotate", "destroy", "list", "export", "import"])
    p.add_argument("--org")
    p.add_argument("--type", default="production", help="org type (create)")
    p.add_argument("--key-type", default="field", choices=["field", "database"])
    p.add_argument("--version", type=int)
    p.add_argument("--file", help="backup file (export/import)")
    p.set_defaults(func=cmd_tenant)
    p = sub.add_parser("encrypt", help="encrypt a field for an org (prints base64)")
    p.add_argument("--org", required=True)
    p.add_argument("--key-type", default="field", choices=["field", "database"])
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
    p = sub.add_parser("audit", help="check an audit log's hash chain offline")
    p.add_argument("action", choices=["verify"])
    p.add_argument("file")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return cliutil.run("kms", args.func, args, debug=args.debug)
