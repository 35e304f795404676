"""A lone surrogate sent as raw bytes (ED A0 80 / ED BF BF: UTF-8's form of U+D800/U+DFFF, which
UTF-8 forbids) rather than as a \\ud800 escape: the strict parser's json.loads(bytes) decodes
it ('surrogatepass'), so every string field of every JSON route must still refuse it with a
4xx (never a 500), and the node serves on."""

from __future__ import annotations

from tests.service_kit import node_fixtures

node, local = node_fixtures(lambda kit: kit.config())
BAD = "\xed\xa0\x80"


def test_a_raw_utf8_surrogate_in_any_string_field_is_a_4xx(node):
    status, body = node.call("POST", "/v1/tenants", {"org": "sur"}, who="admin")
    assert status == 201, body
    cases = [("/v1/dek", "data", {"org": "sur", "purpose": "encrypt", "fragment": BAD}),
             ("/v1/dek", "data", {"org": "sur" + BAD, "purpose": "encrypt"}),
             ("/v1/dek", "data", {"org": "sur", "purpose": BAD}),
             ("/v1/dek", "data", {"org": "sur", "purpose": "encrypt", "key_type": BAD}),
             ("/v1/tenants", "admin", {"org": "s" + BAD}),
             ("/v1/tenants", "admin", {"org": "s2", "org_type": BAD}),
             ("/v1/tenants", "admin", {"org": "s3", "secret": BAD}),
             ("/v1/tenants/sur/rotate", "admin", {"key_type": BAD}),
             ("/v1/tenants/sur/rotate", "admin", {"source": BAD}),
             ("/v1/tenants/sur/upload", "admin", {"material": BAD}),
             ("/v1/tenants/sur/upload", "admin", {"derivation": BAD, "material": "AA=="}),
             ("/v1/tenants/sur/byok-upload", "admin", {"secret": BAD, "hash": BAD}),
             ("/v1/tenants/sur/byok-upload", "admin", {"secret": "AA==", "oaep": BAD}),
             ("/v1/tenants/sur/destroy", "admin", {"key_type": BAD, "version": 1})]
    for path, who, fields in cases:
        raw = ("{" + ", ".join(f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {v}'
                               for k, v in fields.items()) + "}").encode("latin-1")
        got, answer = node.call("POST", path, raw=raw, who=who,
                                headers={"Content-Type": "application/json"})
        assert 400 <= got < 500 and "error" in answer, (path, raw, got, answer)
    assert node.call("GET", "/healthz")[0] == 200
    assert "Traceback" not in node.stderr()
