"""What the three commands (hsm, ceremony, kms) share: one clear line on error, exit codes.

Exit 2: a project error (wrong PIN, missing token, refused input) - the message says what and
what to do. Exit 3: anything unexpected (a bug). 130: interrupted. --debug re-raises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import HsmError, UsageError


def run(prog: str, func: Callable[[object], int], args, *, debug: bool) -> int:
    try:
        return func(args)
    except HsmError as exc:
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
    except Exception as exc:  # a bug or an unexpected answer: still one clear line
        if debug:
            raise
        print(f"{prog}: unexpected error: {type(exc).__name__}: {exc} (run with --debug for "
              "the traceback)", file=sys.stderr)
        return 3


def confirm_fingerprint(digest: bytes, given: str | None, where: str) -> bytes:
    """Show a SHA-256 fingerprint (hex and PGP words) and return the one the officer confirms
    (``--fingerprint`` or typed at a terminal, hex or words), parsed; without one, refuse."""
    from . import fingerprint as fp
    print(f"  SHA-256(SPKI) {fp.to_hex(digest)}")
    words = fp.to_words(digest)
    print("  words  " + " ".join(words[:16]) + "\n         " + " ".join(words[16:]))
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
