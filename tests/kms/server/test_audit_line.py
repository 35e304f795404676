"""The audit writer's one-encoding line (``audit.chained_line``) is byte for byte the canonical
JSON and hash that offline verification (``auditchain``) recomputes."""

from __future__ import annotations

import pytest

from kms.server.audit import chained_line
from kms.server.auditchain import canonical, digest


@pytest.mark.parametrize("record", [
    {"seq": 1, "prev": "0" * 64, "ts": 1.25, "op": "dek.encrypt", "client": "uri:spiffe://x",
     "org": "ü\u2028\"quoted\"", "key_type": "field", "version": 3, "status": 200,
     "request_id": "abc", "worker": 0, "detail": "two\nlines", "late": True},
    {"seq": 2, "prev": "ab"},          # no key before "hash"
    {"client": "c", "detail": "d"},    # no key after "hash"
    {},
])
def test_the_chained_line_is_the_canonical_record_with_its_hash(record):
    got_hash, line = chained_line(dict(record))
    assert got_hash == digest(record)
    assert line == canonical({**record, "hash": got_hash}) + b"\n"
