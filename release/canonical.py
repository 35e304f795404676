"""The one canonical JSON encoding the suite signs and hashes (bundle manifests, transcript
records): sorted keys, no spaces, ASCII only, so equal objects have equal bytes."""

from __future__ import annotations

import json


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
