"""What the three commands (hsm, ceremony, kms) share: one clear line on error, exit codes.

Exit 2: a project error (wrong PIN, missing token, refused input) - the message says what and
what to do. Exit 3: anything unexpected (a bug). 130: interrupted. --debug re-raises.
Token-free: the options that name a module or a token are ``hsm.commands.options``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from suite.errors import SuiteError

__all__ = ["main", "parser", "run"]


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
        if debug:
            raise
        if exc.filename is None:
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
