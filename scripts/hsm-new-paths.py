"""Rewrite a Python file's imports of hsm's old module paths to the new ones, in place.

    .venv/bin/python scripts/hsm-new-paths.py FILE.py...

The old paths (``hsm.token``, ``hsm.policy``, ``hsm.cliutil``...: the table in
hsm/_old_paths.py) keep working until the next release; this moves code off them:
``from hsm.token import Token`` -> ``from hsm.core.token import Token``,
``from hsm import ops, policy as policies`` -> ``from hsm.core import ops`` and
``from hsm.keys import attributes`` (with ``policies.X`` -> ``attributes.X`` in the file), and
the dotted names and file paths in docstrings and comments (``hsm.ops.sign``, ``hsm/policy.py``).
``policy`` (or ``policies``) and ``audit`` are imported under their new names (attributes,
inventory) and the file's uses follow; other modules keep the name the file gave them
(``from hsm.commands import options as cliutil``). Prints each file it changed; re-sort the imports afterwards if the
project sorts them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hsm._old_paths import MOVED  # noqa: E402

_LEAVES = "|".join(sorted((old.removeprefix("hsm.") for old in MOVED), key=len, reverse=True))
IMPORT_FROM = re.compile(r"^([ \t]*)from (hsm(?:\.\w+)*) import (\([^)]*\)|[^\n#]*)(#[^\n]*)?",
                         re.M)
DOTTED = re.compile(rf"(?<![\w./])hsm\.({_LEAVES})\b(?!\.py)")
PATH = re.compile(rf"(?<![\w./])hsm/({_LEAVES})\.py\b")


def _names(text: str) -> list[tuple[str, str]]:
    """(name, alias or '') of an import's name list."""
    items = [x.strip() for x in text.strip().strip("()").replace("\n", " ").split(",")]
    return [(n.strip(), a.strip()) for n, _, a in (x.partition(" as ") for x in items if x)]


def rewrite(text: str) -> str:
    def one(m: re.Match) -> str:
        indent, module, names, comment = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if module in MOVED:
            return f"{indent}from {MOVED[module]} import {names.rstrip()}{comment and '  ' + comment}"
        if module != "hsm":
            return m.group(0)
        groups: dict[str, list[str]] = {}
        for name, alias in _names(re.sub(r"#[^\n]*", "", names)):
            new = MOVED.get(f"hsm.{name}")
            if new is None:
                groups.setdefault("hsm", []).append(f"{name} as {alias}" if alias else name)
                continue
            parent, _, leaf = new.rpartition(".")
            # A renamed module keeps the file's local name (``inventory as audit``): renaming
            # its uses would also rename any variable of that name.
            local = alias or name
            groups.setdefault(parent, []).append(leaf if local == leaf else f"{leaf} as {local}")
        lines = [f"{indent}from {parent} import {', '.join(items)}"
                 for parent, items in groups.items()]
        return "\n".join(lines) + (f"  {comment}" if comment else "")

    out = IMPORT_FROM.sub(one, text)
    out = DOTTED.sub(lambda m: MOVED["hsm." + m.group(1)], out)
    return PATH.sub(lambda m: MOVED["hsm." + m.group(1)].replace(".", "/") + ".py", out)


def main(paths: list[str]) -> int:
    for name in paths:
        path = Path(name)
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
