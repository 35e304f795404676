"""Strict parsing of the ceremony plan (``ceremony.plan.load``), the environment file
(``ceremony.environment.load``) and the ``ceremony plan`` / ``run --dry-run`` commands.

No token is needed: a plan only names certificate paths and pins fingerprints, and the officers'
approval keys are plain Ed25519 key files. Every refusal must be a ``PlanError`` whose message
names the key path and, where the offending key is in the file, ``FILE:LINE``.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ceremony import approvals, environment
from ceremony import plan as plans
from ceremony import runner
from ceremony.errors import PlanError
from suite import fingerprint as fp
from tests.ceremony_kit import ceremony_without_pins as ceremony

OFFICERS = (("alice", "crypto-officer"), ("bob", "crypto-officer"),
            ("carol", "crypto-officer"), ("wendy", "witness"))
FP_EU = "ab" * 32
FP_US = "cd" * 32


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def pubs(tmp_path_factory) -> dict[str, str]:
    """Officers' Ed25519 approval keys (public PEM), made with the project's own key maker."""
    root = tmp_path_factory.mktemp("officers")
    return {name: approvals.new_key(root / f"{name}.key") for name, _ in OFFICERS}


def plan_text(pubs: dict[str, str], *, ctype: str = "release-secrets", release: str = '"42"',
              quorum: str = "2", practice: str = "true", officers=OFFICERS,
              regions=(("eu", FP_EU), ("us", FP_US)),
              secrets=(("kdf-seed", "hmac-sha256-seed"), ("tenant-wrapping-key", "aes-256")),
              output_dir: str = "out-t1") -> str:
    """A plan in the documented layout; every keyword lets a test break exactly one thing."""
    out = ["# Release-secrets ceremony plan, reviewed by the officers.\n",
           '[ceremony]\nid = "t1"\n', f'type = "{ctype}"\n']
    if release is not None:
        out.append(f"release = {release}\n")
    out.append(f'practice = {practice}\noutput_dir = "{output_dir}"\n\n')
    out.append('[primary]\nsigning_certificate = "pki/primary-signing.pem"\n'
               'encryption_certificate = "pki/primary-encryption.pem"\n\n')
    out.append(f"[quorum]\nm = {quorum}\n\n")
    for name, role in officers:
        out.append(f'[[officers]]\nname = "{name}"\nrole = "{role}"\n'
                   f'approval_key = """\n{pubs.get(name, pubs["alice"])}"""\n\n')
    if ctype == "release-secrets":
        for name, fpr in regions:
            out.append(f'[[regions]]\nname = "{name}"\ncertificate = "pki/{name}.pem"\n'
                       f'fingerprint = "{fpr}"\n\n')
        for name, stype in secrets:
            out.append(f'[[secrets]]\nname = "{name}"\ntype = "{stype}"\n\n')
    else:
        out.append(f'[enrollment]\nrequest = "pki/regional-ap.csr"\nfingerprint = "{FP_EU}"\n')
    return "".join(out)


def write(tmp_path: Path, text: str | bytes, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the ``occurrence``-th line that starts with ``needle``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(needle):
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} #{occurrence} not in the test's own plan text")


def insert_after(text: str, anchor: str, addition: str, occurrence: int = 1) -> str:
    """Insert ``addition`` (one or more lines) after the ``occurrence``-th line == anchor."""
    lines = text.splitlines(keepends=True)
    seen = 0
    for i, line in enumerate(lines):
        if line.rstrip("\n") == anchor:
            seen += 1
            if seen == occurrence:
                lines.insert(i + 1, addition)
                return "".join(lines)
    raise AssertionError(f"{anchor!r} #{occurrence} not in the test's own plan text")


def load_error(tmp_path: Path, text: str | bytes) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(PlanError) as info:
        plans.load(path)
    return path, str(info.value)


def assert_names(path: Path, message: str, keypath: str, line: int | None) -> None:
    """The message names the key path, and the file:line when the key is in the file."""
    where = f"{path}:{line}" if line is not None else str(path)
    assert f"{where}: {keypath}:" in message, message
    assert "\n" not in message, message


def pem_of(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def with_officer_key(pubs: dict[str, str], name: str, pem: str) -> dict[str, str]:
    return {**pubs, name: pem}


# ------------------------------------------------------------------------------- valid plans
def test_valid_plan_loads_with_every_field(pubs, tmp_path):
    text = plan_text(pubs)
    path = write(tmp_path, text)
    p = plans.load(path)
    assert p.path == path
    assert (p.id, p.type, p.release, p.practice, p.quorum) == (
        "t1", "release-secrets", "42", True, 2)
    assert p.output_dir == tmp_path / "out-t1"  # relative to the plan file, not the cwd
    assert p.primary_signing_certificate == tmp_path / "pki/primary-signing.pem"
    assert p.primary_encryption_certificate == tmp_path / "pki/primary-encryption.pem"
    assert [(o.name, o.role) for o in p.officers] == list(OFFICERS)
    assert [o.name for o in p.crypto_officers] == ["alice", "bob", "carol"]
    assert p.officers[0].approval_key.strip() == pubs["alice"].strip()
    assert [(r.name, r.certificate, r.fingerprint) for r in p.regions] == [
        ("eu", tmp_path / "pki/eu.pem", bytes.fromhex(FP_EU)),
        ("us", tmp_path / "pki/us.pem", bytes.fromhex(FP_US))]
    assert [(s.name, s.type, s.key_type, s.bits) for s in p.secrets] == [
        ("kdf-seed", "hmac-sha256-seed", "generic-secret", 256),
        ("tenant-wrapping-key", "aes-256", "aes", 256)]
    assert p.release_tuple() == (42,)
    assert p.enrollment_request is None


def test_digest_is_sha256_of_the_exact_file_bytes(pubs, tmp_path):
    raw = plan_text(pubs).encode()
    p = plans.load(write(tmp_path, raw))
    assert p.digest == hashlib.sha256(raw).digest()
    assert len(p.digest) == 32


@pytest.mark.parametrize("edit", [
    pytest.param(lambda t: t + "\n", id="trailing-newline"),
    pytest.param(lambda t: t.replace("m = 2", "m =  2"), id="extra-space"),
    pytest.param(lambda t: t.replace("# Release-secrets", "# release-secrets"), id="comment-case"),
    pytest.param(lambda t: t.replace("\n", "\r\n"), id="crlf"),
    pytest.param(lambda t: "# one more comment\n" + t, id="added-comment"),
])
def test_any_byte_change_even_whitespace_or_comment_changes_the_digest(pubs, tmp_path, edit):
    text = plan_text(pubs)
    edited = edit(text)
    assert edited != text
    before = plans.load(write(tmp_path, text, "a.toml"))
    after = plans.load(write(tmp_path, edited, "b.toml"))
    # Same meaning...
    assert (after.id, after.quorum, after.officers, after.regions, after.secrets) == (
        before.id, before.quorum, before.officers, before.regions, before.secrets)
    # ...but a different document: the officers approve bytes, not an interpretation.
    assert after.digest != before.digest
    assert after.digest == hashlib.sha256(edited.encode()).digest()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_one_byte_inside_a_comment_changes_the_digest(pubs, tmp_path, data):
    text = plan_text(pubs)
    raw = text.encode()
    start = raw.index(b"# ") + 2
    end = raw.index(b"\n", start)
    pos = data.draw(st.integers(start, end - 1), label="position")
    new = data.draw(st.sampled_from(b"abcXYZ019 _-#").filter(lambda b: b != raw[pos]),
                    label="byte")
    edited = raw[:pos] + bytes([new]) + raw[pos + 1:]
    p = plans.load(write(tmp_path, edited, "prop.toml"))
    assert p.digest == hashlib.sha256(edited).digest()
    assert p.digest != hashlib.sha256(raw).digest()


def test_fingerprint_may_be_given_as_32_pgp_words(pubs, tmp_path):
    raw = bytes(range(32))
    words = " ".join(fp.to_words(raw))
    p = plans.load(write(tmp_path, plan_text(pubs, regions=(("eu", words),))))
    assert p.regions[0].fingerprint == raw


@pytest.mark.parametrize("release,expected", [
    ('"7"', (7,)), ('"2026.11"', (2026, 11)), ('"1.2.3.4"', (1, 2, 3, 4))])
def test_release_ids_are_dotted_numbers(pubs, tmp_path, release, expected):
    p = plans.load(write(tmp_path, plan_text(pubs, release=release)))
    assert p.release_tuple() == expected


def test_regional_enrollment_plan_loads_without_regions_or_secrets(pubs, tmp_path):
    p = plans.load(write(tmp_path, plan_text(pubs, ctype="regional-enrollment", release=None)))
    assert p.type == "regional-enrollment"
    assert p.enrollment_request == tmp_path / "pki/regional-ap.csr"
    assert p.enrollment_fingerprint == bytes.fromhex(FP_EU)
    assert p.regions == () and p.secrets == ()
    assert runner.steps(p) == ["open", "approvals", "certify-regional", "close"]


def test_regional_enrollment_plan_refuses_release_secrets_tables(pubs, tmp_path):
    text = plan_text(pubs, ctype="regional-enrollment", release=None) + \
        '\n[[secrets]]\nname = "kdf-seed"\ntype = "hmac-sha256-seed"\n'
    _, msg = load_error(tmp_path, text)
    assert "secrets" in msg and "unknown key" in msg


def test_release_secrets_steps_follow_the_plan(pubs, tmp_path):
    p = plans.load(write(tmp_path, plan_text(pubs)))
    assert runner.steps(p) == [
        "open", "approvals", "check-certificates", "check-release", "trust-recipients",
        "kdf-salt", "generate:kdf-seed", "generate:tenant-wrapping-key", "check-values",
        "export:eu", "export:us", "export:escrow", "verify-bundles", "destroy-secrets",
        "record-release", "close"]


# --------------------------------------------------------------------- refusals with key + line
# Each case: (edit of the valid plan text, key path the message must name, needle whose line
# the message must give).
def _case(edit, keypath, needle, occurrence=1, contains=()):
    return edit, keypath, needle, occurrence, contains


CASES = {
    "unknown-top-level-key": _case(
        lambda t: 'colour = "blue"\n' + t, "colour", "colour =", contains=("unknown key",)),
    "unknown-key-in-ceremony": _case(
        lambda t: insert_after(t, 'id = "t1"', 'operator = "x"\n'),
        "ceremony.operator", "operator =", contains=("unknown key",)),
    "unknown-key-in-second-officer": _case(
        lambda t: insert_after(t, 'name = "bob"', 'emai = "bob@example.org"\n'),
        "officers[1].emai", "emai =", contains=("unknown key",)),
    "unknown-key-in-fourth-officer": _case(
        lambda t: insert_after(t, 'name = "wendy"', 'email = "w@example.org"\n'),
        "officers[3].email", "email =", contains=("unknown key",)),
    "unknown-key-in-primary": _case(
        lambda t: insert_after(t, "[primary]", 'slot = "0"\n'),
        "primary.slot", "slot =", contains=("unknown key",)),
    "unknown-key-in-quorum": _case(
        lambda t: insert_after(t, "[quorum]", "n = 3\n"),
        "quorum.n", "n =", contains=("unknown key",)),
    "unknown-key-in-second-region": _case(
        lambda t: insert_after(t, 'name = "us"', 'url = "https://us"\n'),
        "regions[1].url", "url =", contains=("unknown key",)),
    "unknown-key-in-secret": _case(
        lambda t: insert_after(t, 'name = "kdf-seed"', "bits = 512\n"),
        "secrets[0].bits", "bits =", contains=("unknown key",)),
    "release-as-int": _case(
        lambda t: t.replace('release = "42"', "release = 42"),
        "ceremony.release", "release =", contains=("must be str", "int")),
    "practice-as-string": _case(
        lambda t: t.replace("practice = true", 'practice = "true"'),
        "ceremony.practice", "practice =", contains=("must be bool", "str")),
    "practice-as-int": _case(
        lambda t: t.replace("practice = true", "practice = 1"),
        "ceremony.practice", "practice =", contains=("must be bool", "int")),
    "quorum-as-bool": _case(
        lambda t: t.replace("m = 2", "m = true"),
        "quorum.m", "m =", contains=("must be int", "bool")),
    "quorum-as-string": _case(
        lambda t: t.replace("m = 2", 'm = "2"'),
        "quorum.m", "m =", contains=("must be int", "str")),
    "quorum-as-float": _case(
        lambda t: t.replace("m = 2", "m = 2.0"),
        "quorum.m", "m =", contains=("must be int", "float")),
    "officer-name-as-int": _case(
        lambda t: t.replace('name = "carol"', "name = 3"),
        "officers[2].name", "name = 3", contains=("must be str",)),
    "output-dir-as-array": _case(
        lambda t: t.replace('output_dir = "out-t1"', 'output_dir = ["out"]'),
        "ceremony.output_dir", "output_dir =", contains=("must be str", "list")),
    "bad-ceremony-type": _case(
        lambda t: t.replace('type = "release-secrets"', 'type = "release-secret"'),
        "ceremony.type", 'type = "release-secret"',
        contains=("release-secrets", "regional-enrollment")),
    "bad-ceremony-id": _case(
        lambda t: t.replace('id = "t1"', 'id = "../t1"'),
        "ceremony.id", "id =", contains=("letters, digits",)),
    "bad-role": _case(
        lambda t: t.replace('role = "witness"', 'role = "observer"'),
        "officers[3].role", 'role = "observer"', contains=("crypto-officer", "witness")),
    "bad-secret-type": _case(
        lambda t: t.replace('type = "aes-256"', 'type = "aes-128"'),
        "secrets[1].type", 'type = "aes-128"', contains=("hmac-sha256-seed", "aes-256")),
    "bad-region-name": _case(
        lambda t: t.replace('name = "us"', 'name = "u s"'),
        "regions[1].name", 'name = "u s"', contains=("letters, digits",)),
    "quorum-above-crypto-officers": _case(
        # 3 crypto officers + 1 witness: the witness does not count toward the quorum.
        lambda t: t.replace("m = 2", "m = 4"),
        "quorum.m", "m =", contains=("number of crypto officers (3)",)),
    "quorum-zero": _case(
        lambda t: t.replace("m = 2", "m = 0"),
        "quorum.m", "m =", contains=("between 1",)),
    "quorum-negative": _case(
        lambda t: t.replace("m = 2", "m = -1"),
        "quorum.m", "m =", contains=("between 1",)),
    "fingerprint-31-bytes": _case(
        lambda t: t.replace(FP_US, FP_US[:-2]),
        "regions[1].fingerprint", "fingerprint =", occurrence=2,
        contains=("32 bytes", "got 31")),
    "fingerprint-33-bytes": _case(
        lambda t: t.replace(FP_EU, FP_EU + "00"),
        "regions[0].fingerprint", "fingerprint =", contains=("32 bytes", "got 33")),
    "fingerprint-not-hex-nor-words": _case(
        lambda t: t.replace(FP_EU, "not a fingerprint"),
        "regions[0].fingerprint", "fingerprint =", contains=("not a SHA-256 fingerprint",)),
    "fingerprint-empty": _case(
        lambda t: t.replace(FP_EU, ""),
        "regions[0].fingerprint", "fingerprint =", contains=("got 0",)),
    "release-with-letters": _case(
        lambda t: t.replace('release = "42"', 'release = "v42"'),
        "ceremony.release", "release =", contains=("dotted numbers",)),
    "release-trailing-dot": _case(
        lambda t: t.replace('release = "42"', 'release = "42."'),
        "ceremony.release", "release =", contains=("dotted numbers",)),
    "release-five-parts": _case(
        lambda t: t.replace('release = "42"', 'release = "1.2.3.4.5"'),
        "ceremony.release", "release =", contains=("dotted numbers",)),
    "release-empty": _case(
        lambda t: t.replace('release = "42"', 'release = ""'),
        "ceremony.release", "release =", contains=("dotted numbers",)),
    "release-41-digits": _case(
        # Once recorded, a release id this large would block every later release for good.
        lambda t: t.replace('release = "42"', 'release = "' + "9" * 41 + '"'),
        "ceremony.release", "release =", contains=("at most 9 digits",)),
    "release-part-of-10-digits": _case(
        lambda t: t.replace('release = "42"', 'release = "2026.1234567890"'),
        "ceremony.release", "release =", contains=("at most 9 digits",)),
    "release-with-dash": _case(
        lambda t: t.replace('release = "42"', 'release = "42-rc1"'),
        "ceremony.release", "release =", contains=("dotted numbers",)),
    "officers-as-table": _case(
        # A lone [officers] table instead of [[officers]] entries.
        lambda t: t.replace("[[officers]]", "[[crew]]").replace(
            "[quorum]\nm = 2\n", '[quorum]\nm = 2\n\n[officers]\nname = "alice"\n', 1),
        "officers", "[officers]", contains=("[[officers]]",)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_refusal_names_key_path_and_line(pubs, tmp_path, case):
    edit, keypath, needle, occurrence, contains = CASES[case]
    text = edit(plan_text(pubs))
    path, msg = load_error(tmp_path, text)
    if case == "officers-as-table":
        # [officers] is a table, not an array of tables: the path is named; there is no
        # single key line to point at, so only the path and the file are required.
        assert f"{path}" in msg and "officers:" in msg, msg
    else:
        assert_names(path, msg, keypath, line_of(text, needle, occurrence))
    for part in contains:
        assert part in msg, msg


def test_officer_line_number_points_into_the_right_officer_block(pubs, tmp_path):
    """`officers[1].emai` is reported at bob's line, not at the first `emai`-like line."""
    text = plan_text(pubs)
    text = insert_after(text, 'name = "bob"', 'emai = "bob@example.org"\n')
    path, msg = load_error(tmp_path, text)
    line = line_of(text, "emai =")
    assert line_of(text, 'name = "bob"') < line < line_of(text, 'name = "carol"')
    assert msg.startswith(f"{path}:{line}: officers[1].emai: unknown key"), msg


@pytest.mark.parametrize("drop,keypath,missing", [
    ('id = "t1"\n', "ceremony", "'id'"),
    ('type = "release-secrets"\n', "ceremony", "'type'"),
    ('release = "42"\n', "ceremony", "'release'"),
    ("practice = true\n", "ceremony", "'practice'"),
    ('output_dir = "out-t1"\n', "ceremony", "'output_dir'"),
    ('signing_certificate = "pki/primary-signing.pem"\n', "primary", "'signing_certificate'"),
    ("m = 2\n", "quorum", "'m'"),
    ('role = "crypto-officer"\n', "officers[0]", "'role'"),
    ('fingerprint = "' + FP_EU + '"\n', "regions[0]", "'fingerprint'"),
    ('type = "hmac-sha256-seed"\n', "secrets[0]", "'type'"),
])
def test_missing_required_field_is_named(pubs, tmp_path, drop, keypath, missing):
    text = plan_text(pubs)
    assert drop in text
    path, msg = load_error(tmp_path, text.replace(drop, "", 1))
    assert f"{keypath}: missing required key {missing}" in msg, msg
    assert str(path) in msg


def test_missing_officer_key_points_at_its_officers_header(pubs, tmp_path):
    text = plan_text(pubs).replace('role = "crypto-officer"\n', "", 1)
    path, msg = load_error(tmp_path, text)
    assert_names(path, msg, "officers[0]", line_of(text, "[[officers]]"))


def test_missing_key_in_plain_table_points_at_the_table_header(pubs, tmp_path):
    text = plan_text(pubs).replace('id = "t1"\n', "", 1)
    path, msg = load_error(tmp_path, text)
    assert_names(path, msg, "ceremony", line_of(text, "[ceremony]"))


@pytest.mark.parametrize("table,header", [
    ("ceremony", "[ceremony]"), ("primary", "[primary]"), ("quorum", "[quorum]")])
def test_missing_required_table_is_named(pubs, tmp_path, table, header):
    text = plan_text(pubs)
    start = text.index(header)
    end = text.index("\n\n", start) + 2
    path, msg = load_error(tmp_path, text[:start] + text[end:])
    assert f"{table}: missing required table [{table}]" in msg, msg
    assert str(path) in msg


@pytest.mark.parametrize("kwargs,keypath", [
    ({"officers": ()}, "officers"), ({"regions": ()}, "regions"),
    ({"secrets": ()}, "secrets")])
def test_missing_array_of_tables_is_named(pubs, tmp_path, kwargs, keypath):
    path, msg = load_error(tmp_path, plan_text(pubs, **kwargs))
    assert msg.startswith(f"{path}"), msg
    assert f"{keypath}: at least one [[{keypath}]] entry is required" in msg, msg


def test_enrollment_plan_without_enrollment_table_is_refused(pubs, tmp_path):
    text = plan_text(pubs, ctype="regional-enrollment", release=None)
    text = text[:text.index("[enrollment]")]
    _, msg = load_error(tmp_path, text)
    assert "enrollment: missing required table [enrollment]" in msg, msg


def test_release_is_required_for_release_secrets(pubs, tmp_path):
    _, msg = load_error(tmp_path, plan_text(pubs, release=None))
    assert "ceremony: missing required key 'release'" in msg, msg


def test_table_where_a_value_is_expected_is_refused(pubs, tmp_path):
    text = plan_text(pubs)
    start = text.index("[quorum]")
    text = "quorum = 2\n" + text[:start] + text[text.index("\n\n", start) + 2:]
    _, msg = load_error(tmp_path, text)
    assert "quorum: must be a table, got int" in msg, msg


@pytest.mark.parametrize("kwargs,keypath", [
    ({"officers": OFFICERS + (("bob", "witness"),)}, "officers"),
    ({"regions": (("eu", FP_EU), ("eu", FP_US))}, "regions"),
    ({"secrets": (("kdf-seed", "hmac-sha256-seed"), ("kdf-seed", "aes-256"))}, "secrets"),
])
def test_duplicate_names_are_refused(pubs, tmp_path, kwargs, keypath):
    path, msg = load_error(tmp_path, plan_text(pubs, **kwargs))
    assert f"{path}" in msg and f"{keypath}: " in msg and "must be unique" in msg, msg


def test_two_officers_sharing_one_approval_key_is_refused(pubs, tmp_path):
    shared = with_officer_key(pubs, "bob", pubs["alice"])
    _, msg = load_error(tmp_path, plan_text(shared))
    assert "approval_key" in msg, msg


# ------------------------------------------------------------------------- approval keys
def _rsa_pem():
    return pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())


@pytest.mark.parametrize("make_pem,reason", [
    (lambda: "not a key at all\n", "not a PEM public key"),
    (lambda: "-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n",
     "not a PEM public key"),
    (lambda: ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode(), "not a PEM public key"),
    (_rsa_pem, "approval keys are ECDSA P-256/P-384"),
    (lambda: pem_of(ec.generate_private_key(ec.SECP521R1()).public_key()),
     "approval keys are ECDSA P-256/P-384"),
    (lambda: pem_of(ed448.Ed448PrivateKey.generate().public_key()),
     "approval keys are ECDSA P-256/P-384"),
    (lambda: pem_of(x25519.X25519PrivateKey.generate().public_key()),
     "approval keys are ECDSA P-256/P-384"),
], ids=["garbage", "truncated-pem", "private-key", "rsa", "p521", "ed448", "x25519"])
def test_approval_key_must_be_an_ecdsa_or_older_ed25519_public_pem(pubs, tmp_path, make_pem, reason):
    text = plan_text(with_officer_key(pubs, "carol", make_pem()))
    path, msg = load_error(tmp_path, text)
    # carol is the third officer; the line is her `approval_key = """` line.
    assert_names(path, msg, "officers[2].approval_key",
                 line_of(text, 'approval_key = """', 3))
    assert reason in msg, msg


def _unknown_algorithm_spki_pem() -> str:
    oid = bytes([0x06, 0x03, 0x2A, 0x03, 0x04])  # 1.2.3.4
    alg = bytes([0x30, len(oid)]) + oid
    bits = bytes([0x03, 0x21, 0x00]) + b"\x01" * 32
    body = alg + bits
    der = bytes([0x30, len(body)]) + body
    return ("-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode()
            + "\n-----END PUBLIC KEY-----\n")


def test_approval_key_with_unknown_algorithm_is_a_plan_error(pubs, tmp_path):
    text = plan_text(with_officer_key(pubs, "carol", _unknown_algorithm_spki_pem()))
    path, msg = load_error(tmp_path, text)
    assert_names(path, msg, "officers[2].approval_key",
                 line_of(text, 'approval_key = """', 3))


# --------------------------------------------------------------- strictness of string values
@pytest.mark.parametrize("edit,keypath", [
    (lambda t: t.replace('release = "42"', 'release = "42\\n"'), "ceremony.release"),
    (lambda t: t.replace('id = "t1"', 'id = "t1\\n"'), "ceremony.id"),
    (lambda t: t.replace('name = "eu"', 'name = "eu\\n"'), "regions[0].name"),
    (lambda t: t.replace('name = "kdf-seed"', 'name = "kdf-seed\\n"'), "secrets[0].name"),
], ids=["release", "id", "region", "secret"])
def test_trailing_newline_in_checked_identifiers_is_refused(pubs, tmp_path, edit, keypath):
    _, msg = load_error(tmp_path, edit(plan_text(pubs)))
    assert keypath in msg, msg


def test_release_with_non_ascii_digits_is_refused(pubs, tmp_path):
    _, msg = load_error(tmp_path, plan_text(pubs, release='"\uff14\uff12"'))
    assert "ceremony.release" in msg, msg


# ----------------------------------------------------------------------- file-level errors
def test_toml_syntax_error_names_file_and_line(pubs, tmp_path):
    text = plan_text(pubs).replace("m = 2", "m = = 2")
    path, msg = load_error(tmp_path, text)
    assert msg.startswith(f"{path}: TOML syntax error"), msg
    assert f"line {line_of(text, 'm = = 2')}" in msg, msg
    assert "\n" not in msg


def test_duplicate_toml_key_is_a_syntax_error(pubs, tmp_path):
    text = insert_after(plan_text(pubs), 'id = "t1"', 'id = "t2"\n')
    _, msg = load_error(tmp_path, text)
    assert "TOML syntax error" in msg and f"line {line_of(text, 'id = ' + chr(34) + 't2')}" in msg


def test_non_utf8_file_is_refused(pubs, tmp_path):
    raw = plan_text(pubs).encode().replace(b"# Release-secrets", b"# Release\xff-secrets")
    path, msg = load_error(tmp_path, raw)
    assert msg == f"{path}: not UTF-8 text"


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PlanError) as info:
        plans.load(path)
    assert str(path) in str(info.value) and "cannot read plan" in str(info.value)


def test_directory_instead_of_file_is_refused(tmp_path):
    with pytest.raises(PlanError) as info:
        plans.load(tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------- the plan never holds PINs or modules
@pytest.mark.parametrize("where,line,keypath", [
    ("top", 'pin = "123456"', "pin"),
    ("[ceremony]", 'pin = "123456"', "ceremony.pin"),
    ("[ceremony]", 'so_pin = "123456"', "ceremony.so_pin"),
    ("[primary]", 'module = "/usr/lib/softhsm/libsofthsm2.so"', "primary.module"),
    ("[primary]", 'pin = "123456"', "primary.pin"),
    ("[primary]", "slot = 0", "primary.slot"),
    ("top", 'module = "/usr/lib/softhsm/libsofthsm2.so"', "module"),
    ('name = "alice"', 'pin = "123456"', "officers[0].pin"),
])
def test_pins_and_module_paths_are_unknown_keys(pubs, tmp_path, where, line, keypath):
    text = plan_text(pubs)
    text = line + "\n" + text if where == "top" else insert_after(text, where, line + "\n")
    path, msg = load_error(tmp_path, text)
    assert_names(path, msg, keypath, line_of(text, line))
    assert "unknown key" in msg
    assert "123456" not in msg  # the would-be secret is never echoed


def test_unknown_top_level_table_is_reported_with_its_line(pubs, tmp_path):
    text = plan_text(pubs) + '[hsm]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\n'
    path, msg = load_error(tmp_path, text)
    assert_names(path, msg, "hsm", line_of(text, "[hsm]"))


def test_unknown_top_level_table_is_refused(pubs, tmp_path):
    text = plan_text(pubs) + '[hsm]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\npin = "9"\n'
    path, msg = load_error(tmp_path, text)
    assert f"{path}" in msg and "hsm: unknown key" in msg, msg


# ------------------------------------------------------------------------- environment file
def test_environment_file_loads(tmp_path):
    path = write(tmp_path, 'module = "/opt/lib/p11.so"\nprimary_token = "primary-1"\n'
                           'user_pin_source = "env:HSM_PIN"\nso_pin_source = "file:/run/so"\n',
                 "env.toml")
    env = environment.load(path)
    assert (env.module, env.primary_token, env.user_pin_source, env.so_pin_source) == (
        "/opt/lib/p11.so", "primary-1", "env:HSM_PIN", "file:/run/so")
    assert env.module_params is None


def test_no_environment_file_gives_defaults():
    env = environment.load(None)
    assert env.primary_token == "primary" and env.user_pin_source is None


@pytest.mark.parametrize("line,key", [
    ('user_pin = "123456"', "user_pin"), ('slot = "0"', "slot"), ('modul = "x.so"', "modul")])
def test_environment_unknown_key_is_refused(tmp_path, line, key):
    path = write(tmp_path, 'primary_token = "primary"\n' + line + "\n", "env.toml")
    with pytest.raises(PlanError) as info:
        environment.load(path)
    msg = str(info.value)
    assert str(path) in msg and f"unknown key {key!r}" in msg, msg
    assert "123456" not in msg


@pytest.mark.parametrize("key", ["user_pin_source", "so_pin_source"])
@pytest.mark.parametrize("value", ["123456", "pin:123456", "ENV:HSM_PIN", "HSM_PIN"])
def test_environment_literal_pin_source_is_refused(tmp_path, key, value):
    path = write(tmp_path, f'{key} = "{value}"\n', "env.toml")
    with pytest.raises(PlanError) as info:
        environment.load(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and "env:VAR or file:PATH" in msg, msg
    assert "123456" not in msg  # the literal PIN is not repeated on screen


def test_environment_value_must_be_a_string(tmp_path):
    path = write(tmp_path, "primary_token = 1\n", "env.toml")
    with pytest.raises(PlanError, match="primary_token must be a string"):
        environment.load(path)


def test_environment_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(PlanError, match="TOML syntax error"):
        environment.load(write(tmp_path, "module = \n", "env.toml"))
    with pytest.raises(PlanError, match="cannot read environment file"):
        environment.load(tmp_path / "absent.toml")


def test_environment_non_utf8_file_is_a_plan_error(tmp_path):
    path = write(tmp_path, b'module = "/opt/\xff.so"\n', "env.toml")
    with pytest.raises(PlanError):
        environment.load(path)


# --------------------------------------------------------------------------------------- CLI


def with_input_files(p: plans.Plan) -> plans.Plan:
    """Create the files a plan names (`ceremony plan` refuses a plan whose inputs are missing;
    their content is checked by the run, not by `plan`)."""
    for f in p.input_files():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    return p


@pytest.mark.slow
def test_cli_plan_refuses_a_plan_whose_files_do_not_exist(pubs, tmp_path):
    path = write(tmp_path, plan_text(pubs))
    proc = ceremony("plan", path, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "names files that do not exist" in proc.stderr
    assert "primary-signing.pem" in proc.stderr and "eu.pem" in proc.stderr


@pytest.mark.slow
def test_cli_plan_prints_digest_words_steps_and_templates(pubs, tmp_path):
    path = write(tmp_path, plan_text(pubs))
    p = with_input_files(plans.load(path))
    proc = ceremony("plan", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    # Digest in hex (grouped as read aloud) and as 32 PGP words, in order.
    assert fp.to_hex(p.digest) in out
    assert p.digest.hex().upper() in out.replace(" ", "")
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("words"))
    words = lines[i].split()[1:] + lines[i + 1].split()
    assert words == fp.to_words(p.digest) and len(words) == 32
    # Every step, in the order the runner performs them.
    pos = -1
    for step in runner.steps(p):
        found = out.find(f" {step} ", pos + 1)
        assert found > pos, (step, out)
        pos = found
    for word in ("CKA_WRAP_WITH_TRUSTED", "CKA_TRUSTED", "CKM_RSA_PKCS_OAEP",
                 "CKA_ALLOWED_MECHANISMS=[SHA256_HMAC, AES_CMAC]",
                 # the trusted recipients take release secrets only (issue 15)
                 "CKA_WRAP_TEMPLATE={CKA_CLASS=SECRET_KEY CKA_SENSITIVE=true "
                 "CKA_WRAP_WITH_TRUSTED=true CKA_ALLOWED_MECHANISMS=[SHA256_HMAC, AES_CMAC]}",
                 "CKA_MODIFIABLE=false", "CKA_DESTROYABLE=false", "destroy-secrets"):
        assert word in out
    assert "PRACTICE" in out and "release 42" in out
    assert "2 of 3 crypto officers: alice, bob, carol" in out
    assert "witness: wendy" in out


@pytest.mark.slow
def test_cli_run_dry_run_touches_nothing(pubs, tmp_path):
    path = write(tmp_path, plan_text(pubs))
    p = with_input_files(plans.load(path))
    proc = ceremony("run", path, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Dry run" in proc.stdout
    assert fp.to_hex(p.digest) in proc.stdout
    assert all(step in proc.stdout for step in runner.steps(p))
    assert not p.output_dir.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pki", "plan.toml"]
    assert sorted(x.name for x in (tmp_path / "pki").iterdir()) == sorted(
        f.name for f in p.input_files())  # only the inputs the test made


@pytest.mark.slow
@pytest.mark.parametrize("command", [("plan",), ("run", "--dry-run")], ids=["plan", "dry-run"])
@pytest.mark.parametrize("breakage", ["unknown-key", "syntax"])
def test_cli_malformed_plan_exits_2_with_one_line(pubs, tmp_path, command, breakage):
    text = plan_text(pubs)
    if breakage == "unknown-key":
        text = insert_after(text, 'name = "bob"', 'emai = "bob@example.org"\n')
        expect = f"{tmp_path / 'plan.toml'}:{line_of(text, 'emai =')}: officers[1].emai"
    else:
        text = text.replace("m = 2", "m = = 2")
        expect = f"line {line_of(text, 'm = = 2')}"
    path = write(tmp_path, text)
    proc = ceremony(command[0], path, *command[1:], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    err = proc.stderr.rstrip("\n")
    assert "\n" not in err, proc.stderr
    assert str(path) in err and expect in err, err
    assert not (tmp_path / "out-t1").exists()


@pytest.mark.slow
def test_cli_missing_plan_exits_2(tmp_path):
    proc = ceremony("plan", tmp_path / "absent.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "absent.toml" in proc.stderr and "Traceback" not in proc.stderr
