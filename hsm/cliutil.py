"""What the three commands (hsm, ceremony, kms) share: one clear line on error, exit codes.

Exit 2: a project error (wrong PIN, missing token, refused input) - the message says what and
what to do. Exit 3: anything unexpected (a bug). 130: interrupted. --debug re-raises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import HsmError


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
