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
    assert {m.split("/")[0] for m in modules if "/" in m} == {"hsm", "ceremony", "kms", "service"}


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


# ---------------------------------------------------------------------------------- links
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    """Every page a reader can land on: README, the changelog, docs/ (any page, including ones
    added later), and the examples' README."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "examples" / "README.md"]
    return pages + sorted((ROOT / "docs").glob("*.md"))


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_and_anchor_resolves():
    checked, broken = 0, []
    for page in _pages():
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):      # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 50
    assert broken == []


def test_nothing_links_into_the_readme_reference_any_more():
    """The README is an entrance; its old sections live in docs/. A `README.md#section` link
    anywhere in the repository points at a section that no longer exists."""
    stale = []
    for path in ROOT.rglob("*"):
        if path.suffix not in {".md", ".py", ".sh", ".toml"} or \
                {".venv", ".git", "var", "node_modules"} & set(path.relative_to(ROOT).parts):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"README\.md#", line) and path != Path(__file__).resolve():
                stale.append(f"{path.relative_to(ROOT)}:{n}")
    assert stale == []
