"""Fingerprints read aloud: the PGP word lists, word/byte round trips, parity checks, parsing."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from suite import fingerprint as fp

DIGEST = hashlib.sha256(b"regional-eu public key").digest()


# ----------------------------------------------------------------------------- word lists
@pytest.mark.parametrize("words", [fp.EVEN_WORDS, fp.ODD_WORDS], ids=["even", "odd"])
def test_each_list_has_256_distinct_words(words):
    assert len(words) == 256
    assert len({w.lower() for w in words}) == 256  # distinct even when read case-insensitively
    assert all(w.isalpha() for w in words)


def test_no_word_is_in_both_lists():
    assert not {w.lower() for w in fp.EVEN_WORDS} & {w.lower() for w in fp.ODD_WORDS}


# Vectors published with independent implementations of the list (ruby-pgp-word-list,
# pgp-words): a transcription error in either table would change them.
@pytest.mark.parametrize("hex_data, words", [
    ("D1D4 64C0 04F0 0FB5 C9A4 C8D8 E433 E7FB 7FF5 6256",
     "stairway souvenir flytrap recipe adrift upcoming artist positive spearhead Pandora "
     "spaniel stupendous tonic concurrent transit Wichita lockup visitor flagpole escapade"),
    ("d1c2 25e4 26c6 33dd 94d1 a7e8 c3f4 08aa 9b34 2488",
     "stairway repellent bombast tradition bookshelf responsive chisel tambourine Pluto "
     "scavenger repay typewriter snowcap Virginia aimless pedigree puppy confidence bluebird "
     "maritime"),
    ("9e9e", "quiver onlooker"),
])
def test_published_vectors(hex_data, words):
    data = bytes.fromhex(hex_data.replace(" ", ""))
    assert fp.to_words(data) == words.split()
    assert fp.from_words(words) == data


@pytest.mark.parametrize("data, position, word", [
    (b"\x00", 0, "aardvark"),
    (b"\xff", 0, "Zulu"),
    (b"\x00\x00", 1, "adroitness"),
    (b"\xff\xff", 1, "Yucatan"),
    (b"\x00\x00\x00", 2, "aardvark"),
    (b"\xff\xff\xff\xff", 3, "Yucatan"),
])
def test_known_vectors(data, position, word):
    assert fp.to_words(data)[position] == word


def test_known_sequence():
    assert fp.to_words(bytes([0x00, 0xFF, 0xFF, 0x00])) == ["aardvark", "Yucatan", "Zulu",
                                                            "adroitness"]
    assert fp.from_words("aardvark Yucatan Zulu adroitness") == bytes([0x00, 0xFF, 0xFF, 0x00])


# ----------------------------------------------------------------------------- round trips
@given(st.binary(max_size=64))
def test_round_trip(data):
    words = fp.to_words(data)
    assert len(words) == len(data)
    assert fp.from_words(words) == data
    assert fp.from_words(" ".join(words)) == data
    assert fp.from_words("-".join(words)) == data
    assert fp.from_words(" ".join(w.upper() for w in words)) == data  # read aloud, typed in caps


@given(st.binary(min_size=2, max_size=40), st.data())
def test_swapped_adjacent_words_are_rejected(data, draw):
    i = draw.draw(st.integers(0, len(data) - 2))
    words = fp.to_words(data)
    words[i], words[i + 1] = words[i + 1], words[i]
    with pytest.raises(ValueError, match="position"):
        fp.from_words(words)


@given(st.binary(min_size=2, max_size=40), st.data())
def test_a_dropped_word_is_rejected(data, draw):
    i = draw.draw(st.integers(0, len(data) - 2))  # a word with another after it
    words = fp.to_words(data)
    del words[i]
    with pytest.raises(ValueError):
        fp.from_words(words)


def test_swapping_equal_bytes_is_still_caught():
    words = fp.to_words(b"\x42\x42")
    assert words[0] != words[1]
    with pytest.raises(ValueError):
        fp.from_words([words[1], words[0]])


@pytest.mark.parametrize("text", ["aardvark aardvark", "adroitness", "aardvark unknownword",
                                  "aardvark adroitness-x"])
def test_wrong_or_unknown_words_are_rejected(text):
    with pytest.raises(ValueError):
        fp.from_words(text)


def test_to_hex_groups_upper_case():
    assert fp.to_hex(bytes.fromhex("a1b2c3d4e5")) == "A1B2 C3D4 E5"
    assert fp.to_hex(bytes.fromhex("a1b2c3d4"), group=1) == "A1 B2 C3 D4"


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("render", [
    lambda d: d.hex(),
    lambda d: d.hex().upper(),
    lambda d: fp.to_hex(d),
    lambda d: ":".join(f"{b:02x}" for b in d),
    lambda d: ":".join(f"{b:02X}" for b in d),
    lambda d: "  " + fp.to_hex(d, group=4) + "  ",
    lambda d: " ".join(fp.to_words(d)),
    lambda d: "-".join(fp.to_words(d)),
    lambda d: " ".join(fp.to_words(d)[:16]) + "\n  " + " ".join(fp.to_words(d)[16:]),
    lambda d: " ".join(w.lower() for w in fp.to_words(d)),
], ids=["hex", "HEX", "grouped", "colons", "COLONS", "padded", "words", "hyphens",
        "two-lines", "lowercase-words"])
def test_parse_fingerprint_accepts(render):
    assert fp.parse_fingerprint(render(DIGEST)) == DIGEST


@given(st.binary(min_size=32, max_size=32))
def test_parse_fingerprint_round_trips_any_digest(digest):
    assert fp.parse_fingerprint(fp.to_hex(digest)) == digest
    assert fp.parse_fingerprint(" ".join(fp.to_words(digest))) == digest


@pytest.mark.parametrize("text", [
    "",
    DIGEST.hex()[:-2],                          # 31 bytes
    DIGEST.hex() + "00",                        # 33 bytes
    DIGEST.hex()[:-1],                          # odd number of digits
    hashlib.sha1(b"x").hexdigest(),             # a SHA-1 fingerprint
    hashlib.sha512(b"x").hexdigest(),
    " ".join(fp.to_words(DIGEST)[:31]),         # 31 words
    " ".join(fp.to_words(DIGEST + b"\x00")),    # 33 words
    " ".join(fp.to_words(DIGEST)[1:] + ["aardvark"]),  # shifted by one: parity is wrong
])
def test_parse_fingerprint_rejects(text):
    with pytest.raises(ValueError):
        fp.parse_fingerprint(text)


@given(st.binary(max_size=48))
def test_parse_fingerprint_rejects_every_other_length(data):
    assume(len(data) != 32)
    with pytest.raises(ValueError):
        fp.parse_fingerprint(data.hex())
    with pytest.raises(ValueError):
        fp.parse_fingerprint(" ".join(fp.to_words(data)))


def test_spki_sha256_is_sha256():
    assert fp.spki_sha256(b"spki") == hashlib.sha256(b"spki").digest()
