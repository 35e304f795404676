"""The suite's one strict TOML reader, for ceremony plans, environment files and KMS node
configurations: an unreadable file, non-UTF-8 text, a syntax error, an unknown key, a value of
the wrong type or a missing key each stop with one line naming the file and the key.

Each caller passes the error class of its own package (``PlanError``, ``ConfigError``), so the
message reaches the operator the way that package's other errors do.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from suite.errors import SuiteError

__all__ = ["Kind", "check_keys", "read", "type_ok"]

Kind = type | tuple[type, ...]


def read(path: Path, *, what: str, error: type[SuiteError]) -> tuple[dict, bytes, str]:
    """The parsed table, the exact bytes (a plan's digest is over them) and the text."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    try:
        return tomllib.loads(text), raw, text
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: TOML syntax error: {exc}") from None


def type_ok(value: object, kind: Kind) -> bool:
    """``isinstance`` where a TOML boolean is not an integer."""
    if isinstance(value, bool):
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


def _kind_name(kind: Kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a table", list: "an array"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_keys(table: Mapping, fields: Mapping[str, Kind], *, where: str,
               error: type[SuiteError], required: Iterable[str] = ()) -> None:
    """Every key of ``table`` known and of its kind, every required one present."""
    for key, value in table.items():
        if key not in fields:
            raise error(f"{where}: unknown key {key!r}",
                        hint="known: " + ", ".join(sorted(fields)))
        if not type_ok(value, fields[key]):
            raise error(f"{where}: {key} must be {_kind_name(fields[key])}, not "
                        f"{type(value).__name__}")
    missing = [k for k in required if k not in table]
    if missing:
        raise error(f"{where}: missing {', '.join(missing)}")
