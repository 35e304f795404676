"""What the three commands (hsm, ceremony, kms) share: one clear line on error, exit codes.

Exit 2: a project error (wrong PIN, missing token, refused input) - the message says what and
what to do. Exit 3: anything unexpected (a bug). 130: interrupted. --debug re-raises.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import module as modules
from . import uri
from .uri import Pkcs11Uri
from .errors import SuiteError, UsageError


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The top-level parser of each command, with the options all three share."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the traceback too (never a PIN)")
    return p


def main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
         before: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse, run the subcommand's ``func``, and answer errors the one way (:func:`run`)."""
    args = parser.parse_args(argv)
    if before is not None:
        before(args)
    return run(prog, args.func, args, debug=args.debug)


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


def run(prog: str, func: Callable[[object], int], args, *, debug: bool) -> int:
    try:
        return func(args)
    except SuiteError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A file or directory the system refused (read-only, full, missing, not a directory):
        # the environment, not a bug. Named with its path; nothing here holds a secret.
        if debug or exc.filename is None:
            if debug:
                raise
            return _unexpected(prog, exc)
        print(f"{prog}: error: {exc.strerror or exc}: {exc.filename} - check the path and "
              "its permissions, free space and file type, then run again", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an unexpected answer: still one clear line
        if debug:
            raise
        return _unexpected(prog, exc)


def _unexpected(prog: str, exc: BaseException) -> int:
    print(f"{prog}: unexpected error: {type(exc).__name__}: {exc} (run with --debug for "
          "the traceback)", file=sys.stderr)
    return 3


def confirm_fingerprint(digest: bytes, given: str | None, where: str) -> bytes:
    """Show a SHA-256 fingerprint (hex and PGP words) and return the one the officer confirms
    (``--fingerprint`` or typed at a terminal, hex or words), parsed; without one, refuse."""
    from . import fingerprint as fp
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
