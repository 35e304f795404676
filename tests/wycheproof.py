"""Project Wycheproof vectors (``<repo>/../shared/vectors/wycheproof``) run through the project's
own code paths, and the bookkeeping that keeps every vector accounted for.

A check function takes (group, test) and returns whether the project *accepted* the vector
(a MAC matched, a ciphertext opened to the expected plaintext, a signature verified). It may
raise :class:`Beyond` when the token (or the project's one format) cannot take the vector at
all; a token refusal is only counted as a limit when it is the CKR code that limit gives.
:func:`run` then holds every vector to its ``result``: ``valid`` must be accepted, ``invalid``
must not (``acceptable`` may go either way), and the counts are returned for the test to assert.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsm.core.errors import HsmError

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "wycheproof"
_labels = itertools.count()


class Beyond(Exception):
    """The vector is outside what the token or the project's format can take (the reason)."""


@dataclass
class Outcome:
    checked: int = 0
    accepted: int = 0
    beyond: Counter = field(default_factory=Counter)
    wrong: list = field(default_factory=list)

    def counts(self) -> tuple[int, int, dict]:
        return self.checked, self.accepted, dict(self.beyond)


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    if not VECTORS.is_dir():
        pytest.skip(f"the Project Wycheproof vectors are absent: {VECTORS} does not exist")
    return json.loads((VECTORS / name).read_text())


def run(name: str, check, *, limits: dict[str, str] | None = None, select=None) -> Outcome:
    """Every test of ``name`` (or those ``select(group, test)`` keeps) through ``check``.
    ``limits`` maps a CKR name to the token's limit it stands for: an HsmError with that code
    on a valid vector is that limit; any token error on an invalid vector is its refusal."""
    out = Outcome()
    for group in load(name)["testGroups"]:
        for test in group["tests"]:
            if select is not None and not select(group, test):
                continue
            try:
                got = check(group, test)
            except Beyond as exc:
                out.beyond[str(exc)] += 1
                continue
            except HsmError as exc:
                if limits and exc.ckr in limits and test["result"] != "invalid":
                    out.beyond[limits[exc.ckr]] += 1
                    continue
                if test["result"] != "invalid":
                    out.wrong.append((test["tcId"], f"valid vector refused: {exc}"))
                    continue
                got = False
            out.checked += 1
            out.accepted += bool(got)
            if test["result"] == "valid" and not got:
                out.wrong.append((test["tcId"], "valid vector refused"))
            elif test["result"] == "invalid" and got:
                out.wrong.append((test["tcId"], f"invalid vector accepted ({test['comment']})"))
    return out


def total(name: str, select=None) -> int:
    return sum(1 for g in load(name)["testGroups"] for t in g["tests"]
               if select is None or select(g, t))


def label(prefix: str) -> str:
    return f"wp-{prefix}-{next(_labels)}"


def session_key(token, template: dict, prefix: str):
    """Import a vector's key as a session object on ``token`` (a throw-away test token: the
    one place the suite puts outside key material into a token); its KeyRef."""
    from pkcs11 import Attribute
    from hsm.core.token import KeyRef
    name = label(prefix)
    token.run_on_anchor("C_CreateObject", lambda lease: lease.session.create_object(
        {**template, Attribute.LABEL: name, Attribute.TOKEN: False}), name)
    return KeyRef(name, template[Attribute.CLASS])


def destroy(token, ref) -> None:
    from hsm.core import ops
    ops.destroy_session_object(token, ref)
