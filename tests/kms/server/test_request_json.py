"""The request parser's fast path (orjson, for flat objects) answers exactly what the strict
parser (``json`` with its hooks: duplicate keys, non-finite numbers, lone surrogates) answers,
or leaves the body to it. Generated bodies, a fixed number of examples, no server."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kms.server import app
from kms.server.errors import HttpError

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                     st.floats(allow_nan=False), st.text(max_size=8))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def _strict(raw: bytes):
    fast, app._flat_object = app._flat_object, lambda raw: None
    try:
        return ("ok", app.parse_json(raw))
    except HttpError as exc:
        return ("error", exc.code)
    finally:
        app._flat_object = fast


def _same(a, b) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _check(raw: bytes) -> bool:
    fast = app._flat_object(raw)
    if fast is not None:
        strict = _strict(raw)
        assert strict[0] == "ok" and _same(fast, strict[1]), (raw, fast, strict)
    return fast is not None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _VALUES, max_size=5), st.sampled_from([
    lambda d: json.dumps(d).encode(), lambda d: json.dumps(d, ensure_ascii=False).encode(),
    lambda d: json.dumps(d, separators=(",", ":")).encode()]))
def test_the_fast_path_agrees_with_the_strict_parser_on_objects(body, dump):
    _check(dump(body))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_the_fast_path_agrees_with_the_strict_parser_on_any_bytes(prefix, suffix):
    for raw in (prefix, b'{"a":' + prefix + b"}", b'{"org":"x",' + prefix + suffix + b"}"):
        _check(raw)


def test_what_the_fast_path_leaves_to_the_strict_parser():
    """Repeated keys (orjson keeps the last quietly), a big integer (orjson makes it a float), a
    lone surrogate, non-finite numbers: each left to the strict parser, which answers its code."""
    assert _check(b'{"org":"a","purpose":"encrypt"}')            # the DEK request: fast
    for raw, code in ((b'{"org":"a","org":"b"}', "duplicate_key"),
                      (b'{"version":NaN}', "non_finite_number"),
                      (b'{"version":1e400}', "non_finite_number"),
                      (b'{"org":"\\ud800"}', "invalid_unicode")):
        assert not _check(raw) and _strict(raw) == ("error", code), raw
    assert not _check(b'{"version":18446744073709551616}')
    assert app.parse_json(b'{"version":18446744073709551616}') == {"version": 2 ** 64}
