"""The reference customer key service for cache-only keys (what a customer runs; the demo and the
tests start it as a separate process on 127.0.0.1).

``GET /<kid>?requestId=<nonce>`` answers ``{"kid": kid, "jwe": COMPACT}``: the DEK in
``DIR/<kid>.dek`` (base64 of 32 bytes) as a JWE (RSA-OAEP, A256GCM, ``kid``, ``jti`` = the
nonce) to the BYOK certificate in ``DIR/<kid>.pem``. Revoking a key = removing its ``.dek``
file: the answer becomes 404 and the KMS's key unavailable. HTTPS only, TLS 1.2+, optional
client-certificate authentication (``--client-ca``). Files are read per request so a key can be
added or revoked while it runs. Never logs a DEK; the access log names the kid and status only.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import re
import ssl
import sys
import urllib.parse
from pathlib import Path

from kms.errors import ConfigError

_KID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")


def make_jwe(dek: bytes, cert_pem: bytes, kid: str, nonce: str, *,
             header: dict | None = None) -> str:
    """The compact JWE of ``dek`` to the certificate's RSA key (jwcrypto does the crypto).
    ``header`` replaces the protected header (the tests craft wrong ones with it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from jwcrypto import jwe, jwk
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    pub = jwk.JWK.from_pem(cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if header is None:
        header = {"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid, "jti": nonce}
    token = jwe.JWE(plaintext=dek, protected=json.dumps(header),
                    algs=[header.get("alg", "RSA-OAEP"), header.get("enc", "A256GCM")])
    token.add_recipient(pub)
    return token.serialize(compact=True)


def read_key(keys: Path, kid: str) -> tuple[bytes, bytes]:
    """The key directory's entry for ``kid``: the DEK (``<kid>.dek``, base64) and the PEM BYOK
    certificate it is encrypted to (``<kid>.pem``). FileNotFoundError when either is missing
    (a revoked key); binascii.Error or ValueError when the DEK is not base64."""
    dek = base64.b64decode((keys / f"{kid}.dek").read_text().strip(), validate=True)
    return dek, (keys / f"{kid}.pem").read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    keys: Path

    def _send(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urllib.parse.urlsplit(self.path)
        kid = urllib.parse.unquote(url.path.rsplit("/", 1)[-1])
        nonce = urllib.parse.parse_qs(url.query).get("requestId", [""])[0]
        if not _KID.match(kid) or not _NONCE.match(nonce):
            return self._send(400, b'{"error": "bad kid or requestId"}')
        try:
            dek, cert = read_key(self.keys, kid)
        except FileNotFoundError:
            return self._send(404, b'{"error": "no such key"}')
        except (OSError, binascii.Error, ValueError):
            return self._send(500, b'{"error": "key file unreadable"}')
        body = json.dumps({"kid": kid, "jwe": make_jwe(dek, cert, kid, nonce)}).encode()
        self._send(200, body)

    def log_message(self, fmt, *args):  # kid and status only; never a body
        sys.stderr.write(f"keyservice: {self.address_string()} {fmt % args}\n")


def serve(keys: Path, cert: Path, key: Path, *, port: int = 8443, host: str = "127.0.0.1",
          client_ca: Path | None = None, ready=None) -> None:
    from kms.server import preflight
    if not Path(keys).is_dir():
        raise ConfigError(f"--keys {keys} is not a directory",
                          hint="give the directory holding <kid>.dek and <kid>.pem files")
    preflight.check_port(port)
    preflight.tls_files(cert, key, client_ca, names=("--cert", "--key", "--client-ca"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    handler = type("KeyHandler", (Handler,), {"keys": Path(keys)})
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise preflight.listen_error(host, port, exc) from None
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"keyservice: serving {keys} on https://{host}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
