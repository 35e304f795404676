"""The officers' quorum travels with the release, and every reader checks it.

The attacker is an insider with the primary's *user* PIN (and, in one test, M-1 officer keys):
they can make the primary sign anything. Each forged or short bundle is put in front of both
readers - a regional KMS node (what `kms import` and every start run) and `ceremony verify` -
and each refuses it with a QuorumError naming what is missing. Real SoftHSM2 tokens throughout:
the primary, the region, and one token per officer who signs on a token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import cmac, hashes, hmac
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import algorithms
from pkcs11 import Attribute, KeyType, Mechanism

from ceremony import runner
from ceremony.countersign import countersign
from ceremony.officers import FileSigner, new_key_file
from ceremony.transcript import FILE as TRANSCRIPT
from ceremony.transcript import SIGNATURE_FILE, Transcript, canonical, head_message, record_hash
from ceremony.verify import verify_directory
from hsm.core import ops
from hsm.core.token import Token
from hsm.keys import attributes, export
from hsm.keys import officer as token_officer
from hsm.keys.x509 import to_pem
from kms.node import config as configs
from kms.node.node import Kms
from release import bundle as bundles
from release import signers
from release.certificates import as_asn1
from release.certificates import load as load_cert
from release.errors import QuorumError
from suite import fingerprint as fp
from tests.ceremony_kit import kit_fixture
from tests.helpers import run_cli
from tests.kms_kit import kms_config
from tests.test_adversary import ckr, raw_rv

kit = kit_fixture("quorum", regions=("eu",))


@pytest.fixture(scope="module")
def release(kit):
    """One closed ceremony nobody has countersigned yet; tests copy its directory."""
    return kit.run_release(countersigned=())


@pytest.fixture(scope="module")
def primary_cert(kit):
    return as_asn1(load_cert(kit.primary_cert, "primary signing"))


def eu_name(plan) -> str:
    return runner.bundle_name(plan, "eu")


def copy_dir(plan, tmp_path: Path, name: str = "out") -> Path:
    dst = tmp_path / name
    shutil.copytree(plan.output_dir, dst)
    return dst


def refused_by_kms(kit, tmp_path: Path, directory: Path, name: str) -> str:
    """What a region's node says about ``name`` in ``directory`` (fresh store, pinned 2 of
    alice, bob, carol): the reason it refused it."""
    config = kms_config(kit, tmp_path, directory)
    with Kms(config, pin=kit.regionals["eu"].user_pin) as node:
        report = node.start()
        assert not node.releases, report.lines()
        return report.refused[name]


def refused_by_verify(kit, directory: Path) -> str:
    with pytest.raises(QuorumError) as info:
        verify_directory(directory, kit.primary_cert, kit.pins())
    return str(info.value)


def resign_transcript(kit, directory: Path, replaced: dict[str, bytes]) -> None:
    """What the PIN holder does after swapping bundles: record their hashes in the transcript,
    re-chain it and have the primary sign the new head (no officer involved)."""
    lines = (directory / TRANSCRIPT).read_bytes().splitlines()
    records, prev = [], "0" * 64
    for line in lines:
        rec = json.loads(line)
        bundle = rec["data"].get("bundle") if rec["step"].startswith("export:") else None
        if bundle in replaced:
            rec["data"]["sha256"] = hashlib.sha256(replaced[bundle]).hexdigest()
        rec["prev"] = prev
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
        records.append(rec)
    (directory / TRANSCRIPT).write_bytes(b"".join(canonical(r) + b"\n" for r in records))
    with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
        sig = ops.sign(token, ops.private(f"{token.label}-signing"), "ecdsa-sha384",
                       head_message(prev))
    doc = json.loads((directory / SIGNATURE_FILE).read_text())
    doc.update(head=prev, records=len(records), signature=sig.hex())
    (directory / SIGNATURE_FILE).write_text(json.dumps(doc))


def graft_officers(target: bytes, source: bytes) -> bytes:
    """``target``'s primary signature with ``source``'s officer SignerInfos and certificates:
    officer signatures over another manifest, in an envelope of the format."""
    t, s = cms.ContentInfo.load(target)["content"], cms.ContentInfo.load(source)["content"]
    primary = t["signer_infos"][0]
    extra = [si for si in s["signer_infos"] if si["sid"].dump() != primary["sid"].dump()]
    extra_ids = {si["sid"].chosen["serial_number"].native for si in extra}
    certs = list(t["certificates"]) + [c for c in s["certificates"]
                                       if c.chosen.serial_number in extra_ids]
    algos = {a["algorithm"].native for a in t["digest_algorithms"]} | {
        si["digest_algorithm"]["algorithm"].native for si in extra}
    grown = cms.SignedData({"version": "v1",
                            "digest_algorithms": [{"algorithm": a} for a in sorted(algos)],
                            "encap_content_info": t["encap_content_info"],
                            "certificates": certs,
                            "signer_infos": [primary, *extra]})
    return cms.ContentInfo({"content_type": "signed_data", "content": grown}).dump()


# ================================================================ the forgery
def test_a_release_forged_with_only_the_primary_user_pin_is_refused(kit, release, tmp_path):
    """Secrets drawn in software, wrapped to the region's certificate, check values computed,
    the manifest signed inside the primary with `primary-signing` - everything a region
    checked before - and the transcript re-signed to match: no region and no verifier takes
    it, because no officer signed it."""
    out = copy_dir(release, tmp_path)
    name = eu_name(release)
    cert = as_asn1(load_cert(kit.primary_cert, "primary signing"))
    manifest = bundles.verify((out / name).read_bytes(), cert).manifest
    region_key = cx509.load_pem_x509_certificate(
        (kit.pki / f"{kit.regionals['eu'].label}.pem").read_bytes()).public_key()
    seed, aes = os.urandom(32), os.urandom(32)
    mac = hmac.HMAC(seed, hashes.SHA256())
    mac.update(export.KCV_LABEL)
    cm = cmac.CMAC(algorithms.AES(aes))
    cm.update(export.KCV_LABEL)
    values = {"generic-secret": ("hmac-sha256-8", mac.finalize()[:8]),
              "aes": ("aes-cmac-8", cm.finalize()[:8])}
    for entry in manifest["secrets"]:
        raw = seed if entry["key_type"] == "generic-secret" else aes
        entry["wrapped"] = region_key.encrypt(raw, padding.OAEP(
            padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)).hex()
        method, value = values[entry["key_type"]]
        entry["check_value"] = {"method": method, "value": value.hex()}
    with Token.open(kit.primary.label, pin=kit.primary.user_pin) as token:
        forged = bundles.build(manifest, cert, "ecdsa-sha384", lambda data: ops.sign(
            token, ops.private(f"{token.label}-signing"), "ecdsa-sha384", data))
    (out / name).write_bytes(forged)
    resign_transcript(kit, out, {name: forged})
    # What the forger made is a good bundle in every way but one: openssl accepts it...
    assert subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-in",
                           str(out / name), "-CAfile", str(kit.primary_cert), "-out",
                           os.devnull], capture_output=True).returncode == 0
    # ...and both readers refuse it for want of officers.
    want = "no officer signatures (0 of the 2 the pinned set for release"
    assert want in refused_by_verify(kit, out)
    lone = tmp_path / "bundles"
    lone.mkdir()
    shutil.copy(out / name, lone / name)
    assert want in refused_by_kms(kit, tmp_path, lone, name)
    # `kms import` says so and exits non-zero, in one line per bundle.
    config = tmp_path / "kms-eu.toml"
    proc = run_cli("kms", "--config", str(config), "import",
                   env={**os.environ, **kit.regionals["eu"].env,
                        "HSM_PIN": kit.regionals["eu"].user_pin.reveal()})
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert f"REFUSED {name}: " in proc.stdout and want in proc.stdout, proc.stdout


def test_m_minus_1_officer_signatures_are_refused(kit, release, tmp_path):
    out = copy_dir(release, tmp_path)
    kit.countersign(out, ("alice",))
    name = eu_name(release)
    want = "1 valid officer signature(s) of the 2 the pinned set for release"
    assert want in refused_by_verify(kit, out)
    assert f"{want} {release.release} needs (alice)" in refused_by_kms(kit, tmp_path, out, name)


def test_officer_signatures_over_another_manifest_are_refused(kit, release, tmp_path,
                                                              primary_cert):
    """alice and bob countersigned the escrow bundle; their SignerInfos moved onto the eu
    bundle (same ceremony, same primary) sign another manifest."""
    out = copy_dir(release, tmp_path)
    kit.countersign(out, ("alice", "bob"))
    name, escrow = eu_name(release), runner.bundle_name(release, "escrow")
    grafted = graft_officers((release.output_dir / name).read_bytes(),
                             (out / escrow).read_bytes())
    (out / name).write_bytes(grafted)
    assert [o.problem for o in bundles.verify(grafted, primary_cert).officers] == \
        ["is over another manifest"] * 2
    for message in (refused_by_verify(kit, out), refused_by_kms(kit, tmp_path, out, name)):
        assert "0 valid officer signature(s) of the 2" in message, message
        assert "alice's signature is over another manifest" in message, message
        assert "bob's signature is over another manifest" in message, message


def test_an_officer_the_region_does_not_pin_does_not_count(kit, release, tmp_path):
    out = copy_dir(release, tmp_path)
    new_key_file(tmp_path / "mallory.key")
    mallory = FileSigner(tmp_path / "mallory.key")
    kit.countersign(out, ("alice",))
    digest = bytes.fromhex(Transcript(out).data("close")["release_digest"])
    countersign(out, kit.primary_cert, mallory, "mallory", digest)
    name = eu_name(release)
    unpinned = fp.to_hex(signers.fingerprint(mallory.spki)[:8])
    for message in (refused_by_verify(kit, out), refused_by_kms(kit, tmp_path, out, name)):
        assert "1 valid officer signature(s) of the 2" in message and "(alice)" in message
        assert f"officer key {unpinned}... is not pinned for release {release.release}" \
            in message, message


def test_countersigned_bundles_verify_with_openssl_and_each_reader(kit, release, tmp_path):
    """The format interoperates: `openssl cms -verify` checks the primary's and every officer's
    signature (the officers' self-signed certificates as its trust anchors); the readers take
    the bundle with 2 of 3 pinned officers; countersigning twice changes nothing."""
    out = copy_dir(release, tmp_path)
    kit.countersign(out, ("alice", "bob"))
    again = {p.name: p.read_bytes() for p in out.glob("bundle-*")}
    kit.countersign(out, ("alice",))  # already signed: left as it is
    assert again == {p.name: p.read_bytes() for p in out.glob("bundle-*")}
    name = eu_name(release)
    der = (out / name).read_bytes()
    certs = cms.ContentInfo.load(der)["content"]["certificates"]
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(b"".join(to_pem(c.chosen) for c in certs))
    proc = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-in",
                           str(out / name), "-CAfile", str(anchors), "-out", os.devnull],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Verification successful" in proc.stderr, proc.stderr
    signer_count = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER",
                                   "-in", str(out / name)], capture_output=True, text=True)
    assert signer_count.stdout.count("signatureAlgorithm:") == 3  # primary + 2 officers
    assert sorted(verify_directory(out, kit.primary_cert, kit.pins())["officers"][name]) \
        == ["alice", "bob"]


def test_a_wrong_confirmed_digest_signs_nothing(kit, release, tmp_path):
    out = copy_dir(release, tmp_path)
    before = {p.name: p.read_bytes() for p in out.glob("bundle-*")}
    with pytest.raises(Exception) as info:
        countersign(out, kit.primary_cert, FileSigner(kit.officer_keys["alice"]), "alice",
                    bytes(32))
    assert "is not the one you confirmed" in str(info.value)
    # The command: without a confirmed digest (no terminal to ask at), or with another one,
    # it stops in one line and signs nothing.
    args = ("countersign", str(out), "--cert", str(kit.primary_cert), "--officer", "alice",
            "--key", str(kit.officer_keys["alice"]))
    for extra, says in (((), "no release digest confirmed"),
                        (("--digest", "00" * 32), "is not the one you confirmed")):
        proc = run_cli("ceremony", *args, *extra, env=kit.environ(), cwd=kit.root)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert before == {p.name: p.read_bytes() for p in out.glob("bundle-*")}


# ================================================================ pins are versioned, mandatory
def test_retiring_an_officer_keeps_older_releases_verifiable(kit, release, tmp_path):
    """Sets apply from a release on: release N signed by alice and bob still verifies after a
    set from N+1 that drops bob, and a later release needs the new set."""
    out = copy_dir(release, tmp_path)
    kit.countersign(out, ("alice", "bob"))
    n = int(release.release)
    pins = tmp_path / "pins.toml"
    pins.write_text(kit.pins_toml(m=2, officers=("alice", "bob", "carol"), from_release="1")
                    + kit.pins_toml(m=1, officers=("carol",), from_release=str(n + 1)))
    from release import quorum
    assert sorted(verify_directory(out, kit.primary_cert, quorum.load(pins))["officers"][
        eu_name(release)]) == ["alice", "bob"]
    later = quorum.load(pins).for_release(str(n + 1), "x")
    assert list(later.keys.values()) == ["carol"] and later.m == 1


def test_a_node_configuration_without_officers_is_refused_naming_how_to_pin(kit, tmp_path):
    with pytest.raises(configs.ConfigError) as info:
        kms_config(kit, tmp_path, tmp_path, officers="")
    message = str(info.value)
    assert "no officers pinned" in message and "[[officers]]" in message
    assert "docs/ceremony-quorum.md" in message and "ceremony keygen" in message


# ================================================================ upgrade in place
def test_a_release_of_the_previous_format_migrates_by_countersigning_and_serves_the_same_deks(
        kit, release, tmp_path, primary_cert):
    """A bundle as the previous main wrote it (version-1 manifest, the primary's signature
    only) and a store that recorded it: refused with the migration named, then accepted once
    officers countersign it - its recorded identity and every DEK unchanged, also after a third
    officer re-signs it later."""
    out = tmp_path / "v1"
    out.mkdir()
    name = eu_name(release)
    old = kit.previous_format_bundle(release, "eu")
    v1 = bundles.verify(old, primary_cert).manifest
    (out / name).write_bytes(old)
    store = tmp_path / "store"
    store.mkdir()
    # The previous main recorded the release under the SHA-256 of the bundle file.
    from kms.store import Store
    config = kms_config(kit, store, out)
    db = Store.open(config.store)
    db.record_release(v1["release"], v1["ceremony_id"], hashlib.sha256(old).hexdigest(), 0.0)
    db.close()
    with Kms(config, pin=kit.regionals["eu"].user_pin) as node:
        refusal = node.start().refused[name]
    assert "no officer signatures" in refusal and "ceremony countersign" in refusal
    assert "docs/ceremony-quorum.md" in refusal

    def sign(who):
        for officer in who:
            countersign_bundle(kit, out / name, primary_cert, officer)

    sign(("alice", "bob"))
    with Kms(config, pin=kit.regionals["eu"].user_pin) as node:
        assert list(node.start().held) == [v1["release"]]
        node.create_tenant("acme", "production")
        version = node.generate_secret("acme").version
        before = node.dek_for_decrypt("acme", "field", version)
    sign(("carol",))
    assert bundles.verify((out / name).read_bytes(), primary_cert).core_sha256 == \
        hashlib.sha256(old).hexdigest()
    with Kms(config, pin=kit.regionals["eu"].user_pin) as node:
        assert list(node.start().held) == [v1["release"]]
        assert node.dek_for_decrypt("acme", "field", version) == before


def countersign_bundle(kit, path: Path, primary_cert, officer: str) -> None:
    """One bundle outside a ceremony directory (a migrated release's, in a region's
    bundle_dir), countersigned as `ceremony countersign` would."""
    signer = FileSigner(kit.officer_keys[officer])
    path.write_bytes(bundles.countersign(path.read_bytes(), primary_cert, signer,
                                         signers.certificate(signer, officer)))


# ================================================================ officers' own tokens
def test_officers_sign_approvals_and_manifests_on_their_own_tokens(
        kit, tmp_path, softhsm_token_factory):
    """alice's key is generated in a SoftHSM2 token of her own (`ceremony keygen --token`);
    she approves the run and countersigns its bundles with `--token`; bob uses his file; the
    region pins her token key and takes the release."""
    alice_token = softhsm_token_factory(prefix="officer-alice")
    uri = f"pkcs11:token={alice_token.label}?pin-source=env:ALICE_PIN"
    env = {**kit.environ(), "ALICE_PIN": alice_token.user_pin.reveal()}
    for var in ("HSM_PIN", "HSM_SO_PIN"):  # the officer needs nobody else's PIN
        env.pop(var)
    made = run_cli("ceremony", "keygen", "--token", uri, env=env, cwd=kit.root)
    assert made.returncode == 0, made.stderr
    pem = made.stdout[:made.stdout.index("-----END PUBLIC KEY-----") + 24] + "\n"
    again = run_cli("ceremony", "keygen", "--token", uri, env=env, cwd=kit.root)
    assert again.returncode == 2 and "already exists" in again.stderr  # never replaced
    text = kit.plan_text(regions=["eu"]).replace(kit.officer_pubs["alice"], pem)
    plan_path = kit.write_plan(text)
    kit.open_and_approve(plan_path, officers=("bob",))
    from ceremony import plan as plans
    plan = plans.load(plan_path)
    approved = run_cli("ceremony", "approve", "--plan", str(plan_path), "--officer", "alice",
                       "--token", uri, env=env, cwd=kit.root)
    assert approved.returncode == 0, approved.stderr
    ran = kit.cli("run", plan_path, "--env", kit.env_file())
    assert ran.returncode == 0, ran.stderr
    words = next(line for line in ran.stdout.splitlines() if "Digest" in line)
    signed = run_cli("ceremony", "countersign", str(plan.output_dir), "--cert",
                     str(kit.primary_cert), "--officer", "alice", "--token", uri,
                     "--digest", words.split("Digest", 1)[1], env=env, cwd=kit.root)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("signed by alice") == 2, signed.stdout
    kit.countersign(plan.output_dir, ("bob",))
    with Token.open(alice_token.label, pin=alice_token.user_pin) as token:
        alice_fp = signers.fingerprint(token_officer.TokenSigner(token).spki).hex()
    pins = (f'\n[[officers]]\nfrom_release = "1"\nm = 2\nkeys = {{ alice = "{alice_fp}", '
            f'bob = "{kit.fingerprint("bob")}" }}\n')
    config = kms_config(kit, tmp_path, plan.output_dir, officers=pins)
    with Kms(config, pin=kit.regionals["eu"].user_pin) as node:
        assert list(node.start().held) == [plan.release]


def test_the_officer_token_key_cannot_be_read_changed_or_used_for_anything_but_ecdsa(
        softhsm_token_factory):
    """The officer's own PIN holder (say, whoever picks up the card and its PIN) cannot get the
    key out or widen it: the token refuses, with its CKR code."""
    tt = softhsm_token_factory(prefix="officer")
    spki = token_officer.generate(tt.token)
    assert signers.curve(spki) == "secp256r1"
    ref = ops.private(token_officer.DEFAULT_LABEL)
    assert attributes.check(tt.token, ref, token_officer.OFFICER_SIGNING) == []
    raw = tt.token.module.raw
    with tt.token.lease() as lease:
        key = lease.key(ref)
        h = lease.session.handle
        assert ckr(lambda: key[Attribute.VALUE]) == "CKR_ATTRIBUTE_SENSITIVE"
        assert raw_rv(raw.set_attributes(h, key.handle, {Attribute.EXTRACTABLE: True})) in (
            "CKR_ATTRIBUTE_READ_ONLY", "CKR_ACTION_PROHIBITED")
        assert raw_rv(raw.set_attributes(h, key.handle, {Attribute.DERIVE: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert raw_rv(raw.copy_object(h, key.handle, {Attribute.TOKEN: False})) == \
            "CKR_ACTION_PROHIBITED"
        wrapper = lease.session.generate_key(KeyType.AES, 256, store=False, template={
            Attribute.WRAP: True, Attribute.LABEL: "atk-officer"})
        assert ckr(lambda: wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)) == \
            "CKR_KEY_UNEXTRACTABLE"
        # No other mechanism than raw ECDSA, even one the token has for EC keys.
        assert raw_rv(raw.operation_init("C_SignInit", h, Mechanism.ECDSA_SHA1, None,
                                         key.handle)) == "CKR_MECHANISM_INVALID"
        wrapper.destroy()
    # What it may do, it does: a signature the bundle format verifies.
    signer = token_officer.TokenSigner(tt.token)
    cert = signers.certificate(signer, "alice")
    from cryptography.hazmat.primitives.asymmetric import ec
    cx509.load_der_x509_certificate(cert.dump()).public_key().verify(
        cert["signature_value"].native, cert["tbs_certificate"].dump(), ec.ECDSA(hashes.SHA256()))
