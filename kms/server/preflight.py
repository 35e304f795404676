"""What a server checks before it says "listening": its TLS files and its address.

A node once printed "listening" and then died in its worker with a traceback when the port was
taken, the address was not on this host, the certificate file held a key, the key did not match
the certificate, or ``client_ca`` was missing. Each is now one line naming the setting and the
file, exit 2, before anything is announced. Used by ``kms serve`` (the supervisor, before it binds
and forks) and by the reference key service (``kms keyservice serve``).
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

from kms.errors import ConfigError

_MAX_PEM_BYTES = 1 << 20


def _file(path: Path, setting: str) -> None:
    if not path.exists():
        raise ConfigError(f"{setting} {path} does not exist", hint="fix the path (relative paths "
                          "are relative to the configuration file)")
    if not path.is_file():
        raise ConfigError(f"{setting} {path} is not a regular file",
                          hint="give the PEM file itself")
    if path.stat().st_size > _MAX_PEM_BYTES:
        raise ConfigError(f"{setting} {path} is larger than 1 MiB: not a PEM file")


def tls_files(certificate: Path, private_key: Path, client_ca: Path | None, *,
              names: tuple[str, str, str] = ("service.certificate", "service.private_key",
                                             "service.client_ca")) -> None:
    """Load the server chain, its key and the client CA into a throw-away context, so every
    mistake is named here and not in a worker after "listening"."""
    cert_name, key_name, ca_name = names
    _file(Path(certificate), cert_name)
    _file(Path(private_key), key_name)
    if client_ca is not None:
        _file(Path(client_ca), ca_name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except ssl.SSLError as exc:
        text = Path(certificate).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"{cert_name} {certificate} holds no PEM certificate"
                              + (" (it is a private key)" if b"PRIVATE KEY-----" in text else ""),
                              hint=f"give the certificate chain in {cert_name} and its key in "
                                   f"{key_name}") from None
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{key_name} {private_key} is not the key of {cert_name} "
                              f"{certificate}", hint="give the key the certificate was issued "
                                                     "for") from None
        raise ConfigError(f"cannot load {cert_name} {certificate} with {key_name} "
                          f"{private_key}: {exc.reason or exc}",
                          hint="both must be PEM; the key unencrypted") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise ConfigError(f"{ca_name} {client_ca} holds no usable CA certificate "
                              f"({exc.reason or exc})", hint="give the PEM CA bundle client "
                                                             "certificates chain to") from None


def check_port(port: int, what: str = "--port") -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {port} is not a TCP port", hint="give 0 to 65535 "
                                                                   "(0: any free one)")


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """The one line for a socket that cannot be bound."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"cannot listen on {where}: {host!r} is not an address or a name "
                           "this host resolves", hint="give an address of this host "
                                                       "(127.0.0.1 for this host only)")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"cannot listen on {where}: the address is already in use",
                           hint="stop the process using it, or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"cannot listen on {where}: {host} is not an address of this host",
                           hint="give one of its addresses (127.0.0.1 for this host only)")
    if exc.errno == errno.EACCES:
        return ConfigError(f"cannot listen on {where}: permission denied",
                           hint="ports below 1024 need privileges; choose a port >= 1024")
    return ConfigError(f"cannot listen on {where}: {exc.strerror or exc}")
