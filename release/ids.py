"""Release ids: dotted numbers ("7", "2026.1"), ordered numerically part by part."""

from __future__ import annotations

import re

# At most four parts of at most nine digits: ordered numerically, a release id can only move
# up, so an id without a bound (a 41-digit one once recorded) would block every later release
# for good. Nine digits take a release a second for 30 years, or a YYYYMMDD date.
RELEASE_ID = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}")


def release_key(release: str) -> tuple[int, ...]:
    """The sort key of a release id: "10" comes after "9", "2026.10" after "2026.9"."""
    return tuple(int(part) for part in release.split("."))
