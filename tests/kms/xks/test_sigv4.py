"""The pieces under the proxy, without a server: the SigV4 verifier against botocore's signer,
the specification's CDIV example (Appendix C) and the AAD framing of its Encrypt section."""

from __future__ import annotations

import base64
import time

import pytest
from multidict import CIMultiDict

from hsm.core.pin import Pin
from kms.xks import sigv4
from kms.xks.client import signed_headers
from kms.xks.handlers import cdiv, token_aad

AKID, SECRET = "AKIAI2SFODNN7EXAMPLE22", "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"
URL = "https://xks.example.com/path/kms/xks/v1/keys/k1/encrypt"
CREDS = {AKID: sigv4.Credential(AKID, Pin(SECRET))}


def _verify(headers: dict, body: bytes, path: str = "/path/kms/xks/v1/keys/k1/encrypt",
            region: str = "us-east-1", now: float | None = None):
    h = CIMultiDict({"Host": "xks.example.com", **headers})   # what http.client adds
    signed = sigv4.authenticate_headers(h, CREDS, region, now or time.time())
    sigv4.verify(signed, "POST", path, h, body)


def test_a_botocore_signature_verifies_and_any_change_does_not():
    body = b'{"requestMetadata":{}}'
    hdrs = signed_headers("POST", URL, body, AKID, SECRET, "us-east-1")
    _verify(hdrs, body)
    for bad in (lambda: _verify(hdrs, body + b" "),
                lambda: _verify(hdrs, body, path="/path/kms/xks/v1/keys/k2/encrypt"),
                lambda: _verify({**hdrs, "Host": "other.example.com"}, body),
                lambda: _verify(hdrs, body, region="eu-west-1"),
                lambda: _verify(hdrs, body, now=time.time() + 301),
                lambda: _verify({**hdrs, "X-Amz-Content-SHA256": "0" * 64}, body)):
        with pytest.raises(sigv4.AuthFailure):
            bad()


def test_authorization_header_shapes_are_refused_before_the_body():
    body = b"{}"
    hdrs = signed_headers("POST", URL, body, AKID, SECRET, "us-east-1")
    auth = hdrs["Authorization"]
    for broken, why in ((auth.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"), "not AWS4"),
                        (auth.replace("aws4_request", "aws5_request"), "aws4_request"),
                        (auth.replace("host;", ""), "host and x-amz-date"),
                        (auth.replace("SignedHeaders=content-type;host",
                                      "SignedHeaders=host;content-type"), "sorted")):
        with pytest.raises(sigv4.AuthFailure, match=why):
            sigv4.authenticate_headers(CIMultiDict({**hdrs, "Authorization": broken}), CREDS,
                                       "us-east-1", time.time())


def test_cdiv_is_the_specifications_example():
    aad = b"project=nile,department=marketing"
    meta = b"key_version=1"
    iv = base64.b64decode("HMrlRw85cAJUd5Ax")
    ct = base64.b64decode("ghxkK1txeDNn3q8Y")
    tag = base64.b64decode("vBxN2ncH1oEkR8WVXpmyYQ==")
    assert base64.b64encode(cdiv(aad, meta, iv, ct, tag)).decode() == \
        "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


def test_the_token_aad_frames_both_lengths():
    assert token_aad(None, None) == b"\x00\x00\x00"
    assert token_aad(b"ab", b"m") == b"\x00\x02ab\x01m"
    assert token_aad(b"\x00\x01m", None) != token_aad(None, b"m")   # no AAD passes for metadata
    assert token_aad(bytes(8192), None)[:2] == b"\x20\x00"
