"""Moved to :mod:`suite.tomlfile` (token-free, so the SDK, the client and ``release`` need no
``pkcs11``). This old path re-exports it until the next release (CHANGELOG.md)."""

from suite.tomlfile import *  # noqa: F401,F403
from suite.tomlfile import __all__ as __all__  # noqa: F401
