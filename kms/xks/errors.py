"""The specification's error names and HTTP statuses; nothing else is ever answered.

The body is ``{"errorName": NAME, "errorMessage": TEXT}``; the message is printable ASCII under 512
characters (the specification's limit) and never carries plaintext, AAD or key material.
"""

from __future__ import annotations

from aiohttp import web

STATUS = {
    "ValidationException": 400,
    "InvalidStateException": 400,
    "InvalidCiphertextException": 400,
    "InvalidKeyUsageException": 400,
    "AuthenticationFailedException": 401,
    "AccessDeniedException": 403,
    "KeyNotFoundException": 404,
    "InvalidUriPathException": 404,
    "ThrottlingException": 429,
    "UnsupportedOperationException": 501,
    "DependencyTimeoutException": 503,
    "InternalException": 500,
}
METHOD_NOT_ALLOWED = "MethodNotAllowed"   # 405 for GET: the specification names no error


class XksError(Exception):
    """``message`` goes to the client; ``detail`` (default: the message) to the log and the
    audit line only - e.g. why a signature failed, which would tell a prober which access key
    ids exist."""

    def __init__(self, name: str, message: str, *, status: int | None = None,
                 headers: dict | None = None, detail: str | None = None):
        super().__init__(message)
        self.name, self.message = name, message
        self.detail = detail if detail is not None else message
        self.status = status if status is not None else STATUS[name]
        self.headers = headers or {}


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:511]


def response(err: XksError) -> web.Response:
    return web.json_response({"errorName": err.name, "errorMessage": _printable(err.message)},
                             status=err.status, headers=err.headers)


def validation(message: str) -> XksError:
    return XksError("ValidationException", message)
