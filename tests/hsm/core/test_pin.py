"""PINs: hidden in repr/str, read from env:/file: sources, never prompted for without a terminal,
never pickled."""

from __future__ import annotations

import copy
import io
import logging
import pickle
import sys

import pytest

from hsm.core import pin as pins
from hsm.core.errors import PinError, UsageError
from hsm.core.pin import Pin

SECRET = "4711-s3cret-PIN"


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_tty(monkeypatch):
    """Run as under CI: stdin is not a terminal and no default PIN variable is set."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.delenv("TEST_HSM_PIN", raising=False)


# ----------------------------------------------------------------------------- hiding
def test_repr_and_str_hide_the_value():
    p = Pin(SECRET)
    assert p.reveal() == SECRET
    shown = [repr(p), str(p), f"{p}", f"{p!r}", "%s" % p, "{}".format(p), repr([p]),
             repr({"pin": p}), repr((p,))]
    for text in shown:
        assert SECRET not in text
        assert "hidden" in text


def test_pin_in_a_log_record_is_hidden(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("hsm.test").info("logging in with %s / %r", Pin(SECRET), Pin(SECRET))
    assert caplog.records
    assert SECRET not in caplog.text


def test_pin_in_an_exception_message_is_hidden():
    try:
        raise RuntimeError(f"login failed with {Pin(SECRET)}")
    except RuntimeError as exc:
        assert SECRET not in str(exc)


def test_equality_compares_values():
    assert Pin("1234") == Pin("1234")
    assert Pin("1234") != Pin("12345")
    assert Pin("1234") != "1234"  # a Pin is not a str
    assert hash(Pin("1234")) == hash(Pin("1234"))


def test_empty_pin_is_refused():
    with pytest.raises(PinError):
        Pin("")


def test_a_pin_has_no_dict_to_leak_through():
    assert not hasattr(Pin(SECRET), "__dict__")  # vars()/debuggers cannot dump it as a dict


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pin_cannot_be_pickled(protocol):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Pin(SECRET), protocol=protocol)
    with pytest.raises(TypeError):  # nor inside another object
        pickle.dumps({"user": "officer", "pin": Pin(SECRET)}, protocol=protocol)


def test_a_pin_cannot_be_copied_by_the_pickle_protocol():
    with pytest.raises(TypeError):
        copy.deepcopy([Pin(SECRET)])


# ----------------------------------------------------------------------------- sources
def test_env_source(monkeypatch):
    monkeypatch.setenv("TEST_PIN_VAR", SECRET)
    assert pins.from_source("env:TEST_PIN_VAR").reveal() == SECRET


@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n",
                                     SECRET + "\nsecond line\n"])
def test_file_source_reads_the_first_line(tmp_path, content):
    f = tmp_path / "pin"
    f.write_bytes(content.encode())
    assert pins.from_source(f"file:{f}").reveal() == SECRET


def test_file_source_keeps_inner_spaces(tmp_path):
    f = tmp_path / "pin"
    f.write_text(" a b \n")
    assert pins.from_source(f"file:{f}").reveal() == " a b "


def test_missing_env_var_names_the_source_not_a_pin(monkeypatch):
    monkeypatch.setenv("HSM_PIN", SECRET)  # a PIN that exists elsewhere must not leak
    monkeypatch.delenv("TEST_PIN_MISSING", raising=False)
    with pytest.raises(PinError) as info:
        pins.from_source("env:TEST_PIN_MISSING")
    message = str(info.value)
    assert "env:TEST_PIN_MISSING" in message
    assert SECRET not in message


def test_missing_file_names_the_source(tmp_path):
    missing = tmp_path / "no-such-pin-file"
    with pytest.raises(PinError) as info:
        pins.from_source(f"file:{missing}")
    assert str(missing) in str(info.value)


def test_unreadable_file_names_the_source_not_its_content(tmp_path, monkeypatch):
    monkeypatch.setenv("HSM_PIN", SECRET)
    directory = tmp_path / "pin.d"  # a directory: open() fails even as root
    directory.mkdir()
    (directory / "pin").write_text(SECRET)
    with pytest.raises(PinError) as info:
        pins.from_source(f"file:{directory}")
    assert str(directory) in str(info.value)
    assert SECRET not in str(info.value)


def test_non_utf8_pin_file_is_a_pin_error(tmp_path):
    f = tmp_path / "pin"
    f.write_bytes(b"12\xff34\n")
    with pytest.raises(PinError) as info:
        pins.from_source(f"file:{f}")
    assert str(f) in str(info.value)


def test_empty_sources_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_PIN_EMPTY", "")
    with pytest.raises(PinError):
        pins.from_source("env:TEST_PIN_EMPTY")
    f = tmp_path / "empty"
    f.write_text("\n")
    with pytest.raises(PinError):
        pins.from_source(f"file:{f}")


@pytest.mark.parametrize("source", ["TEST_PIN_VAR", "env:", "file:", "stdin:x"])
def test_malformed_source_is_a_usage_error(source):
    with pytest.raises(UsageError):
        pins.from_source(source)


def test_a_pin_given_as_a_source_is_not_echoed():
    with pytest.raises(UsageError) as info:
        pins.from_source("pass:98761234")  # an operator pasting the PIN itself
    assert "98761234" not in str(info.value)


# ----------------------------------------------------------------------------- resolve
def test_resolve_without_source_env_or_tty_fails_instead_of_prompting(no_tty):
    with pytest.raises(PinError) as info:
        pins.resolve(None, default_env="TEST_HSM_PIN", prompt="User PIN for token primary: ")
    message = str(info.value)
    assert "--pin-source" in message
    assert "TEST_HSM_PIN" in message
    assert "primary" in message


def test_resolve_with_stdin_closed_fails(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.delenv("TEST_HSM_PIN", raising=False)
    with pytest.raises(PinError):
        pins.resolve(None, default_env="TEST_HSM_PIN", prompt="PIN: ")


def test_resolve_ignores_an_empty_default_env(no_tty, monkeypatch):
    monkeypatch.setenv("TEST_HSM_PIN", "")
    with pytest.raises(PinError):
        pins.resolve(None, default_env="TEST_HSM_PIN", prompt="PIN: ")


def test_resolve_uses_the_default_env(no_tty, monkeypatch):
    monkeypatch.setenv("TEST_HSM_PIN", SECRET)
    assert pins.resolve(None, default_env="TEST_HSM_PIN", prompt="PIN: ").reveal() == SECRET


def test_resolve_prefers_the_source_over_the_default_env(no_tty, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_HSM_PIN", "from-default-env")
    f = tmp_path / "pin"
    f.write_text(SECRET + "\n")
    assert pins.resolve(f"file:{f}", default_env="TEST_HSM_PIN",
                        prompt="PIN: ").reveal() == SECRET


def test_resolve_with_a_broken_source_does_not_fall_back(no_tty, monkeypatch):
    monkeypatch.setenv("TEST_HSM_PIN", "from-default-env")
    monkeypatch.delenv("TEST_PIN_MISSING", raising=False)
    with pytest.raises(PinError, match="env:TEST_PIN_MISSING"):
        pins.resolve("env:TEST_PIN_MISSING", default_env="TEST_HSM_PIN", prompt="PIN: ")


def test_resolve_prompts_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _FakeTty(""))
    monkeypatch.delenv("TEST_HSM_PIN", raising=False)
    prompts = []
    monkeypatch.setattr(pins.getpass, "getpass", lambda prompt: prompts.append(prompt) or SECRET)
    got = pins.resolve(None, default_env="TEST_HSM_PIN", prompt="User PIN for token t: ")
    assert got.reveal() == SECRET
    assert prompts == ["User PIN for token t: "]
