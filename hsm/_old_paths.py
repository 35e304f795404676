"""The module paths hsm had before core/, keys/ and commands/, kept until the next release.

Each old path imports as the *very same module object* as the new one (``hsm.token is
hsm.core.token``), through :mod:`suite.moved`. ``import hsm.token``, ``from hsm import token``
and ``from hsm.token import Token`` all work. The type checker does not run this code: for it the
old paths are untyped (``[tool.mypy]`` in pyproject.toml lists them), so new code imports the new
paths.
"""

from __future__ import annotations

from suite import moved

# old path -> new path. Also the token-free modules that moved to `suite` earlier.
MOVED = {
    # the driver core
    "hsm._cryptoki": "hsm.core._cryptoki",
    "hsm.errors": "hsm.core.errors",
    "hsm.module": "hsm.core.module",
    "hsm.nss": "hsm.core.nss",
    "hsm.ops": "hsm.core.ops",
    "hsm.pin": "hsm.core.pin",
    "hsm.profile": "hsm.core.profile",
    "hsm.softhsm": "hsm.core.softhsm",
    "hsm.token": "hsm.core.token",
    "hsm.uri": "hsm.core.uri",
    # key management
    "hsm.policy": "hsm.keys.attributes",
    "hsm.byok": "hsm.keys.byok",
    "hsm.export": "hsm.keys.export",
    "hsm.kdf": "hsm.keys.kdf",
    "hsm.keygen": "hsm.keys.keygen",
    "hsm.officer": "hsm.keys.officer",
    "hsm.orgkek": "hsm.keys.orgkek",
    "hsm.provision": "hsm.keys.provision",
    "hsm.roles": "hsm.keys.roles",
    "hsm.x509": "hsm.keys.x509",
    "hsm.xks": "hsm.keys.xks",
    # `hsm audit`, and the command line
    "hsm.audit": "hsm.inventory",
    "hsm.cli": "hsm.commands.main",
    "hsm.cliutil": "hsm.commands.options",
    "hsm.entry": "hsm.commands.entry",
    # token-free, in suite since an earlier release
    "hsm.files": "suite.files",
    "hsm.fingerprint": "suite.fingerprint",
    "hsm.tomlfile": "suite.tomlfile",
}


def install() -> None:
    moved.install(MOVED)
