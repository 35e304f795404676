"""The ``hsm_tokens`` pytest entry point: the fresh-token fixtures of :mod:`hsm.testing` when the
token side is installed (``hsm-suite[hsm]``: python-pkcs11), and nothing otherwise.

Every installation of the package registers the entry point, an encryption service that
installed only the SDK and the client included; loading :mod:`hsm.testing` there would stop its
pytest with an ImportError before any of its own tests ran.
"""

from __future__ import annotations

try:
    import pkcs11  # noqa: F401  (hsm.testing loads it anyway)
except ImportError:
    pytest_plugins: list[str] = []
else:
    pytest_plugins = ["hsm.testing"]
