"""What an org id may be, checked when an org is created (CLI and HTTP alike).

An org id is a name people read, type and match in policies (``orgs = ["acme-*"]``), so two ids
must never look alike: no leading or trailing blank (``" acme"``), no invisible character (a
zero-width space, a direction mark: Unicode "format" characters), no control character, no
line or paragraph separator, and NFC form (one spelling per letter). Orgs created before this
check keep working; only new ones are checked.
"""

from __future__ import annotations

import unicodedata

from .errors import ArgumentError, ArgumentTypeError

MAX_LENGTH = 255
_INVISIBLE = {"Cc": "a control character", "Cf": "an invisible (format) character",
              "Cs": "a surrogate", "Co": "a private-use character", "Cn": "an unassigned "
              "character", "Zl": "a line separator", "Zp": "a paragraph separator"}


def check(org_id: object) -> str:
    if not isinstance(org_id, str):
        raise ArgumentTypeError(f"an org id must be a string, not {type(org_id).__name__}")
    if not org_id or len(org_id) > MAX_LENGTH:
        raise ArgumentError(f"an org id has 1 to {MAX_LENGTH} characters (got {len(org_id)})")
    if org_id != org_id.strip():
        raise ArgumentError(f"org id {org_id!r} starts or ends with a blank",
                            hint="remove the blanks; ids are matched exactly")
    for i, ch in enumerate(org_id):
        kind = _INVISIBLE.get(unicodedata.category(ch))
        if kind is not None:
            raise ArgumentError(f"org id {org_id!r} has {kind} (U+{ord(ch):04X}) at position "
                                f"{i}", hint="use visible characters only; two ids must never "
                                             "look alike")
    if unicodedata.normalize("NFC", org_id) != org_id:
        raise ArgumentError(f"org id {org_id!r} is not in Unicode NFC form",
                            hint="write it in its composed form (NFC)")
    return org_id
