"""Demo and test TLS material for the service, made with ``cryptography`` (no openssl CLI).

A small CA (ECDSA P-256), server certificates (SAN: 127.0.0.1, ::1, localhost and the region's
name) and client certificates (clientAuth EKU; identity as a SAN URI such as
``spiffe://hsm-suite/encryption-service``, or a bare CN). Private keys are written 0600 with
O_EXCL, unencrypted PEM: for the demo and the tests only. Production uses its own PKI (docs/kms.md,
"Your own PKI"). ``python -m kms.server.pki OUT_DIR --regions eu us`` makes the demo set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEMO_URI = "spiffe://hsm-suite/"
DEMO_CLIENTS = ("encryption-service", "admin", "unauthorised")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-suite demo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class Authority:
    def __init__(self, key, cert: x509.Certificate):
        self.key, self.cert = key, cert

    @classmethod
    def create(cls, cn: str = "hsm-suite demo service CA", days: int = 3650) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> Authority:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        return cls(key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes()))

    def save(self, directory: Path) -> None:
        _write_key(directory / "ca.key", self.key)
        _write_cert(directory / "ca.pem", self.cert)

    def issue(self, cn: str, *, server: bool = False, uris=(), dns=(), ips=(),
              days: float = 825, not_before: dt.datetime | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start)
                   .not_valid_after(start + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        names = ([x509.UniformResourceIdentifier(u) for u in uris]
                 + [x509.DNSName(d) for d in dns]
                 + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def write(self, directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
        _write_key(directory / f"{stem}.key", key)
        _write_cert(directory / f"{stem}.pem", cert)
        return directory / f"{stem}.pem", directory / f"{stem}.key"

    def server(self, directory: Path, stem: str, *, names=("localhost",)) -> tuple[Path, Path]:
        return self.write(directory, stem, *self.issue(
            stem, server=True, dns=names, ips=("127.0.0.1", "::1")))

    def client(self, directory: Path, stem: str, *, uri: str | None = None, **kw):
        return self.write(directory, stem, *self.issue(stem, uris=(uri,) if uri else (), **kw))


def demo_set(out: Path, regions) -> list[str]:
    """The demo's material under ``out``; what exists is kept (a second make demo)."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    made = []
    if (out / "ca.pem").exists():
        ca = Authority.load(out)
    else:
        ca = Authority.create()
        ca.save(out)
        made.append("ca.pem")
    for region in regions:
        if not (out / f"{region}-server.pem").exists():
            ca.server(out, f"{region}-server", names=("localhost", f"kms-{region}.local"))
            made.append(f"{region}-server.pem")
    for name in DEMO_CLIENTS:
        if not (out / f"{name}.pem").exists():
            ca.client(out, name, uri=DEMO_URI + name)
            made.append(f"{name}.pem")
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kms.server.pki", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--regions", nargs="+", default=["eu", "us"])
    args = p.parse_args(argv)
    made = demo_set(args.out, args.regions)
    print(f"TLS material in {args.out}: " + (", ".join(made) + " made" if made else "exists"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
