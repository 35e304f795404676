"""Where PINs come from: ``env:VAR``, ``file:PATH``, an environment default, or a prompt.

A PIN is returned as a ``Pin`` whose repr and str never show the value, so a PIN that ends up in
an f-string, a log record or a traceback's locals shows as ``Pin(<hidden>)``.
"""

from __future__ import annotations

import getpass
import os
import sys

from .errors import PinError, UsageError


class Pin:
    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not value:
            raise PinError("empty PIN", hint="give a non-empty PIN")
        self._value = value

    def reveal(self) -> str:
        """The PIN itself: call only where it is handed to C_Login."""
        return self._value

    def __repr__(self) -> str:
        return "Pin(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pin) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Pin", self._value))

    def __reduce__(self):  # a Pin must not be pickled into a file or another process by accident
        raise TypeError("a Pin cannot be pickled")


def from_source(source: str) -> Pin:
    """Read a PIN from ``env:VAR`` or ``file:PATH`` (first line, trailing newline stripped)."""
    kind, sep, where = source.partition(":")
    if not sep or not where:
        raise UsageError(f"bad PIN source {source!r}", hint="use env:VARIABLE or file:PATH")
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise PinError(f"PIN source env:{where} is not set or empty",
                           hint=f"export {where} or choose another --pin-source")
        return Pin(value)
    if kind == "file":
        try:
            with open(where, encoding="utf-8") as fh:
                value = fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise PinError(f"cannot read PIN file {where}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise PinError(f"PIN file {where} is not UTF-8 text") from None
        if not value:
            raise PinError(f"PIN file {where} is empty", hint="put the PIN on its first line")
        return Pin(value)
    raise UsageError(f"unknown PIN source kind {kind!r}", hint="use env:VARIABLE or file:PATH")


def token_env(default_env: str, label: str) -> str:
    """The per-token variable for ``label``: ``HSM_PIN_REGIONAL_EU`` for ``regional-eu`` (the
    label upper-cased, every character that cannot be in a variable name turned into ``_``)."""
    return default_env + "_" + "".join(c if c.isascii() and c.isalnum() else "_"
                                       for c in label.upper())


def wrong_pin_hint(label: str | None, *, so: bool = False) -> str:
    """Where the PIN that was just refused came from, named by each command's own option."""
    if so:
        kind, env, given = ("security officer (SO) PIN", "HSM_SO_PIN",
                            "hsm: --so-pin-source; ceremony: so_pin_source in the --env file")
    else:
        kind, env, given = ("user PIN", "HSM_PIN", "hsm: --pin-source; kms: pin_source in the "
                            "node configuration; ceremony: user_pin_source in the --env file")
    names = ([token_env(env, label)] if label else []) + [env]
    return (f"the {kind} is wrong; it was read from the PIN source the command was given "
            f"({given}), else from " + ", else ".join(f"${n}" for n in names)
            + " (each failure counts towards the token's lock-out)")


def resolve(source: str | None, *, default_env: str, prompt: str,
            token_label: str | None = None, option: str | None = None) -> Pin:
    """A PIN from ``source``, else ``$<default_env>_<LABEL>`` (each token its own PIN), else
    ``$default_env``, else a terminal prompt.

    With no source, no variable and no terminal (CI, a pipe) we fail rather than block: an
    unattended run waiting on a prompt nobody sees is a silent hang.
    """
    if source:
        return from_source(source)
    names = ([token_env(default_env, token_label)] if token_label else []) + [default_env]
    for name in names:
        value = os.environ.get(name)
        if value:
            return Pin(value)
    if sys.stdin is not None and sys.stdin.isatty():
        return Pin(getpass.getpass(prompt))
    option = option or ("--so-pin-source" if "SO_PIN" in default_env else "--pin-source")
    raise PinError(f"no PIN available for: {prompt.rstrip(': ')}",
                   hint=f"give {option} env:VAR|file:PATH or set " + " or ".join(names))
