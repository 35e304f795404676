"""The entry point of the three commands (``hsm``, ``ceremony``, ``kms``): imports nothing heavy.

The command's own modules (pkcs11, cryptography, asn1crypto...) load *inside* the ``try``, so a
Ctrl-C while they load - the first half-second of every command, and what an interrupted
``make demo`` usually hits - prints one line and exits 130 instead of a KeyboardInterrupt
traceback. Once loaded, ``hsm.commands.options.run`` answers errors and interrupts the same way.
"""

from __future__ import annotations

import importlib
import sys

# Each command's module (its `main()`), by the command's name.
COMMANDS = {"hsm": "hsm.commands.main", "ceremony": "ceremony.cli", "kms": "kms.cli"}


def _main(prog: str) -> int:
    try:
        return importlib.import_module(COMMANDS[prog]).main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def hsm() -> int:
    return _main("hsm")


def ceremony() -> int:
    return _main("ceremony")


def kms() -> int:
    return _main("kms")
