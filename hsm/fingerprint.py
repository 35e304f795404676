"""Moved to :mod:`suite.fingerprint` (token-free, so the SDK, the client and ``release`` need no
``pkcs11``). This old path re-exports it until the next release (CHANGELOG.md)."""

from suite.fingerprint import *  # noqa: F401,F403
from suite.fingerprint import __all__ as __all__  # noqa: F401
