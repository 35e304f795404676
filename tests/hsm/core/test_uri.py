"""PKCS#11 URIs (RFC 7512): parsing, canonical output, refusals, and PIN hiding in repr."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hsm.core.errors import UsageError
from hsm.core.uri import Pkcs11Uri, parse

# Token labels are UTF-8 text: no NUL, and no lone surrogates (they have no UTF-8 encoding).
LABELS = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                 max_size=40)


# ----------------------------------------------------------------------------- parsing
def test_parses_path_attributes():
    u = parse("pkcs11:token=primary;serial=0123abcd;object=primary-signing;type=private;"
              "id=%01%a2%FF%00")
    assert u.token == "primary"
    assert u.serial == "0123abcd"
    assert u.object == "primary-signing"
    assert u.type == "private"
    assert u.id == b"\x01\xa2\xff\x00"
    assert (u.module_path, u.pin_source, u.pin_value) == (None, None, None)


def test_id_is_raw_bytes_and_other_values_are_utf8_text():
    u = parse("pkcs11:token=caf%C3%A9%20%3B%3F;object=a%25b;id=%C3%A9")
    assert u.token == "café ;?"
    assert u.object == "a%b"
    assert u.id == b"\xc3\xa9"  # id is bytes, never decoded as text


@pytest.mark.parametrize("kind", ["public", "private", "secret-key", "cert", "data"])
def test_every_rfc7512_object_type_is_accepted(kind):
    assert parse(f"pkcs11:object=k;type={kind}").type == kind


def test_parses_query_attributes():
    u = parse("pkcs11:token=regional-eu?module-path=/usr/lib/softhsm/libsofthsm2.so"
              "&pin-source=file:/run/secrets/hsm%20pin")
    assert u.token == "regional-eu"
    assert u.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert u.pin_source == "file:/run/secrets/hsm pin"


def test_module_name_is_accepted_and_not_kept():
    u = parse("pkcs11:token=t?module-name=softhsm2")
    assert u == Pkcs11Uri(token="t")


def test_empty_uri_selects_nothing_in_particular():
    assert parse("pkcs11:") == Pkcs11Uri()


def test_pin_value_is_parsed():
    assert parse("pkcs11:token=t?pin-value=12%2034").pin_value == "12 34"


# ----------------------------------------------------------------------------- output
def test_str_is_canonical_rfc7512():
    u = Pkcs11Uri(token="a b;c", serial="42", object="k/1", id=b"\x01\xab", type="private",
                  module_path="/usr/lib/x y.so", pin_source="env:HSM_PIN")
    assert str(u) == ("pkcs11:token=a%20b%3Bc;serial=42;object=k%2F1;id=%01%AB;type=private"
                      "?module-path=/usr/lib/x%20y.so&pin-source=env:HSM_PIN")


def test_round_trip_through_str_keeps_every_attribute():
    u = Pkcs11Uri(token="primary ✓", serial="9f00", manufacturer="SoftHSM project",
                  model="SoftHSM v2", object="primary-encryption", id=bytes(range(256)),
                  type="public", module_path="/opt/hsm/lib?x&y.so",
                  pin_source="file:/etc/hsm/pin;1")
    assert parse(str(u)) == u
    assert str(parse(str(u))) == str(u)


def test_str_of_a_parsed_uri_round_trips():
    text = "pkcs11:token=primary;object=primary-signing;type=private?pin-source=env:PIN"
    assert str(parse(text)) == text


@given(LABELS)
@example("")
@example("a;b?c=d&e%20f/g:h")
@example("%00 is not NUL")
@example("ü€𝄞 emoji 🔑")
def test_label_round_trip(label):
    u = Pkcs11Uri(token=label, object=label)
    text = str(u)
    assert text.startswith("pkcs11:")
    assert "?" not in text  # separators inside a label are always percent-encoded
    assert text.count(";") == 1
    back = parse(text)
    assert back.token == label and back.object == label
    assert back == u


@given(st.binary(max_size=64))
def test_id_round_trip(raw):
    u = Pkcs11Uri(object="k", id=raw)
    assert parse(str(u)).id == raw


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("text, named", [
    ("pkcs11:tokn=primary", "tokn"),                    # typo must not select "any token"
    ("pkcs11:token=primary;label=x", "label"),
    ("pkcs11:slot-id=0", "slot-id"),                    # slot numbers are never a selector
])
def test_unknown_path_attribute_is_refused(text, named):
    with pytest.raises(UsageError) as info:
        parse(text)
    assert repr(named) in str(info.value)


@pytest.mark.parametrize("text, named", [
    ("pkcs11:token=primary?pin=1234567", "pin"),
    ("pkcs11:token=primary?module=/x.so", "module"),
    ("pkcs11:token=primary?pin-value", "pin-value"),    # a query attribute without '='
])
def test_unknown_query_attribute_is_refused(text, named):
    with pytest.raises(UsageError) as info:
        parse(text)
    assert repr(named) in str(info.value)
    assert "1234567" not in str(info.value)  # a value (maybe a PIN) is never echoed


@pytest.mark.parametrize("kind", ["secret", "private-key", "PRIVATE", "certificate", ""])
def test_bad_type_is_refused(kind):
    with pytest.raises(UsageError) as info:
        parse(f"pkcs11:token=t;type={kind}")
    assert "type=" in str(info.value)


@pytest.mark.parametrize("text", [
    "token=primary",                         # no scheme
    "pkcs11:token",                          # path attribute without '='
    "pkcs11:token=a;token=b",                # given twice
    "pkcs11:token=%FF%FE",                   # not UTF-8
])
def test_malformed_uri_is_refused(text):
    with pytest.raises(UsageError):
        parse(text)


@pytest.mark.parametrize("text", ["pkcs11:token=t?pin-source=file:%FF",
                                  "pkcs11:token=t?module-path=/%C3"])
def test_non_utf8_query_value_is_a_usage_error(text):
    with pytest.raises(UsageError):
        parse(text)


# ----------------------------------------------------------------------------- PIN hiding
def test_repr_and_str_never_show_pin_value():
    u = parse("pkcs11:token=primary?pin-value=s3cr3t-9876")
    assert u.pin_value == "s3cr3t-9876"
    for shown in (repr(u), str(u), f"{u!r}", repr([u]), repr({"uri": u})):
        assert "s3cr3t-9876" not in shown
    assert "***" in repr(u)
    assert "pin-value" not in str(u)
    assert repr(Pkcs11Uri(token="primary")).count("***") == 0


@given(st.text(alphabet="0123456789", min_size=6, max_size=16))
def test_repr_hides_any_pin_value(pin):
    u = parse(f"pkcs11:token=t;object=o?pin-source=env:X&pin-value={pin}")
    assert u.pin_value == pin
    assert pin not in repr(u)
    assert pin not in str(u)
