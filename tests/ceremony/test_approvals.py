"""M-of-N approvals (``ceremony.approvals``) and the ``ceremony approve`` / ``keygen`` commands.

The plan has three crypto officers (alice, bob, carol), one witness (wendy) and quorum 2. An
approval is an Ed25519 signature over (context || plan digest || nonce); anything else -- another
run, another plan, a stranger, the witness, a bad signature, someone else's key -- is rejected
with its reason and does not count. No token is involved.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ceremony import approvals
from ceremony import plan as plans
from ceremony.approvals import Approval
from ceremony.errors import ApprovalError
from ceremony.officers import FileSigner
from suite.errors import UsageError
from tests.ceremony_kit import ceremony_without_pins as ceremony

OFFICERS = (("alice", "crypto-officer"), ("bob", "crypto-officer"),
            ("carol", "crypto-officer"), ("wendy", "witness"))


# ------------------------------------------------------------------------------------ helpers
def plan_text(pubs: dict[str, str], *, ceremony_id: str = "appr-1", quorum: int = 2,
              officers=OFFICERS) -> str:
    out = [(f'[ceremony]\nid = "{ceremony_id}"\ntype = "release-secrets"\nrelease = "7"\n'
            'practice = true\noutput_dir = "out"\n\n'
            '[primary]\nsigning_certificate = "pki/s.pem"\n'
            'encryption_certificate = "pki/e.pem"\n\n'
            f"[quorum]\nm = {quorum}\n\n")]
    for name, role in officers:
        out.append(f'[[officers]]\nname = "{name}"\nrole = "{role}"\n'
                   f'approval_key = """\n{pubs[name]}"""\n\n')
    out.append('[[regions]]\nname = "eu"\ncertificate = "pki/eu.pem"\n'
               f'fingerprint = "{"ab" * 32}"\n\n'
               '[[secrets]]\nname = "kdf-seed"\ntype = "hmac-sha256-seed"\n')
    return "".join(out)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Approval key files for the officers and for mallory, who is in no plan."""
    root = tmp_path_factory.mktemp("officer-keys")
    out = {}
    for name in ("alice", "bob", "carol", "wendy", "mallory"):
        out[name] = root / f"{name}.key"
        out[name + ".pub"] = approvals.new_key(out[name])
    return out


@pytest.fixture(scope="module")
def pubs(keys) -> dict[str, str]:
    return {name: keys[name + ".pub"] for name in ("alice", "bob", "carol", "wendy", "mallory")}


@pytest.fixture(scope="module")
def plan_path(pubs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.toml"
    path.write_text(plan_text(pubs))
    return path


@pytest.fixture(scope="module")
def plan(plan_path) -> plans.Plan:
    p = plans.load(plan_path)
    assert [o.name for o in p.crypto_officers] == ["alice", "bob", "carol"] and p.quorum == 2
    return p


@pytest.fixture
def nonce() -> bytes:
    return os.urandom(32)


def private(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def raw_sign(keys, who: str, digest: bytes, nonce: bytes) -> bytes:
    return FileSigner(keys[who]).sign(approvals.message(digest, nonce))


# ---------------------------------------------------------------------------------- quorum
def test_two_valid_approvals_meet_the_quorum(plan, keys, nonce):
    given = [approvals.sign(plan, nonce, n, keys[n]) for n in ("alice", "bob")]
    assert approvals.check(plan, nonce, given) == ["alice", "bob"]


def test_all_three_crypto_officers_are_returned(plan, keys, nonce):
    given = [approvals.sign(plan, nonce, n, keys[n]) for n in ("carol", "alice", "bob")]
    assert approvals.check(plan, nonce, given) == ["carol", "alice", "bob"]


def test_one_valid_approval_is_not_a_quorum(plan, keys, nonce):
    with pytest.raises(ApprovalError) as info:
        approvals.check(plan, nonce, [approvals.sign(plan, nonce, "alice", keys["alice"])])
    msg = str(info.value)
    assert "1 valid approval(s) of the 2 required (alice)" in msg, msg


def test_no_approvals_is_not_a_quorum(plan, nonce):
    with pytest.raises(ApprovalError, match=r"0 valid approval\(s\) of the 2 required \(none\)"):
        approvals.check(plan, nonce, [])


def test_duplicate_approvals_from_one_officer_count_once(plan, keys, nonce):
    alice = approvals.sign(plan, nonce, "alice", keys["alice"])
    again = approvals.sign(plan, nonce, "alice", keys["alice"])  # another signature, same officer
    with pytest.raises(ApprovalError, match=r"1 valid approval\(s\) of the 2 required"):
        approvals.check(plan, nonce, [alice, again, alice])
    bob = approvals.sign(plan, nonce, "bob", keys["bob"])
    assert approvals.check(plan, nonce, [alice, alice, bob, again]) == ["alice", "bob"]


def test_approval_signature_binds_plan_digest_and_nonce(plan, keys, nonce):
    ap = approvals.sign(plan, nonce, "bob", keys["bob"])
    assert (ap.officer, ap.plan_digest, ap.nonce) == ("bob", plan.digest, nonce)
    approvals._verify(plan.officers[1].approval_key, ap.signature,
                      approvals.CONTEXT + plan.digest + nonce)  # raises if not


def test_approval_json_round_trip(plan, keys, nonce, tmp_path):
    ap = approvals.sign(plan, nonce, "carol", keys["carol"])
    path = tmp_path / "carol.json"
    path.write_text(ap.to_json())
    assert Approval.load(path) == ap
    assert json.loads(path.read_text())["plan_digest"] == plan.digest.hex()


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"officer": "alice"}',
    '{"officer": "alice", "plan_digest": "zz", "nonce": "00", "signature": "00"}',
    '{"officer": "alice", "plan_digest": 5, "nonce": "00", "signature": "00"}'])
def test_malformed_approval_file_is_an_approval_error(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ApprovalError, match="cannot read approval"):
        Approval.load(path)


def test_approval_with_non_string_officer_is_rejected_cleanly(plan, tmp_path, nonce):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"officer": ["alice"], "plan_digest": plan.digest.hex(),
                                "nonce": nonce.hex(), "signature": "00" * 64}))
    with pytest.raises(ApprovalError):
        approvals.check(plan, nonce, [Approval.load(path)])


# ------------------------------------------------------------------------------- rejections
def _other_nonce(plan, keys, nonce, pubs, tmp_path):
    return approvals.sign(plan, os.urandom(32), "bob", keys["bob"]), "approved another ceremony run"


def _other_plan(plan, keys, nonce, pubs, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(plan_text(pubs, ceremony_id="appr-2"))
    other_plan = plans.load(other)
    assert other_plan.digest != plan.digest
    return approvals.sign(other_plan, nonce, "bob", keys["bob"]), "'bob' approved another plan"


def _stranger(plan, keys, nonce, pubs, tmp_path):
    sig = raw_sign(keys, "mallory", plan.digest, nonce)
    return Approval("mallory", plan.digest, nonce, sig), "'mallory' is not an officer in the plan"


def _witness(plan, keys, nonce, pubs, tmp_path):
    # sign() lets the witness sign (they are in the plan); check() must not count it.
    return (approvals.sign(plan, nonce, "wendy", keys["wendy"]),
            "'wendy' is a witness, not a crypto officer")


def _corrupted(plan, keys, nonce, pubs, tmp_path):
    ap = approvals.sign(plan, nonce, "bob", keys["bob"])
    sig = bytearray(ap.signature)
    sig[10] ^= 0x01
    return Approval("bob", plan.digest, nonce, bytes(sig)), "'bob': the signature does not verify"


def _truncated(plan, keys, nonce, pubs, tmp_path):
    ap = approvals.sign(plan, nonce, "bob", keys["bob"])
    return Approval("bob", plan.digest, nonce, ap.signature[:32]), \
        "'bob': the signature does not verify"


def _wrong_key(plan, keys, nonce, pubs, tmp_path):
    # Carol signs, but the approval claims to be bob's.
    return Approval("bob", plan.digest, nonce, raw_sign(keys, "carol", plan.digest, nonce)), \
        "'bob': the signature does not verify"


def _edited_nonce(plan, keys, nonce, pubs, tmp_path):
    # An old approval whose JSON nonce field was edited to this run's: signature is over the old.
    sig = raw_sign(keys, "bob", plan.digest, os.urandom(32))
    return Approval("bob", plan.digest, nonce, sig), "'bob': the signature does not verify"


def _edited_digest(plan, keys, nonce, pubs, tmp_path):
    ap, _ = _other_plan(plan, keys, nonce, pubs, tmp_path)
    return Approval("bob", plan.digest, nonce, ap.signature), \
        "'bob': the signature does not verify"


def _no_context(plan, keys, nonce, pubs, tmp_path):
    # A signature over digest || nonce without the domain-separation context is not an approval.
    sig = FileSigner(keys["bob"]).sign(plan.digest + nonce)
    return Approval("bob", plan.digest, nonce, sig), "'bob': the signature does not verify"


REJECTIONS = {"other-nonce": _other_nonce, "other-plan-digest": _other_plan,
              "not-in-plan": _stranger, "witness": _witness, "corrupted-signature": _corrupted,
              "truncated-signature": _truncated, "not-that-officers-key": _wrong_key,
              "edited-nonce-field": _edited_nonce, "edited-digest-field": _edited_digest,
              "no-domain-separation": _no_context}


@pytest.mark.parametrize("case", list(REJECTIONS), ids=list(REJECTIONS))
def test_invalid_approval_is_rejected_with_its_reason_and_does_not_count(
        plan, keys, pubs, nonce, tmp_path, case):
    bad, reason = REJECTIONS[case](plan, keys, nonce, pubs, tmp_path)
    alice = approvals.sign(plan, nonce, "alice", keys["alice"])
    # With one valid approval, the bad one would make the quorum if it counted.
    with pytest.raises(ApprovalError) as info:
        approvals.check(plan, nonce, [alice, bad])
    msg = str(info.value)
    assert "1 valid approval(s) of the 2 required (alice)" in msg, msg
    assert reason in msg, msg
    # Alone it is worth nothing either.
    with pytest.raises(ApprovalError, match=r"0 valid approval\(s\)"):
        approvals.check(plan, nonce, [bad])
    # And beside a real quorum it is not listed among the approvers.
    carol = approvals.sign(plan, nonce, "carol", keys["carol"])
    assert approvals.check(plan, nonce, [bad, alice, carol]) == ["alice", "carol"]


def test_every_reason_is_named_when_quorum_fails(plan, keys, pubs, nonce, tmp_path):
    bad = [REJECTIONS[c](plan, keys, nonce, pubs, tmp_path)
           for c in ("other-nonce", "witness", "not-in-plan")]
    with pytest.raises(ApprovalError) as info:
        approvals.check(plan, nonce, [b for b, _ in bad])
    for _, reason in bad:
        assert reason in str(info.value)


def test_one_key_holder_cannot_meet_quorum_alone(plan, pubs, keys, tmp_path, nonce):
    # First line: the plan parser refuses two officers sharing one key...
    path = tmp_path / "shared.toml"
    path.write_text(plan_text({**pubs, "bob": pubs["alice"]}))
    with pytest.raises(plans.PlanError, match="same approval key"):
        plans.load(path)
    # ...and behind it, approvals.check counts one key once even in a plan that got past it.
    import dataclasses
    officers = tuple(dataclasses.replace(o, approval_key=pubs["alice"]) if o.name == "bob"
                     else o for o in plan.officers)
    shared = dataclasses.replace(plan, officers=officers)
    sig = raw_sign(keys, "alice", shared.digest, nonce)
    given = [Approval("alice", shared.digest, nonce, sig),
             Approval("bob", shared.digest, nonce, sig)]
    with pytest.raises(ApprovalError, match="same approval key as 'alice'; it counts once"):
        approvals.check(shared, nonce, given)
    assert approvals.check(dataclasses.replace(shared, quorum=1), nonce, given) == ["alice"]


# ---------------------------------------------------------------------------------- sign()
def test_sign_refuses_a_key_that_is_not_the_officers(plan, keys, nonce):
    with pytest.raises(ApprovalError) as info:
        approvals.sign(plan, nonce, "alice", keys["bob"])
    msg = str(info.value)
    assert str(keys["bob"]) in msg and "not the approval key the plan lists for 'alice'" in msg


def test_sign_refuses_an_officer_not_in_the_plan(plan, keys, nonce):
    with pytest.raises(ApprovalError, match="'mallory' is not an officer in the plan"):
        approvals.sign(plan, nonce, "mallory", keys["mallory"])


def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize("make", [
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    lambda: ec.generate_private_key(ec.SECP521R1()),
    ed448.Ed448PrivateKey.generate,
], ids=["rsa", "p521", "ed448"])
def test_sign_refuses_a_key_of_another_kind(plan, nonce, tmp_path, make):
    path = tmp_path / "officer.key"
    path.write_bytes(_pkcs8(make()))
    with pytest.raises(ApprovalError, match="is not an ECDSA P-256/P-384"):
        approvals.sign(plan, nonce, "alice", path)


@pytest.mark.parametrize("content", [None, b"", b"hello", b"-----BEGIN PUBLIC KEY-----\n"],
                         ids=["missing", "empty", "garbage", "bad-pem"])
def test_sign_refuses_an_unreadable_key_file(plan, nonce, tmp_path, content):
    path = tmp_path / "officer.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ApprovalError, match="cannot load officer key"):
        approvals.sign(plan, nonce, "alice", path)


def test_sign_refuses_encrypted_key_without_password(plan, keys, nonce, tmp_path):
    enc = tmp_path / "enc.key"
    enc.write_bytes(private(keys["alice"]).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-pass")))
    with pytest.raises(ApprovalError, match="cannot load officer key"):
        approvals.sign(plan, nonce, "alice", enc)
    ap = approvals.sign(plan, nonce, "alice", enc, password=b"secret-pass")
    assert approvals.check(plan, nonce, [ap, approvals.sign(plan, nonce, "bob", keys["bob"])]) \
        == ["alice", "bob"]


def test_new_key_refuses_to_overwrite_and_is_private(tmp_path):
    path = tmp_path / "k.key"
    pub = approvals.new_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        approvals.new_key(path)
    assert path.read_bytes() == before
    assert pub.startswith("-----BEGIN PUBLIC KEY-----")


# --------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_approve_writes_the_approval_and_never_overwrites(plan, plan_path, keys, nonce,
                                                              tmp_path):
    out = tmp_path / "alice.json"
    args = ("approve", "--plan", plan_path, "--officer", "alice", "--key", keys["alice"],
            "--nonce", nonce.hex(), "--out", out)
    proc = ceremony(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alice approved" in proc.stdout and str(out) in proc.stdout
    ap = Approval.load(out)
    assert (ap.officer, ap.plan_digest, ap.nonce) == ("alice", plan.digest, nonce)
    bob = approvals.sign(plan, nonce, "bob", keys["bob"])
    assert approvals.check(plan, nonce, [ap, bob]) == ["alice", "bob"]
    # A second approval to the same file is refused; the first stays byte for byte.
    before = out.read_bytes()
    again = ceremony(*args[:-4], "--nonce", os.urandom(32).hex(), "--out", out, cwd=tmp_path)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.json"]  # no temp left over
    assert not plan.output_dir.exists()  # --nonce/--out given: the output dir is untouched


@pytest.mark.slow
def test_cli_approve_with_someone_elses_key_is_refused(plan_path, keys, nonce, tmp_path):
    out = tmp_path / "alice.json"
    proc = ceremony("approve", "--plan", plan_path, "--officer", "alice", "--key", keys["bob"],
                    "--nonce", nonce.hex(), "--out", out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "not the approval key the plan lists for 'alice'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_approve_with_malformed_nonce_is_a_usage_error(plan_path, keys, tmp_path):
    proc = ceremony("approve", "--plan", plan_path, "--officer", "alice", "--key",
                    keys["alice"], "--nonce", "not-hex", "--out", tmp_path / "a.json",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "nonce" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_cli_keygen_writes_a_private_key_and_prints_a_plan_ready_public_key(pubs, keys,
                                                                            tmp_path, nonce):
    key = tmp_path / "dave.key"
    proc = ceremony("keygen", "--out", key, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    pem, _, comment = proc.stdout.partition("-----END PUBLIC KEY-----\n")
    pem += "-----END PUBLIC KEY-----\n"
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert "PRIVATE" not in proc.stdout
    # ...and, as comments, the fingerprint a region pins, in hex and PGP words.
    assert comment.startswith("# SHA-256(SPKI)") and "# words" in comment
    # The printed key is accepted by the plan parser and matches the key file.
    officers = (("alice", "crypto-officer"), ("dave", "crypto-officer"))
    path = tmp_path / "plan.toml"
    path.write_text(plan_text({**pubs, "dave": pem}, officers=officers))
    p = plans.load(path)
    assert p.officers[1].approval_key == pem
    ap = approvals.sign(p, nonce, "dave", key)
    alice = approvals.sign(p, nonce, "alice", keys["alice"])
    assert approvals.check(p, nonce, [ap, alice]) == ["dave", "alice"]
    with pytest.raises(ApprovalError, match=r"1 valid approval\(s\) of the 2 required \(dave\)"):
        approvals.check(p, nonce, [ap])
    # keygen never overwrites a key file.
    before = key.read_bytes()
    again = ceremony("keygen", "--out", key, cwd=tmp_path)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert key.read_bytes() == before


@pytest.mark.slow
def test_cli_approve_checks_the_nonce_and_officer_before_writing(pubs, keys, tmp_path):
    """`approve --nonce 00` once wrote approvals/alice.json, and Alice's real approval was then
    refused as "already exists". Nonce, plan and officer are checked before anything is written."""
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(plan_text(pubs, ceremony_id="appr-check"))
    opened = ceremony("open", plan_file, cwd=tmp_path)
    assert opened.returncode == 0, opened.stderr
    approvals_dir = tmp_path / "out" / "approvals"
    for nonce, words in (("00", "32 (64 hex digits)"), (os.urandom(32).hex(), "not the nonce")):
        bad = ceremony("approve", "--plan", plan_file, "--officer", "alice", "--key",
                       keys["alice"], "--nonce", nonce, cwd=tmp_path)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr
        assert "nothing was written" in bad.stderr and "Traceback" not in bad.stderr
        assert not approvals_dir.exists() or not any(approvals_dir.iterdir())
    witness = ceremony("approve", "--plan", plan_file, "--officer", "wendy", "--key",
                       keys["wendy"], cwd=tmp_path)
    assert witness.returncode == 2 and "only crypto officers approve" in witness.stderr
    assert not (approvals_dir / "wendy.json").exists()
    good = ceremony("approve", "--plan", plan_file, "--officer", "alice", "--key",
                    keys["alice"], cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert Approval.load(approvals_dir / "alice.json").officer == "alice"


@pytest.mark.slow
def test_cli_keygen_into_a_directory_that_cannot_be_written_is_one_line(tmp_path):
    from tests.helpers import small_filesystem
    with small_filesystem(tmp_path / "ro", read_only=True) as ro:
        proc = ceremony("keygen", "--out", ro / "officer.key", cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("ceremony: error: cannot write") and "Read-only file system" in err
    assert proc.stdout == ""  # no public key printed for a key that was not kept
