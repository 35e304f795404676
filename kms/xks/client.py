"""A small XKS client for tests and operators: requests signed by botocore's ``SigV4Auth``.

No SigV4 is written here: botocore computes the signature (service ``kms-xks-proxy``, the
headers it chooses: ``host`` and ``x-amz-date``), exactly as an AWS SDK would. ``probe`` runs
GetHealthStatus, GetKeyMetadata and an Encrypt/Decrypt round trip against a proxy and prints
what each returned and how long it took (``python -m kms.xks probe --help``).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import uuid
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "kms-xks-proxy"


def signed_headers(method: str, url: str, body: bytes, access_key_id: str, secret: str,
                   region: str, *, service: str = SERVICE, headers: dict | None = None) -> dict:
    """The headers (Authorization, X-Amz-Date, Host...) botocore signs this request with."""
    req = AWSRequest(method=method, url=url, data=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
    SigV4Auth(Credentials(access_key_id, secret), service, region).add_auth(req)
    return dict(req.headers.items())


class XksClient:
    """One keep-alive HTTPS connection to ``base`` (``https://HOST:PORT[/prefix]/kms/xks/v1``)."""

    def __init__(self, base: str, access_key_id: str, secret: str, region: str, *,
                 context: ssl.SSLContext | None = None, timeout: float = 10.0):
        self.base = base.rstrip("/")
        self.access_key_id, self.secret, self.region = access_key_id, secret, region
        parts = urlsplit(self.base)
        self.host, self.port = parts.hostname or "localhost", parts.port or 443
        self.context = context or ssl.create_default_context()
        self.timeout = timeout
        self.conn: http.client.HTTPSConnection | None = None

    def _conn(self) -> http.client.HTTPSConnection:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                    timeout=self.timeout)
        return self.conn

    def post(self, path: str, doc: dict | bytes, **sign) -> tuple[int, dict]:
        """POST ``doc`` to ``base + path``, signed; returns (status, parsed JSON)."""
        url = self.base + path
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        hdrs = signed_headers("POST", url, body, sign.pop("access_key_id", self.access_key_id),
                              sign.pop("secret", self.secret), sign.pop("region", self.region),
                              **sign)
        conn = self._conn()
        try:
            parts = urlsplit(url)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        return resp.status, (json.loads(data) if data else {})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # ------------------------------------------------------------------ the operations
    def health(self, **sign):
        return self.post("/health", {"requestMetadata": {
            "kmsRequestId": str(uuid.uuid4()), "kmsOperation": "KmsHealthCheck"}}, **sign)

    def metadata(self, key_id: str, principal: str = "arn:aws:iam::111122223333:user/probe"):
        return self.post(f"/keys/{key_id}/metadata", {"requestMetadata": {
            "awsPrincipalArn": principal, "kmsOperation": "CreateKey",
            "kmsRequestId": str(uuid.uuid4())}})

    def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None = None, *,
                cdiv: bool = False, meta: dict | None = None):
        doc = {"requestMetadata": meta or request_metadata("Encrypt"),
               "plaintext": base64.b64encode(plaintext).decode(), "encryptionAlgorithm": "AES_GCM"}
        if aad is not None:
            doc["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
        if cdiv:
            doc["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
        return self.post(f"/keys/{key_id}/encrypt", doc)

    def decrypt(self, key_id: str, encrypted: dict, aad: bytes | None = None, *,
                meta: dict | None = None):
        doc = {"requestMetadata": meta or request_metadata("Decrypt"),
               "encryptionAlgorithm": "AES_GCM",
               **{k: encrypted[k] for k in ("ciphertext", "initializationVector",
                                            "authenticationTag", "ciphertextMetadata")
                  if k in encrypted}}
        if aad is not None:
            doc["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
        return self.post(f"/keys/{key_id}/decrypt", doc)


def request_metadata(operation: str, principal: str = "arn:aws:iam::111122223333:user/probe",
                     **extra) -> dict:
    return {"awsPrincipalArn": principal,
            "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/"
                         "1234abcd-12ab-34cd-56ef-1234567890ab",
            "kmsOperation": operation, "kmsRequestId": str(uuid.uuid4()), **extra}


def probe(client: XksClient, key_id: str | None) -> int:
    """Health, then (with a key) metadata and an encrypt/decrypt round trip; exit 0 when all
    answered 200 and the plaintext came back."""
    ok = True

    def show(name, fn, *args):
        nonlocal ok
        t0 = time.perf_counter()
        status, doc = fn(*args)
        ms = (time.perf_counter() - t0) * 1000
        print(f"{name:<16} {status} {ms:7.1f} ms  {json.dumps(doc, sort_keys=True)[:300]}")
        ok = ok and status == 200
        return doc
    show("GetHealthStatus", client.health)
    if key_id:
        show("GetKeyMetadata", client.metadata, key_id)
        probe_text = b"xks probe " + uuid.uuid4().hex.encode()
        enc = show("Encrypt", lambda: client.encrypt(key_id, probe_text, b"probe", cdiv=True))
        if "ciphertext" in enc:
            dec = show("Decrypt", client.decrypt, key_id, enc, b"probe")
            ok = ok and base64.b64decode(dec.get("plaintext", "")) == probe_text
    client.close()
    return 0 if ok else 1
