"""docs/assurance.md stays true: every test it cites exists, in the one file the citation names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# `kms/test_kms_store::name` is tests/kms/test_kms_store.py; `test_adversary::name` is a module at
# the top of tests/; `::name` repeats the module cited before it in the same row.
CITATION = re.compile(r"`((?:[a-z_]+/)?test_\w+)?::(\w+|\*)`")


def test_every_test_cited_in_the_assurance_case_exists():
    text = (ROOT / "docs" / "assurance.md").read_text()
    cited, missing, modules = 0, [], set()
    for row in text.splitlines():
        current = None
        for module, name in CITATION.findall(row):
            current = module or current
            assert current, f"a citation without a module: {row[:80]}"
            path = TESTS / f"{current}.py"
            if not path.is_file():
                missing.append(f"{current} (no file tests/{current}.py)")
                continue
            modules.add(current)
            source = path.read_text()
            cited += 1
            if name == "*":
                assert re.search(r"^def test_", source, re.M), f"{current}::* cites no test"
            elif not re.search(rf"^def {re.escape(name)}\(", source, re.M):
                missing.append(f"{current}::{name}")
    assert cited > 40
    assert missing == []
    # Citations reach into every test folder, so the check above really read the subfolders.
    assert {m.split("/")[0] for m in modules if "/" in m} == {"hsm", "ceremony", "kms", "service", "xks"}


def test_test_folders_do_not_shadow_the_packages_they_test():
    """tests/hsm, tests/kms, ... are the packages tests.hsm, tests.kms: `import hsm` in a test
    still gets the real driver layer, never a test folder."""
    import importlib

    for name in ("hsm", "ceremony", "kms"):
        real, folder = importlib.import_module(name), importlib.import_module(f"tests.{name}")
        assert TESTS not in Path(real.__file__).resolve().parents, real.__file__
        assert Path(real.__file__).resolve().parent.name == name
        assert Path(folder.__file__).resolve().parent == TESTS / name
    import tests.hsm.test_ops as ops_tests
    assert ops_tests.ops.__name__ == "hsm.ops"
