"""The module paths hsm had before core/, keys/ and commands/ are the same module objects as the
new ones until the next release (hsm/_old_paths.py), and the project's own code uses the new ones."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hsm._old_paths import MOVED

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_each_old_path_is_the_new_module(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new
    parent, _, leaf = old.rpartition(".")
    namespace: dict = {}
    exec(f"from {parent} import {leaf} as via_from\nimport {old} as via_import", namespace)
    assert namespace["via_from"] is new and namespace["via_import"] is new
    # the module keeps its own identity: name, file and spec (relative imports and reload use it)
    assert new.__name__ == MOVED[old] and new.__spec__.name == MOVED[old]


def test_an_old_path_imported_first_is_the_module_the_new_path_then_gets():
    """In a fresh interpreter the old path comes first, as in a program written before the move:
    a patch through it is seen by a caller of the new path (one module, one state)."""
    code = ("from hsm import token as old_token\n"
            "from hsm.token import Token\n"
            "old_token.MARK = 1\n"
            "import hsm.core.token as new_token\n"
            "assert new_token is old_token and new_token.Token is Token and new_token.MARK == 1\n"
            "from hsm.policy import KeyPolicy\n"
            "from hsm.keys.attributes import KeyPolicy as new\n"
            "assert KeyPolicy is new\n"
            "print('same')\n")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "same"), proc.stderr


def test_a_name_that_never_existed_is_still_not_found():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hsm.tokens")


def test_the_type_checker_is_told_about_exactly_the_old_paths():
    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    listed = [set(o["module"]) for o in overrides if "hsm.token" in o["module"]]
    assert listed == [set(MOVED)]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_suite_itself_imports_only_the_new_paths():
    """hsm, ceremony, release, suite and their tests import the new paths (kms moves on its own
    schedule; tests/test_token_free.py imports the old ones on purpose)."""
    folders = ["hsm", "ceremony", "release", "suite", "tests/hsm", "tests/ceremony", "tests/suite"]
    files = [p for f in folders for p in (ROOT / f).rglob("*.py")]
    files += [p for p in (ROOT / "tests").glob("*.py") if p.name != "test_token_free.py"]
    old = {str(p.relative_to(ROOT)): sorted(_imports(p) & set(MOVED)) for p in files}
    assert {p: names for p, names in old.items() if names} == {}


def test_the_rewrite_script_moves_a_file_to_the_new_paths(tmp_path):
    """scripts/hsm-new-paths.py, as kms and downstream code will use it: every import form, and
    the rewritten file imports the same objects through the new paths only."""
    # (the old file path split in two: tests/test_docs.py checks that cited paths exist)
    before = ('"""Uses hsm.ops.sign and hsm/' 'policy.py."""\n'
              "import hsm.token\n"
              "from hsm import cliutil, ops, policy as policies, Pin  # the old ones\n"
              "from hsm.errors import (HsmError,\n"
              "                        UsageError)\n"
              "from hsm import audit\n"
              "RESULT = (hsm.token.Token, cliutil.open_token, ops.sign, policies.XKS_KEY,\n"
              "          HsmError, UsageError, audit.audit, Pin)\n")
    path = tmp_path / "user.py"
    path.write_text(before)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "hsm-new-paths.py"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"rewrote {path}", proc.stderr
    after = path.read_text()
    assert after.splitlines()[:8] == [
        '"""Uses hsm.core.ops.sign and hsm/keys/attributes.py."""',
        "import hsm.core.token",
        "from hsm.commands import options as cliutil",
        "from hsm.core import ops",
        "from hsm.keys import attributes as policies",
        "from hsm import Pin  # the old ones",
        "from hsm.core.errors import (HsmError,",
        "                        UsageError)"]
    # a renamed module keeps the file's local name, so a variable of that name is left alone
    assert "from hsm import inventory as audit" in after and "audit.audit" in after
    assert _imports(path) & set(MOVED) == set()
    old, new = {}, {}
    exec(before, old)
    exec(after, new)
    assert old["RESULT"] == new["RESULT"]
