"""Placeholder for the `ceremony` command: the ceremony package lands in a later issue."""

import sys


def main(argv=None) -> int:
    print("ceremony: not implemented yet (see the open issues); the hsm driver layer is ready",
          file=sys.stderr)
    return 2
