"""Moved to :mod:`suite.files` (token-free, so the SDK, the client and ``release`` need no
``pkcs11``). This old path re-exports it until the next release (CHANGELOG.md)."""

from suite.files import *  # noqa: F401,F403
from suite.files import __all__ as __all__  # noqa: F401
