"""A lone surrogate spelled as raw bytes (ED BF BF, the UTF-8 form of U+DFFF that UTF-8 forbids)
rather than as a \\udfff escape is refused like the escape: 400 invalid_unicode (the strict
parser's json.loads(bytes) decodes with 'surrogatepass')."""

from __future__ import annotations

from tests.service_kit import node_fixtures

node, local = node_fixtures(lambda kit: kit.config())


def test_a_raw_utf8_surrogate_is_refused_like_its_escape(node):
    status, body = node.call("POST", "/v1/tenants", {"org": "sur"}, who="admin")
    assert status == 201, body
    for raw in (b'{"org": "sur", "purpose": "encrypt", "fragment": "\\udfff"}',
                b'{"org": "sur", "purpose": "encrypt", "fragment": "\xed\xbf\xbf"}',
                b'{"org": "sur\xed\xa0\x80", "purpose": "encrypt"}'):
        got, answer = node.call("POST", "/v1/dek", raw=raw,
                                headers={"Content-Type": "application/json"})
        assert (got, answer["error"]) == (400, "invalid_unicode"), (raw, answer)
