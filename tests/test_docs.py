"""The docs cannot drift from the code.

- docs/assurance.md: every test it cites exists, in the one file the citation names;
- README.md and docs/*.md (any page, including ones added later): every command shown exists with
  the flags shown, and every relative link and #anchor resolves;
- the code: every repository path a docstring, comment or message cites exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# `kms/store/test_repository::name` is tests/kms/store/test_repository.py,
# `hsm/keys/test_orgkek::name` is tests/hsm/keys/test_orgkek.py; `test_adversary::name` is a module
# at the top of tests/; `::name` repeats the module cited before it in the same row.
CITATION = re.compile(r"`((?:[a-z_]+/)*test_\w+)?::(\w+|\*)`")


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
    folders = {m.rsplit("/", 1)[0] for m in modules if "/" in m}
    assert {f.split("/")[0] for f in folders} == {"hsm", "ceremony", "kms"}
    assert folders >= {"kms/node", "kms/customer_keys", "kms/caller", "kms/server", "kms/xks"}


def test_test_folders_do_not_shadow_the_packages_they_test():
    """tests/hsm, tests/kms, ... are the packages tests.hsm, tests.kms: `import hsm` in a test
    still gets the real driver layer, never a test folder."""
    import importlib

    for name in ("hsm", "ceremony", "kms"):
        real, folder = importlib.import_module(name), importlib.import_module(f"tests.{name}")
        assert TESTS not in Path(real.__file__).resolve().parents, real.__file__
        assert Path(real.__file__).resolve().parent.name == name
        assert Path(folder.__file__).resolve().parent == TESTS / name
    import tests.hsm.core.test_ops as ops_tests
    assert ops_tests.ops.__name__ == "hsm.core.ops"


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


def _repository_files(suffixes: tuple[str, ...], under: tuple[str, ...] = ("",)) -> list[Path]:
    """The repository's own files with these suffixes: not .venv, .git or var/ (runtime)."""
    import os
    out = []
    for top in under:
        for folder, dirs, files in os.walk(ROOT / top):
            dirs[:] = [d for d in dirs if d not in {".venv", ".git", "var", "__pycache__",
                                                    ".mypy_cache", ".pytest_cache"}]
            out += [Path(folder) / f for f in files if f.endswith(suffixes)]
    return sorted(out)


def test_nothing_links_into_the_readme_reference_any_more():
    """The README is an entrance; its old sections live in docs/. A `README.md#section` link
    anywhere in the repository points at a section that no longer exists."""
    stale = []
    for path in _repository_files((".md", ".py", ".sh", ".toml")):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"README\.md#", line) and path != Path(__file__).resolve():
                stale.append(f"{path.relative_to(ROOT)}:{n}")
    assert stale == []


# ---------------------------------------------------------------------------------- commands
# Every `hsm ...`, `ceremony ...`, `kms ...` and `make ...` a reader is shown (in a code block or
# inline code) must be one the CLI accepts: each subcommand exists, each flag exists *at that
# level* (argparse refuses a subcommand's flag before it), and a value shown for a flag with
# choices is one of them. The parsers are the CLIs' own build_parser(), read in-process: the
# --help a reader would run, without a process per command. `a|b`, `[--flag X]` and
# `(--a | --b X)` are the usage notation the pages use; UPPER-CASE words are placeholders.
import argparse  # noqa: E402
import shlex  # noqa: E402

PROGRAMS = ("hsm", "ceremony", "kms", "make")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _parser(program: str) -> argparse.ArgumentParser:
    import importlib

    from hsm.commands.entry import COMMANDS
    return importlib.import_module(COMMANDS[program]).build_parser()


def _shown_commands() -> list[tuple[str, str]]:
    """(where, command line) for every command shown in README.md, docs/*.md and examples/."""
    out = []
    for page in [ROOT / "README.md", ROOT / "examples" / "README.md"] + \
            sorted((ROOT / "docs").glob("*.md")):
        lines, fenced, lang = page.read_text().splitlines(), False, ""
        pending = ""
        for n, line in enumerate(lines, 1):
            where = f"{page.relative_to(ROOT)}:{n}"
            if FENCE.match(line.lstrip()):
                fenced, lang = not fenced, line.lstrip()[3:].strip()
                continue
            if fenced:
                if lang not in ("", "sh", "bash", "shell", "console"):
                    continue
                code = re.sub(r"(^|\s)#.*$", "", pending + line.lstrip().removeprefix("$ "))
                if code.rstrip().endswith("\\"):
                    pending = code.rstrip()[:-1] + " "
                    continue
                pending = ""
                for part in re.split(r"&&|;", code):
                    out.append((where, part.strip()))
            else:
                for code in INLINE.findall(line):
                    out.append((where, code.replace("\\|", "|").strip()))
    return [(w, c) for w, c in out if c.split(" ", 1)[0] in PROGRAMS and " " in c]


def _words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:          # an unbalanced quote in prose: the plain words still say enough
        words = command.split()
    # `init | import | status` is one alternation, as is `--generate | --in`.
    joined: list[str] = []
    for w in words:
        if joined and (w == "|" or joined[-1].endswith("|")):
            joined[-1] += w
        else:
            joined.append(w)
    return joined


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _check_value(action: argparse.Action, value: str) -> str | None:
    """A value shown for an option or positional with choices must be one of them, unless it is
    a placeholder (no alternative is a choice: `--key-type T`)."""
    if not action.choices:
        return None
    choices = {str(c) for c in action.choices}
    alts = [v for v in value.split("|") if v]
    if any(v in choices for v in alts):
        bad = [v for v in alts if v not in choices]
        if bad:
            return f"{'/'.join(action.option_strings) or action.dest}: {bad} not in {sorted(choices)}"
    elif all(re.fullmatch(r"[a-z0-9-]+", v) for v in alts) or (
            all(c.isupper() for c in choices) and all(re.fullmatch(r"[A-Z0-9_]{2,}", v)
                                                      for v in alts)):
        return f"{'/'.join(action.option_strings) or action.dest}: {alts} not in {sorted(choices)}"
    return None


def _check_command(command: str, makefile_targets: set[str]) -> str | None:
    words = _words(command)
    program, rest = words[0], words[1:]
    if program == "make":
        missing = [w for w in rest if not w.startswith("-") and "=" not in w
                   and w not in makefile_targets]
        return f"no make target {missing}" if missing else None
    levels = [_parser(program)]          # the parsers the words so far could be at
    positional = 0
    i = 0
    while i < len(rest):
        alts = [a.strip("[]()") for a in rest[i].split("|")]
        alts = [a for a in alts if a and a != "..."]
        i += 1
        if not alts:
            continue
        if alts[0].startswith("-"):
            takes_value = False
            for flag in alts:
                name = flag.split("=", 1)[0]
                found = [_options(p)[name] for p in levels if name in _options(p)]
                if not found:
                    return f"{name} is not an option of `{' '.join(words[:1 + i - 1])}`"
                takes_value = found[0].nargs != 0 and "=" not in flag
            if takes_value and i < len(rest):
                value = rest[i].strip("[]()")
                i += 1
                if value and not value.startswith("-"):
                    problem = _check_value(found[0], value)
                    if problem:
                        return problem
            continue
        subs = [_subcommands(p) for p in levels]
        if any(subs) and positional == 0 and not any(_positionals(p) for p in levels):
            known = [s for s in subs if s]
            missing = [a for a in alts if not any(a in s for s in known)]
            if missing:
                return f"no subcommand {missing} of `{' '.join(words[:i - 1] or words[:1])}`"
            levels = [s[a] for a in alts for s in known if a in s]
            positional = 0
            continue
        # a positional: check it against choices where the parser has them (`tenant create`)
        candidates = [_positionals(p) for p in levels]
        for pos in candidates:
            if positional < len(pos):
                problem = _check_value(pos[positional], rest[i - 1].strip("[]()"))
                if problem:
                    return problem
        positional += 1
    return None


def test_every_command_shown_in_the_docs_exists_with_its_flags():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = _shown_commands()
    problems = [f"{where}: `{cmd}`: {problem}" for where, cmd in shown
                if (problem := _check_command(cmd, targets))]
    assert len(shown) > 80
    assert {c.split()[0] for _, c in shown} == set(PROGRAMS)
    assert problems == []


def test_the_command_check_catches_what_drifts():
    """The checker above refuses what a stale page would show."""
    targets = {"demo", "test"}
    assert _check_command("kms --config N.toml tenant create --org O", targets) is None
    assert _check_command("kms --config N.toml init | import | status [--json]", targets) is None
    assert "--jsn" in _check_command("hsm audit --token L --jsn", targets)
    assert "no subcommand" in _check_command("ceremony approv --plan P", targets)
    assert "not in" in _check_command("kms --config N tenant upload --derivation PBKDF3", targets)
    assert "not in" in _check_command("kms --config N tenant creat --org O", targets)
    assert "--config" in _check_command("kms tenant list --config N.toml", targets)  # wrong level
    assert "no make target" in _check_command("make bench", targets)
    assert _check_command("hsm cloud-key create --token L --label N [--bits 128|192|256]",
                          targets) is None
    assert "not in" in _check_command("hsm cloud-key create --token L --label N --bits 512",
                                      targets)


# ------------------------------------------------------------------------------ docstrings
# A file (`kms/store/repository.py`), a folder (`kms/store/`), or a test citation as
# docs/assurance.md writes them (`kms/store/test_repository::name` is
# tests/kms/store/test_repository.py).
CITED_PATH = re.compile(r"\b((?:hsm|release|ceremony|kms|tests|benchmarks|scripts|docs|examples)"
                        r"/[\w./-]*[\w/])(::)?")


def _cited_file(cited: str, citation: str) -> str | None:
    """The repository path a citation names, or None when it names none (a bare word)."""
    cited = cited.rstrip(".")
    if re.search(r"[A-Z]{3,}|\*", cited):          # a pattern: NNNN_name.sql, FOLDER/MODULE
        return None
    if citation:
        return f"tests/{cited}.py"
    return cited if re.search(r"\.\w+$|/$", cited) else None


def test_every_path_the_code_cites_exists():
    """Docstrings, comments and messages that name a file or folder of the repository name one
    that exists (a test file that moved, a page that was renamed)."""
    checked, missing = 0, []
    for path in _repository_files((".py",), under=("hsm", "release", "ceremony", "kms", "tests",
                                                   "benchmarks")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for cited, citation in CITED_PATH.findall(line):
                cited = _cited_file(cited, citation)
                if cited is None:
                    continue
                checked += 1
                if not (ROOT / cited).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {cited}")
    assert checked > 15
    assert missing == []


def _python_snippets() -> list[tuple[str, str]]:
    out = []
    for page in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for m in re.finditer(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
            line = page.read_text()[:m.start()].count("\n") + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def test_every_python_snippet_compiles_and_imports_what_exists():
    """A snippet a reader copies parses, and each name it imports is there (`...` stands for
    the reader's own code)."""
    import ast
    import importlib
    import importlib.util
    snippets, problems = _python_snippets(), []
    for where, code in snippets:
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            problems.append(f"{where}: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                problems += [f"{where}: {node.module}.{a.name}" for a in node.names
                             if not hasattr(module, a.name)
                             and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    importlib.import_module(a.name)
    assert len(snippets) >= 3
    assert problems == []
