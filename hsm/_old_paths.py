"""The module paths hsm had before core/, keys/ and commands/, kept until the next release.

Each old path imports as the *very same module object* as the new one (``hsm.token is
hsm.core.token``), not a copy that re-exports its names: modules hold state (the loaded PKCS#11
module, the OS-locking ``C_Initialize``, pools), and code and tests patch module attributes, which
must be seen by every caller whichever path it imported. The alias is resolved once, at import;
calls go straight to the functions (nothing is wrapped), so the hot path costs the same.

How: a finder at the end of ``sys.meta_path`` (it is asked only after the real files were not
found) answers an old name with the new module. ``import hsm.token``, ``from hsm import token``
and ``from hsm.token import Token`` all work. The type checker does not run this code: for it the
old paths are untyped (``[tool.mypy]`` in pyproject.toml lists them), so new code imports the new
paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

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


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        # The import system keeps the module's __name__, __file__ and __package__ but sets
        # __spec__ to the old name's: keep its own, given back in exec_module (relative imports
        # and importlib.reload read it).
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # already executed under its new name
        module.__spec__ = module.__spec__.loader_state  # type: ignore[union-attr]


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
