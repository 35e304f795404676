"""Offline verification of a closed ceremony (`ceremony verify`, ceremony.verify.verify_directory).

One kit and two closed ceremonies per module (real SoftHSM2 tokens, `python -m ceremony`
subprocesses); every test tampers with its own copy of the output directory.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ceremony import plan as plans
from ceremony import runner
from ceremony.errors import VerificationError
from ceremony.transcript import FILE as TRANSCRIPT
from ceremony.transcript import SIGNATURE_FILE, canonical, record_hash
from ceremony.verify import verify_directory
from release import bundle as bundles
from release.certificates import as_asn1
from release.certificates import load as load_cert
from tests.ceremony_kit import kit_fixture

_release = itertools.count(7000)
_PINS: list = []  # the module's officer pins, set by the ceremonies fixture


kit = kit_fixture("ceremony-verify")


def _closed(kit) -> plans.Plan:
    plan_path = kit.write_plan(release=str(next(_release)))
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    plan = plans.load(plan_path)
    kit.countersign(plan.output_dir)
    return plan


@pytest.fixture(scope="module")
def ceremonies(kit) -> tuple[plans.Plan, plans.Plan]:
    """Two closed ceremonies of the same primary (the second supplies swapped-in bundles)."""
    _PINS[:] = [kit.pins()]
    return _closed(kit), _closed(kit)


@pytest.fixture(scope="module")
def cert(kit) -> Path:
    return kit.pki / f"{kit.primary.label}-signing.pem"


@pytest.fixture(scope="module")
def pins_file(kit) -> Path:
    return kit.pins_file()


@pytest.fixture(scope="module")
def pins(kit, pins_file):
    from release import quorum
    return quorum.load(pins_file)


@pytest.fixture
def copy(ceremonies, tmp_path) -> Path:
    """A private copy of the first ceremony's output directory."""
    dst = tmp_path / "out"
    shutil.copytree(ceremonies[0].output_dir, dst)
    return dst


def lines(directory: Path) -> list[bytes]:
    return (directory / TRANSCRIPT).read_bytes().splitlines()


def write_records(directory: Path, records: list[dict]) -> None:
    (directory / TRANSCRIPT).write_bytes(b"".join(canonical(r) + b"\n" for r in records))


def rechain(records: list[dict]) -> list[dict]:
    """What a forger who cannot sign would do: renumber and re-hash so the chain is intact."""
    prev = "0" * 64
    out = []
    for i, rec in enumerate(records):
        rec = {**rec, "seq": i, "prev": prev}
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
        out.append(rec)
    return out


def records_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in lines(directory)]


def assert_rejected(directory: Path, cert: Path, *needles: str) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_directory(directory, cert, _PINS[0])
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


def first_bundle(plan: plans.Plan) -> str:
    return runner.bundle_name(plan, plan.regions[0].name)


# ------------------------------------------------------------------------------------ OK
def test_closed_ceremony_verifies_in_process_and_with_the_cli(kit, ceremonies, cert):
    p = ceremonies[0]
    result = verify_directory(p.output_dir, cert, _PINS[0])
    names = sorted(runner.bundle_name(p, r) for r in [*kit.regionals, "escrow"])
    assert sorted(result["bundles"]) == names
    assert result["ceremony_id"] == p.id
    assert result["records"] == len(runner.steps(p)) == len(lines(p.output_dir))
    assert result["practice"] is False and result["resumed"] == 0
    proc = kit.cli("verify", p.output_dir, "--cert", cert, "--officers", kit.pins_file())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK: ceremony {p.id}, {result['records']} records, "
                                  "4 bundles verified"), proc.stdout


def test_cli_rejects_a_tampered_directory_in_one_line(kit, ceremonies, copy, cert):
    path = copy / first_bundle(ceremonies[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    proc = kit.cli("verify", copy, "--cert", cert, "--officers", kit.pins_file())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("ceremony: error: ") and len(err.splitlines()) == 1, err
    assert path.name in err and "Traceback" not in proc.stderr


def test_another_primarys_certificate_does_not_verify(copy, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    name = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "another primary")])
    now = dt.datetime.now(dt.UTC)
    other = (cx509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(key.public_key()).serial_number(cx509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
             .sign(key, hashes.SHA384()))
    path = tmp_path / "other.pem"
    path.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    # Named for what it is: the wrong certificate, not a broken signature.
    assert_rejected(copy, path, "signed by another key than the certificate", "give --cert")


# ------------------------------------------------------------------------------------ bit flips
@pytest.fixture
def fast_copy(ceremonies, tmp_path):
    """Like ``copy``, on tmpfs when there is one: thousands of rewrite+verify rounds are
    dominated by file opens on a disk-backed /tmp."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path
    dst = base / "out"
    shutil.copytree(ceremonies[0].output_dir, dst)
    yield dst
    if base != tmp_path:
        shutil.rmtree(base, ignore_errors=True)


BITS = tuple(1 << b for b in range(8))


def _remembering_bundle_verify(monkeypatch) -> None:
    """verify_directory re-verifies every bundle and the head signature on each call; 8 x every
    byte of a file would redo the *unchanged* parts' ECDSA checks thousands of times. Remember
    the result for inputs that verified before (pure functions of their inputs); whatever the
    flip changed is always verified for real, and failures are never remembered."""
    import ceremony.verify as verify_mod
    real, seen = bundles.verify, {}

    def verify(der, cert, where=""):
        key = (bytes(der), cert.dump())
        if key not in seen:
            seen[key] = real(der, cert, where=where)
        return seen[key]
    monkeypatch.setattr(verify_mod.bundles, "verify", verify)
    # Likewise the head signature check, for an unchanged (head, signature) pair.
    real_head, heads = verify_mod._verify_head, set()

    def verify_head(cert, algorithm, signature, head, where):
        key = (cert.fingerprint(hashes.SHA256()), algorithm, signature, head)
        if key not in heads:
            real_head(cert, algorithm, signature, head, where)
            heads.add(key)
    monkeypatch.setattr(verify_mod, "_verify_head", verify_head)
    _remembering_signatures(monkeypatch)
    # And the transcript, parsed and chain-checked once per distinct content.
    real_load, loaded = verify_mod.load, {}

    def load(path):
        data = Path(path).read_bytes()
        if data not in loaded:
            loaded[data] = real_load(path)
        return [dict(r) for r in loaded[data]]
    monkeypatch.setattr(verify_mod, "load", load)


def _remembering_signatures(monkeypatch) -> None:
    """The signature checks inside a bundle, remembered for unchanged inputs: a flip in one
    SignerInfo leaves the primary's and the other officer's exactly as they were. Both are pure
    functions of their inputs; a changed input is always checked for real."""
    real_sig, sigs = bundles.check_signature, set()

    def check_signature(spki, algo, signature, data, where):
        key = (spki.dump(), algo.dump(), signature, data)
        if key not in sigs:
            real_sig(spki, algo, signature, data, where)
            sigs.add(key)
    monkeypatch.setattr(bundles, "check_signature", check_signature)
    real_officer, officers = bundles._officer, {}

    def officer(si, cert, content):
        key = (si.dump(), cert.dump(), content)
        if key not in officers:
            officers[key] = real_officer(si, cert, content)
        return officers[key]
    monkeypatch.setattr(bundles, "_officer", officer)


def _flip_every_byte(directory: Path, name: str, cert: Path) -> list[tuple[int, int]]:
    """Flip each of the 8 bits of every byte of ``name`` in turn (restoring it after each);
    return the (offset, bit) pairs verify_directory accepted."""
    path = directory / name
    original = path.read_bytes()
    accepted = []
    try:
        for offset in range(len(original)):
            for bit in BITS:
                data = bytearray(original)
                data[offset] ^= bit
                path.write_bytes(bytes(data))
                try:
                    verify_directory(directory, cert, _PINS[0])
                except VerificationError:
                    continue
                accepted.append((offset, bit))
    finally:
        path.write_bytes(original)
    verify_directory(directory, cert, _PINS[0])  # restored: verifies again
    return accepted


def _context(data: bytes, flips: list[tuple[int, int]]) -> str:
    return "; ".join(f"@{o}^{b:#04x}: {data[max(0, o - 30):o + 10]!r}" for o, b in flips[:5])


@pytest.mark.parametrize("which", [
    "bundle",
    "transcript",
    "signature",
])
def test_every_single_bit_flip_is_rejected(ceremonies, fast_copy, cert, which, monkeypatch):
    _remembering_bundle_verify(monkeypatch)
    name = {"bundle": first_bundle(ceremonies[0]), "transcript": TRANSCRIPT,
            "signature": SIGNATURE_FILE}[which]
    accepted = _flip_every_byte(fast_copy, name, cert)
    data = (fast_copy / name).read_bytes()
    assert len(data) > 300
    assert not accepted, (f"{len(accepted)} of {8 * len(data)} bit flips of {name} still "
                          f"verify: {_context(data, accepted)}")


@functools.cache
def _standalone_flips(bundle_path: Path, cert_path: Path) -> tuple[bytes, frozenset[int]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _remembering_signatures(monkeypatch)
        return _standalone_flips_of(bundle_path, cert_path)


def _standalone_flips_of(bundle_path: Path, cert_path: Path) -> tuple[bytes, frozenset[int]]:
    """What a receiver checks with only the bundle, the pinned certificate and its pinned
    officers (release.bundle.verify, release.quorum.check): the offsets whose flip it
    accepts."""
    from release import quorum
    der = bundle_path.read_bytes()
    pinned = as_asn1(load_cert(cert_path, "primary signing"))
    quorum.check(bundles.verify(der, pinned), _PINS[0], "bundle")
    accepted = set()
    for offset in range(len(der)):
        for bit in BITS:
            data = bytearray(der)
            data[offset] ^= bit
            try:
                quorum.check(bundles.verify(bytes(data), pinned), _PINS[0], "bundle")
            except VerificationError:
                continue
            accepted.add(offset)
    return der, frozenset(accepted)


def _signed_spans(der: bytes) -> dict[str, range]:
    si = next(s for s in cms.ContentInfo.load(der)["content"]["signer_infos"]
              if s["digest_algorithm"]["algorithm"].native == "sha384")  # the primary's
    content = cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].native
    parts = {"manifest": content, "signed attributes": si["signed_attrs"].contents,
             "signature": si["signature"].native, "signer id": si["sid"].dump()}
    spans = {}
    for what, blob in parts.items():
        start = der.find(blob)
        assert start > 0 and der.find(blob, start + 1) == -1, what
        spans[what] = range(start, start + len(blob))
    return spans


def test_bundle_alone_rejects_every_flip_in_its_signed_parts(ceremonies, cert):
    der, accepted = _standalone_flips(ceremonies[0].output_dir / first_bundle(ceremonies[0]),
                                      cert)
    spans = _signed_spans(der)
    assert sum(len(r) for r in spans.values()) > 2000
    for what, span in spans.items():
        hit = sorted(accepted.intersection(span))
        assert not hit, f"{what}: flips at {hit[:10]} verify"


def test_bundle_alone_rejects_every_single_bit_flip(ceremonies, cert):
    der, accepted = _standalone_flips(ceremonies[0].output_dir / first_bundle(ceremonies[0]),
                                      cert)
    assert not accepted, f"{len(accepted)} of {len(der)} flips verify: {sorted(accepted)[:20]}"


# ------------------------------------------------------------------------------------ edits
def test_deleted_bundle_is_rejected(ceremonies, copy, cert):
    name = runner.bundle_name(ceremonies[0], "escrow")
    (copy / name).unlink()
    assert_rejected(copy, cert, name, "missing")


def test_bundle_from_another_ceremony_is_rejected(ceremonies, copy, cert):
    mine, other = ceremonies
    for region in ("eu", "escrow"):
        d = copy.parent / f"swap-{region}"
        shutil.copytree(copy, d)
        shutil.copyfile(other.output_dir / runner.bundle_name(other, region),
                        d / runner.bundle_name(mine, region))
        assert_rejected(d, cert, runner.bundle_name(mine, region), "differs")


def test_record_appended_after_close_is_rejected(copy, cert):
    recs = records_of(copy)
    extra = {"seq": len(recs), "time": recs[-1]["time"], "step": "export:mallory",
             "officer": None, "data": {"bundle": "bundle-x.p7", "sha256": "0" * 64},
             "prev": recs[-1]["hash"]}
    extra["hash"] = record_hash(extra)
    with open(copy / TRANSCRIPT, "ab") as fh:
        fh.write(canonical(extra) + b"\n")
    assert_rejected(copy, cert, "added or removed after closing")


def test_appended_record_with_forged_count_is_rejected(copy, cert):
    recs = records_of(copy)
    extra = {"seq": len(recs), "time": recs[-1]["time"], "step": "close", "officer": None,
             "data": recs[-1]["data"], "prev": recs[-1]["hash"]}
    extra["hash"] = record_hash(extra)
    write_records(copy, [*recs, extra])
    sig = json.loads((copy / SIGNATURE_FILE).read_text())
    sig.update(head=extra["hash"], records=len(recs) + 1)
    (copy / SIGNATURE_FILE).write_text(json.dumps(sig))
    assert_rejected(copy, cert, "does not verify")


@pytest.mark.parametrize("index", [1, 5, -2, -1])
def test_removed_record_is_rejected(copy, cert, index):
    recs = records_of(copy)
    del recs[index]
    write_records(copy, recs)
    assert_rejected(copy, cert)
    write_records(copy, rechain(recs))  # chain repaired by the forger: the signature catches it
    assert_rejected(copy, cert)


def test_removed_record_rechained_with_resigned_head_count_is_rejected(copy, cert):
    recs = rechain([r for r in records_of(copy) if r["step"] != "verify-bundles"])
    write_records(copy, recs)
    sig = json.loads((copy / SIGNATURE_FILE).read_text())
    sig.update(head=recs[-1]["hash"], records=len(recs))
    (copy / SIGNATURE_FILE).write_text(json.dumps(sig))
    assert_rejected(copy, cert, "does not verify")


@pytest.mark.parametrize("pair", [(2, 3), (6, 7), (-3, -2)])
def test_reordered_records_are_rejected(copy, cert, pair):
    recs = records_of(copy)
    i, j = pair
    recs[i], recs[j] = recs[j], recs[i]
    write_records(copy, recs)
    assert_rejected(copy, cert)
    write_records(copy, rechain(recs))
    assert_rejected(copy, cert)


def test_unsigned_transcript_is_rejected(copy, cert):
    (copy / SIGNATURE_FILE).unlink()
    assert_rejected(copy, cert, "missing or unreadable head signature")
