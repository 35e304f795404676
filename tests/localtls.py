"""Real TLS on 127.0.0.1 for the tests: a throw-away CA, server certificates for 127.0.0.1, and
subprocess servers (moto, the reference key service) started and stopped by the tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(directory: Path, *, client: bool = False) -> Pki:
    """A CA and one leaf for 127.0.0.1 (serverAuth, or clientAuth with ``client``)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    leaf = (x509.CertificateBuilder().subject_name(_name("client" if client else "127.0.0.1"))
            .issuer_name(ca.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(leaf_key, pki.key)
    return pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_moto(pki: Pki, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real moto server (AWS-KMS-compatible) over TLS on 127.0.0.1."""
    port = port or free_port()
    # Beside this interpreter (a venv), else wherever pip put the script on PATH.
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        import shutil
        exe = Path(shutil.which("moto_server") or "moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-c", str(pki.cert),
                             "-k", str(pki.key)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_listening(port, proc)
    return proc, f"https://127.0.0.1:{port}"


# Dummy credentials for moto (it accepts any); set in the environment the boto3 way.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "eu-west-1"}


def set_aws_env() -> None:
    os.environ.update(AWS_ENV)


def start_keyservice(keys: Path, pki: Pki, *, client_ca: Path | None = None,
                     log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """The reference key service (`kms keyservice serve`) as its own process on 127.0.0.1."""
    port = free_port()
    args = [sys.executable, "-m", "kms", "keyservice", "serve", "--keys", str(keys), "--cert",
            str(pki.cert), "--key", str(pki.key), "--port", str(port)]
    if client_ca is not None:
        args += ["--client-ca", str(client_ca)]
    err = open(log, "ab") if log else subprocess.PIPE
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err)
    if log:
        err.close()
        proc.stderr = open(log, "rb")
    wait_listening(port, proc)
    return proc, f"https://127.0.0.1:{port}"
