"""Argument checks at the store's door: a caller's mistake is an ``ArgumentError`` (a
``ValueError``) or ``ArgumentTypeError`` (a ``TypeError``) before any transaction starts, so a
bad value never reaches a row."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from kms import key_rules
from kms.errors import ArgumentError, ArgumentTypeError

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def text(name: str, value, *, max_len: int = 255) -> str:
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a string, not {type(value).__name__} "
                                f"{value!r}")
    if not value or len(value) > max_len or _CONTROL.search(value):
        raise ArgumentError(f"{name} must be a non-empty string of at most {max_len} characters "
                            f"without control characters, not {value!r}")
    return value


def choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def timestamp(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number of seconds since the epoch, not "
                                f"{type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number of seconds since the epoch, not "
                            f"{value!r}")
    return float(value)


def integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an integer >= {minimum}, not "
                                f"{type(value).__name__} {value!r}")
    if value < minimum or value >= 2 ** 63:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def sha256_hex(name: str, value) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.match(value):
        raise ArgumentError(f"{name} must be 64 lowercase hex digits, not {value!r}")
    return value


def secret_fields(where: str, *, key_type, source, derivation, release, iterations) -> None:
    """The fields a new secret and an imported one have in common (one rule for both)."""
    choice(f"{where}key type", key_type, key_rules.KEY_TYPES)
    choice(f"{where}source", source, key_rules.SOURCES)
    choice(f"{where}derivation", derivation, key_rules.DERIVATIONS)
    if release is not None:
        text(f"{where}release", release)
    integer(f"{where}iterations", iterations, 1 if derivation == "PBKDF2" else 0)
