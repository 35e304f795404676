"""Two clones on one machine each run their own code.

Once, on a Python that is not "externally managed", `make` installed the package editable into
the shared interpreter, so the last clone that ran it decided which code every clone's commands
ran. Now scripts/install-deps.sh (what `make` runs) always installs into the clone's own .venv.
This runs that script in two fresh clones, one after the other and the first again, and asks
each clone's interpreter - from a neutral directory, so the working directory cannot answer for
it - where every package and command comes from.

To keep it to seconds, each clone's new .venv sees this interpreter's installed dependencies
through a .pth line instead of downloading them; the package itself is installed by the script,
exactly as `make` does (about 15 s a clone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hsm", "release", "ceremony", "kms")


def _plain_env() -> dict[str, str]:
    """This environment (pip's configuration included) without any virtual environment in it:
    `python3` is the machine's, as for someone who just cloned."""
    path = ":".join(d for d in os.environ.get("PATH", "/usr/bin:/bin").split(":")
                    if "/.venv/" not in d + "/")
    return {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
            "PATH": path, "PYTHON": "python3"}


def _clone(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, timeout=120)
    subprocess.run(["python3", "-m", "venv", str(target / ".venv")], check=True, timeout=120,
                   env=_plain_env())
    site = next((target / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "suite-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target


def _install(clone: Path) -> str:
    proc = subprocess.run(["bash", "scripts/install-deps.sh"], cwd=clone, capture_output=True,
                          text=True, timeout=600, env=_plain_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _where(clone: Path) -> dict[str, str]:
    code = ("import importlib, sys; [print(n, importlib.import_module(n).__file__) "
            f"for n in {PACKAGES!r}]")
    out = subprocess.run([str(clone / ".venv/bin/python"), "-c", code], cwd="/",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.mark.slow
def test_two_clones_each_run_their_own_code(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: there is nothing to clone")
    a, b = _clone(tmp_path, "a"), _clone(tmp_path, "b")
    assert "installing the hsm-suite package" in _install(a)
    assert "installing the hsm-suite package" in _install(b)
    assert "installing" not in _install(a)  # b's install changed nothing a runs
    for clone in (a, b):
        where = _where(clone)
        assert set(where) == set(PACKAGES)
        for name, path in where.items():
            assert Path(path).resolve().is_relative_to(clone.resolve()), (clone, name, path)
        for command in ("hsm", "ceremony", "kms"):
            script = clone / ".venv/bin" / command
            assert script.read_text().splitlines()[0] == f"#!{clone / '.venv/bin/python'}"
            run = subprocess.run([str(script), "--help"], cwd="/", capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 0 and f"usage: {command}" in run.stdout, run.stderr
