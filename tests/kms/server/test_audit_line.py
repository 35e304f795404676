"""The audit writer's line (``audit.chained_line``) is byte for byte the canonical JSON and hash
that offline verification (``auditchain``) recomputes from the line it reads."""

from __future__ import annotations

import json

import pytest

from kms.server.audit import chained_line
from kms.server.auditchain import canonical, digest


@pytest.mark.parametrize("record", [
    {"seq": 1, "prev": "0" * 64, "ts": 1.25, "op": "dek.encrypt", "client": "uri:spiffe://x",
     "org": "ü\u2028\"quoted\"\x7f", "key_type": "field", "version": 3, "status": 200,
     "request_id": "abc", "worker": 0, "detail": "two\nlines", "late": True},
    {"seq": 2, "prev": "ab"},          # no key before "hash"
    {"client": "c", "detail": "d"},    # no key after "hash"
    {},
])
def test_the_chained_line_is_the_canonical_record_with_its_hash(record):
    got_hash, line = chained_line(dict(record))
    assert got_hash == digest(record)
    assert line == canonical({**record, "hash": got_hash}) + b"\n"
    assert digest(json.loads(line)) == got_hash       # what `kms audit verify` recomputes


def test_a_lone_surrogate_is_written_unambiguously_and_still_verifies():
    """orjson cannot encode a lone surrogate (no text) nor an integer beyond 64 bits; the writer
    must not fail on either (it would keep the log unavailable), and what it writes instead
    must not be a line some other client's text also gives (its escape text would be)."""
    got_hash, line = chained_line({"seq": 1, "op": "authz", "client": "cn:\ud800x",
                                   "version": 1 << 70})
    parsed = json.loads(line)
    assert parsed["client"] == {"utf16le_hex": "63006e003a0000d87800"}
    assert parsed["version"] == {"int": str(1 << 70)} and digest(parsed) == got_hash
    _, text_line = chained_line({"seq": 1, "op": "authz", "client": "cn:\\ud800x",
                                 "version": 1 << 70})
    assert text_line != line
