"""Module paths kept after a move, until the next release: an old path imports as the *very same
module object* as its new one (``hsm.token is hsm.core.token``), not a copy that re-exports its
names. Modules hold state (a loaded PKCS#11 module, pools, caches) and code and tests patch
module attributes: every caller must see one module whichever path it imported. Only modules
are aliased; no function is wrapped, so calls cost the same.

Each package installs its own table (``hsm._old_paths``, ``kms``). The finder is consulted first,
so a stale file left at an old path by copying a new tree over an old one cannot load as a
second copy of the module; it answers only the names in its table.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Mapping
from types import ModuleType


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path (a key of ``table``) with the module at its new path."""

    def __init__(self, table: Mapping[str, str]):
        self.table = table

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.table:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.table[spec.name])
        # The import system keeps the module's __name__, __file__ and __package__ but sets
        # __spec__ to the old name's: keep its own, given back in exec_module (relative imports,
        # importlib.reload and pickling read it).
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # already executed under its new name
        module.__spec__ = module.__spec__.loader_state  # type: ignore[union-attr]


def install(table: Mapping[str, str]) -> None:
    """Serve ``table``'s old paths in this process (once per table)."""
    if not any(isinstance(f, MovedModules) and f.table is table for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules(table))
