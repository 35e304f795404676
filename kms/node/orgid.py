"""What an org id may be, checked when an org is created (CLI and HTTP alike).

An org id is a name people read, type and match in policies (``orgs = ["acme-*"]``), so two ids
must never look alike: no leading or trailing blank (``" acme"``), no invisible character (a
zero-width space, a direction mark: Unicode "format" characters), no control character, no
line or paragraph separator. Orgs created before this check keep working; only new ones are
checked.
"""

from __future__ import annotations

import re

from kms.errors import ArgumentError, ArgumentTypeError

MAX_LENGTH = 255
# Control characters (C0, DEL, C1) and the invisible ones that make two ids look alike: soft
# hyphen, Arabic letter mark, Mongolian vowel separator, zero-width spaces and joiners, direction
# marks and embeddings, line and paragraph separators, word joiner and invisible operators,
# byte-order mark, interlinear annotation marks. The same set is the pattern of "org" in
# POST /v1/tenants (kms/server/openapi.json), so the document says what is refused.
INVISIBLE = (r"\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
             r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb")  # regex text: \uXXXX escapes
PATTERN = rf"^[^\s{INVISIBLE}](?:[^{INVISIBLE}]*[^\s{INVISIBLE}])?$"
_INVISIBLE = re.compile(f"[{INVISIBLE}]")


def check(org_id: object) -> str:
    if not isinstance(org_id, str):
        raise ArgumentTypeError(f"an org id must be a string, not {type(org_id).__name__}")
    if not org_id or len(org_id) > MAX_LENGTH:
        raise ArgumentError(f"an org id has 1 to {MAX_LENGTH} characters (got {len(org_id)})")
    found = _INVISIBLE.search(org_id)
    if found is not None:
        raise ArgumentError(f"org id {org_id!r} has an invisible or control character "
                            f"(U+{ord(found.group()):04X}) at position {found.start()}",
                            hint="use visible characters only; two ids must never look alike")
    if re.match(PATTERN, org_id) is None:  # what is left: a blank at either end
        raise ArgumentError(f"org id {org_id!r} starts or ends with a blank",
                            hint="remove the blanks; ids are matched exactly")
    return org_id
