"""The command-line options that name a module or a token (``--module``, ``--token``,
``--serial``) and the officer's fingerprint confirmation, for hsm's commands.

What all three commands share and needs no token (the top-level parser, one way to answer
errors, exit codes) is :mod:`suite.cli`; its names are re-exported here (``cliutil.parser``,
``cliutil.main``, ``cliutil.run``) until the next release.
"""

from __future__ import annotations

import argparse
import os
import sys

from hsm.core import module as modules
from hsm.core import uri
from hsm.core.errors import UsageError
from hsm.core.uri import Pkcs11Uri
from suite.cli import main, parser, run  # noqa: F401 (re-exported at the old path)


def add_module_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", default=None, metavar="PATH|softhsm2|nss",
                   help="PKCS#11 module (default: $HSM_MODULE or SoftHSM2)")
    p.add_argument("--module-params", default=None, metavar="STRING",
                   help="module-specific C_Initialize parameters (NSS: configdir=...)")


def module_of(args: argparse.Namespace) -> str:
    """The module a command uses: ``--module``, else ``$HSM_MODULE``, else SoftHSM2."""
    return args.module or os.environ.get("HSM_MODULE") or modules.DEFAULT_MODULE


def token_target(args: argparse.Namespace) -> tuple[str, str | None, str, Pkcs11Uri | None]:
    """``--token`` (a label or a PKCS#11 URI), ``--serial`` and the module, resolved the one way
    every token command does: what the URI names wins. Returns (label, serial, module, URI)."""
    label, serial, module = args.token, args.serial, module_of(args)
    parsed = None
    if label.startswith("pkcs11:"):
        parsed = uri.parse(label)
        label, serial = parsed.token, parsed.serial or serial
        module = parsed.module_path or module
    return label, serial, module, parsed


def open_token(args: argparse.Namespace, *, login: bool = True, pin_prompt: str | None = None):
    """The token ``--token``/``--serial``/``--module`` name, logged in with the PIN from
    ``--pin-source``, the URI's pin-value or pin-source, ``$HSM_PIN_<LABEL>``, ``$HSM_PIN`` or
    a prompt (in that order); ``login=False`` opens it without a PIN."""
    from hsm.core import pin as pins
    from hsm.core.token import Token
    label, serial, module, parsed = token_target(args)
    pin_source = getattr(args, "pin_source", None)
    params = getattr(args, "module_params", None)
    if parsed is not None:
        if parsed.pin_value is not None and not pin_source:
            return Token.open(label, serial=serial, module=module, parameters=params,
                              pin=pins.Pin(parsed.pin_value))
        pin_source = pin_source or parsed.pin_source
    user_pin = None
    if login:
        # A missing token is said to be missing, not asked for its PIN first.
        from hsm.core import module as modules
        from hsm.core.token import find_token
        find_token(modules.load(module, params), label=label, serial=serial)
        user_pin = pins.resolve(pin_source, default_env="HSM_PIN", token_label=label,
                                prompt=pin_prompt or f"User PIN for token {label or serial}: ")
    return Token.open(label, serial=serial, module=module, parameters=params, pin=user_pin)


def open_so(args: argparse.Namespace):
    """The token named by ``--token``, logged in as the security officer (``--so-pin-source``,
    else $HSM_SO_PIN[_LABEL], else a prompt): for the few objects only the SO may create."""
    from hsm.core import pin as pins
    from hsm.core.token import Token
    label, serial, module, _ = token_target(args)
    so_pin = pins.resolve(args.so_pin_source, default_env="HSM_SO_PIN", token_label=label,
                          prompt=f"Security officer PIN for token {label}: ")
    return Token.open(label, serial=serial, module=module, parameters=args.module_params,
                      pin=so_pin, so=True)


def confirm_fingerprint(digest: bytes, given: str | None, where: str) -> bytes:
    """Show a SHA-256 fingerprint (hex and PGP words) and return the one the officer confirms
    (``--fingerprint`` or typed at a terminal, hex or words), parsed; without one, refuse."""
    from suite import fingerprint as fp
    print("\n".join(fp.display(digest)))
    if given:
        typed = given
    elif sys.stdin is not None and sys.stdin.isatty():
        typed = input(f"Type the fingerprint {where} (hex or words): ")
    else:
        raise UsageError("no fingerprint confirmation given",
                         hint=f"pass --fingerprint HEX|WORDS as {where}")
    try:
        return fp.parse_fingerprint(typed)
    except ValueError as exc:
        raise UsageError(f"cannot read the confirmed fingerprint: {exc}") from None
