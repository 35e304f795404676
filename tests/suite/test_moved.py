"""suite.moved: an old module path is the new module itself, even where a stale file still
stands at the old path (a new tree copied over an old one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_old_path_is_the_new_module_even_beside_a_stale_file(tmp_path):
    pkg = tmp_path / "movedpkg"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from suite import moved\nMOVED = {'movedpkg.token': 'movedpkg.core.token'}\n"
        "moved.install(MOVED)\n")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "token.py").write_text("STATE = []\n")
    (pkg / "token.py").write_text("raise SystemExit('the stale copy was loaded')\n")
    code = textwrap.dedent("""
        import importlib, sys
        import movedpkg.token as old
        from movedpkg.core import token as new
        from movedpkg import token as again
        assert old is new is again, (old, new)
        old.STATE.append(1)
        assert new.STATE == [1] and new.__spec__.name == "movedpkg.core.token"
        assert importlib.reload(old) is new
        print("same module")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout == "same module\n", proc.stderr
