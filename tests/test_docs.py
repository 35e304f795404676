"""docs/assurance.md stays true: every test it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_cited_in_the_assurance_case_exists():
    text = (ROOT / "docs" / "assurance.md").read_text()
    cited, missing = 0, []
    for row in text.splitlines():
        current = None
        for module, name in re.findall(r"`(test_\w+)?::(\w+|\*)`", row):
            current = module or current
            assert current, f"a citation without a module: {row[:80]}"
            source = (ROOT / "tests" / f"{current}.py").read_text()
            cited += 1
            if name != "*" and not re.search(rf"^def {re.escape(name)}\(", source, re.M):
                missing.append(f"{current}::{name}")
    assert cited > 40
    assert missing == []
