"""``python -m kms.xks probe``: check a running XKS proxy the way AWS KMS will call it."""

from __future__ import annotations

import argparse
import ssl
import sys

from hsm.core import pin as pins
from hsm.core.errors import SuiteError

from .client import XksClient, probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kms.xks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("probe", help="GetHealthStatus, and with --key metadata + round trip")
    c.add_argument("--url", required=True,
                   help="the proxy's base: https://HOST:PORT[/prefix]/kms/xks/v1")
    c.add_argument("--access-key-id", required=True)
    c.add_argument("--secret-source", required=True, metavar="env:VAR|file:PATH",
                   help="where the secret access key comes from (never a command line)")
    c.add_argument("--region", required=True, help="the region AWS KMS signs with")
    c.add_argument("--key", default=None, help="an externalKeyId to probe")
    c.add_argument("--ca", default=None, help="CA bundle for the proxy's certificate")
    c.add_argument("--cert", default=None, help="client certificate (a key store with mTLS)")
    c.add_argument("--cert-key", default=None, help="its private key")
    args = p.parse_args(argv)
    try:
        secret = pins.from_source(args.secret_source).reveal()
        ctx = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.cert_key)
        client = XksClient(args.url, args.access_key_id, secret, args.region, context=ctx)
        return probe(client, args.key)
    except (SuiteError, OSError, ssl.SSLError) as exc:
        print(f"xks probe: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
