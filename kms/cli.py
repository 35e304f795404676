"""Placeholder for the `kms` command: the kms package lands in a later issue."""

import sys


def main(argv=None) -> int:
    print("kms: not implemented yet (see the open issues); the hsm driver layer is ready",
          file=sys.stderr)
    return 2
