"""PKCS#11 URIs (RFC 7512) for tokens and objects.

Supported path attributes: token, serial, manufacturer, model, object, id, type; query attributes:
module-path, pin-source, pin-value (accepted because RFC 7512 defines it, but discouraged: a PIN in
a URI ends up in shell history). Unknown path attributes are refused: a typo in a ceremony must not
silently select "any token".
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from .errors import UsageError

_PATH_ATTRS = {"token", "serial", "manufacturer", "model", "object", "id", "type",
               "library-manufacturer", "library-description", "library-version", "slot-description",
               "slot-manufacturer"}
_QUERY_ATTRS = {"module-path", "module-name", "pin-source", "pin-value"}
_TYPES = {"public", "private", "secret-key", "cert", "data"}


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None

    def __repr__(self) -> str:  # never show a PIN, even in a debugger or a log line
        shown = {k: v for k, v in self.__dict__.items() if v is not None and k != "pin_value"}
        if self.pin_value is not None:
            shown["pin_value"] = "***"
        return f"Pkcs11Uri({shown})"

    def __str__(self) -> str:
        path = []
        for key in ("token", "serial", "manufacturer", "model", "object"):
            val = getattr(self, key)
            if val is not None:
                path.append(f"{key}={quote(val, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type is not None:
            path.append(f"type={self.type}")
        query = []
        if self.module_path:
            query.append(f"module-path={quote(self.module_path, safe='/')}")
        if self.pin_source:
            query.append(f"pin-source={quote(self.pin_source, safe='/:')}")
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")


def _decode(value: str, what: str, uri: str) -> bytes:
    try:
        return unquote_to_bytes(value)
    except Exception as exc:  # pragma: no cover - unquote_to_bytes is permissive
        raise UsageError(f"bad percent-encoding in {what} of PKCS#11 URI {uri!r}") from exc


def parse(uri: str) -> Pkcs11Uri:
    """Parse ``pkcs11:token=primary;object=primary-signing;type=private?pin-source=env:PIN``."""
    if not uri.startswith("pkcs11:"):
        raise UsageError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {uri!r}")
    body = uri[len("pkcs11:"):]
    path, _, query = body.partition("?")
    fields: dict[str, object] = {}
    for part in filter(None, path.split(";")):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"PKCS#11 URI path attribute without '=': {part!r}")
        if key not in _PATH_ATTRS:
            raise UsageError(f"unknown PKCS#11 URI path attribute {key!r}",
                             hint="known: " + ", ".join(sorted(_PATH_ATTRS)))
        if key in fields:
            raise UsageError(f"PKCS#11 URI attribute {key!r} given twice")
        raw = _decode(value, key, uri)
        if key == "id":
            fields["id"] = raw
        else:
            try:
                fields[key] = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"PKCS#11 URI attribute {key!r} is not UTF-8") from exc
    if "type" in fields and fields["type"] not in _TYPES:
        raise UsageError(f"PKCS#11 URI type={fields['type']!r} is not one of "
                         + ", ".join(sorted(_TYPES)))
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep or key not in _QUERY_ATTRS:
            raise UsageError(f"unknown PKCS#11 URI query attribute {key!r}",
                             hint="known: " + ", ".join(sorted(_QUERY_ATTRS)))
        if key.replace("-", "_") in fields:
            raise UsageError(f"PKCS#11 URI attribute {key!r} given twice")
        try:
            fields[key.replace("-", "_")] = _decode(value, key, uri).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"PKCS#11 URI attribute {key!r} is not UTF-8") from None
    fields.pop("module_name", None)
    known = {k: v for k, v in fields.items() if k in Pkcs11Uri.__dataclass_fields__}
    return Pkcs11Uri(**known)  # type: ignore[arg-type]
