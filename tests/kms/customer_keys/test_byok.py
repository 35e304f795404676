"""BYOK end to end on real tokens: per-org certificates made in the regional HSM, the customer's
wrap (no HSM), uploads unwrapped and checked inside the HSM, every refusal of the issue."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3

import pytest
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from hsm import inventory
from hsm.keys import byok as hbyok
from kms.customer_keys import byok
from kms.errors import KmsError, PolicyViolation, RateLimited, UnknownTenant
from kms.key_rules import DAY, HOUR
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms
from tests.ceremony_kit import kit_fixture
from tests.helpers import assert_secrets_absent
from tests.kms_kit import Clock, CustomerDek, kms_config
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


kit = kit_fixture("byok", regions=("eu",))


@pytest.fixture(scope="module")
def node(kit, tmp_path_factory):
    """One node for the module: the BYOK key pairs (RSA-4096, slow) live in its token."""
    release = kit.run_release()
    tmp = tmp_path_factory.mktemp("byok-node")
    kms = Kms(kms_config(kit, tmp, release.output_dir), pin=kit.regionals["eu"].user_pin,
              clock=Clock())
    kms.start()
    kms.tmp = tmp
    for org in ("acme", "other"):
        kms.create_tenant(org, "sandbox")
    kms.certs = {(org, p): tmp / f"{org}-{p}.pem" for org, p in
                 (("acme", "seed"), ("acme", "dek"), ("other", "seed"))}
    for (org, purpose), path in kms.certs.items():
        byok.certificate(kms, org, path, purpose=purpose)
    yield kms
    kms.close()


def _wrap(node, tmp_path, org="acme", purpose="seed", secret=None, **kw):
    out = tmp_path / f"w-{os.urandom(3).hex()}"
    secret_file, hash_file = byok.wrap(node.certs[(org, purpose)], out, secret=secret, **kw)
    return secret_file, hash_file


def _later(node, hours=5):
    node.clock.now += hours * HOUR


def test_certificate_is_issued_by_the_regional_issuer_and_the_keys_meet_their_policy(node):
    pems = node.certs[("acme", "seed")].read_bytes()
    leaf, issuer = cx509.load_pem_x509_certificates(pems)
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(issuer)
    assert leaf.public_key().key_size == 4096
    assert "BYOK seed key of org acme" in leaf.subject.rfc4514_string()
    assert leaf.extensions.get_extension_for_class(cx509.KeyUsage).value.key_encipherment
    # The dek and seed keys are two keys: a ciphertext for one is nothing to the other.
    dek_leaf = cx509.load_pem_x509_certificates(node.certs[("acme", "dek")].read_bytes())[0]
    assert dek_leaf.public_key().public_numbers() != leaf.public_key().public_numbers()
    roles = {r.label: r for r in inventory.audit(node.token)}
    assert roles["byok-seed-acme"].role == "byok-seed"
    assert roles["byok-dek-acme"].role == "byok-dek"
    assert roles["byok-issuer-eu"].role == "primary-signing"
    assert all(not r.deviations for r in roles.values() if r.label.startswith("byok-"))
    # Outputs are never overwritten; an unknown org gets no key.
    with pytest.raises(KmsError, match="already exists"):
        byok.certificate(node, "acme", node.certs[("acme", "seed")])
    with pytest.raises(UnknownTenant):
        byok.certificate(node, "nobody", node.tmp / "nobody.pem")
    assert "byok-seed-nobody" not in {r.label for r in inventory.audit(node.token)}


def test_seed_upload_secret_stays_in_the_hsm_and_serves_deks(node, tmp_path):
    secret = os.urandom(32)
    _later(node)
    s, h = _wrap(node, tmp_path, secret=secret)
    row = byok.upload(node, "acme", "field", s, h)
    assert (row.source, row.derivation) == ("UPLOADED", "PBKDF2")
    # What is stored (wrapped) is the token's HMAC image of the secret, not the secret.
    image = node._tenant_secret(row)
    assert image == hmac.new(secret, hbyok.IMAGE_TAG, hashlib.sha256).digest() != secret
    sdk = FieldEncryptor(node)
    blob = sdk.encrypt("acme", b"seeded")
    node.cache.flush()
    assert sdk.decrypt("acme", blob) == b"seeded"
    version, mode, dek = node.dek_for_encrypt("acme")
    backup = node.export_backup("acme", tmp_path / "acme.json")
    assert_secrets_absent([secret, dek, node._pin.reveal().encode()],
                   [node.config.store.removeprefix("sqlite:///"), backup])


def test_dek_upload_is_the_customers_dek(node, tmp_path):
    dek = os.urandom(32)
    _later(node)
    s, h = _wrap(node, tmp_path, purpose="dek", secret=dek)
    row = byok.upload(node, "acme", "field", s, h, derivation="NONE")
    assert row.derivation == "NONE"
    blob = FieldEncryptor(node).encrypt("acme", b"customer's own key")
    assert FieldEncryptor(CustomerDek(dek)).decrypt("acme", blob) == b"customer's own key"
    # Destroy: crypto-shredded, the cached DEK invalidated.
    node.destroy("acme", "field", row.version)
    with pytest.raises(KmsError, match="key destroyed"):
        FieldEncryptor(node).decrypt("acme", blob)


def _state(node, org="acme"):
    db = sqlite3.connect(node.config.store.removeprefix("sqlite:///"))
    try:
        return (node.store.secrets(org),
                db.execute("SELECT COUNT(*) FROM byok_uploads").fetchone()[0])
    finally:
        db.close()


def test_every_refusal_stores_nothing(node, tmp_path):
    _later(node)
    before = _state(node)
    # Another org's certificate.
    s, h = _wrap(node, tmp_path, org="other")
    with pytest.raises(hbyok.ByokRefused, match="another certificate"):
        byok.upload(node, "acme", "field", s, h)
    # Truncated at a base64 boundary, truncated mid-group, and not base64 at all.
    s, h = _wrap(node, tmp_path)
    text = s.read_text().strip()
    (tmp_path / "cut.b64").write_text(text[:400])
    with pytest.raises(hbyok.ByokRefused, match="300 bytes.*truncated"):
        byok.upload(node, "acme", "field", tmp_path / "cut.b64", h)
    (tmp_path / "odd.b64").write_text(text[:-3])
    with pytest.raises(KmsError, match="not valid base64"):
        byok.upload(node, "acme", "field", tmp_path / "odd.b64", h)
    (tmp_path / "junk.b64").write_text("this is not base64!\n")
    with pytest.raises(KmsError, match="not valid base64"):
        byok.upload(node, "acme", "field", tmp_path / "junk.b64", h)
    # A 16-byte secret (wrapped by hand: `kms byok wrap` refuses to make one).
    short = os.urandom(16)
    pub = cx509.load_pem_x509_certificates(node.certs[("acme", "seed")].read_bytes())[0]
    ct = pub.public_key().encrypt(short, padding.OAEP(padding.MGF1(hashes.SHA1()),
                                                      hashes.SHA1(), None))
    (tmp_path / "short.b64").write_text(base64.b64encode(ct).decode())
    (tmp_path / "short.h").write_text(base64.b64encode(hashlib.sha256(short).digest()).decode())
    with pytest.raises(hbyok.ByokRefused, match="fewer than 32 bytes; it must be 32"):
        byok.upload(node, "acme", "field", tmp_path / "short.b64", tmp_path / "short.h")
    # Hash mismatch.
    s2, h2 = _wrap(node, tmp_path)
    with pytest.raises(hbyok.ByokRefused, match="does not match"):
        byok.upload(node, "acme", "field", s2, h)
    # A hash file that is no SHA-256.
    (tmp_path / "h16").write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(KmsError, match="not a SHA-256"):
        byok.upload(node, "acme", "field", s2, tmp_path / "h16")
    # OAEP SHA-256: the customer tool makes it; SoftHSM2 2.6.1 cannot unwrap it.
    s3, h3 = _wrap(node, tmp_path, hash_name="sha256")
    with pytest.raises(hbyok.ByokRefused, match="SHA-1 only"):
        byok.upload(node, "acme", "field", s3, h3, oaep="sha256")
    # A NONE upload needs the dek certificate; database keys take no NONE at all.
    with pytest.raises(hbyok.ByokRefused, match="another certificate"):
        byok.upload(node, "acme", "field", s2, h2, derivation="NONE")
    with pytest.raises(PolicyViolation, match="seeds only"):
        byok.upload(node, "acme", "database", s2, h2, derivation="NONE")
    assert _state(node) == before


def test_replay_and_rate_limits(node, tmp_path):
    _later(node)
    s, h = _wrap(node, tmp_path)
    first = byok.upload(node, "acme", "field", s, h)
    _later(node)
    before = _state(node)
    with pytest.raises(KmsError, match="already uploaded.*replayed upload is refused"):
        byok.upload(node, "acme", "field", s, h)
    assert _state(node) == before
    # Sandbox orgs: one new secret per 4 h (upload included); nothing recorded when refused.
    s2, h2 = _wrap(node, tmp_path)
    second = byok.upload(node, "acme", "field", s2, h2)
    assert second.version == first.version + 1
    s3, h3 = _wrap(node, tmp_path)
    before = _state(node)
    with pytest.raises(RateLimited):
        byok.upload(node, "acme", "field", s3, h3)
    assert _state(node) == before
    _later(node)
    byok.upload(node, "acme", "field", s3, h3)       # not a replay: the refused one never counted


def test_database_uploads_wait_24h_and_live_90_days(node, tmp_path):
    _later(node)
    s, h = _wrap(node, tmp_path)
    row = byok.upload(node, "acme", "database", s, h)
    assert row.usable_from == row.created_at + 24 * HOUR
    with pytest.raises(KmsError, match="no usable database"):
        node.dek_for_encrypt("acme", "database")
    node.clock.now += 24 * HOUR
    assert node.dek_for_encrypt("acme", "database")[0] == row.version
    with pytest.raises(PolicyViolation, match="minimum lifespan"):
        node.destroy("acme", "database", row.version)
    node.clock.now += 90 * DAY
    node.destroy("acme", "database", row.version)


def test_customer_wrap_never_writes_the_generated_secret(node, tmp_path):
    s, h = _wrap(node, tmp_path)
    assert sorted(p.name for p in s.parent.iterdir()) == ["secret.b64", "secret.sha256.b64"]
    assert len(base64.b64decode(s.read_text())) == 512
    assert len(base64.b64decode(h.read_text())) == 32
    with pytest.raises(KmsError, match="already exists"):
        byok.wrap(node.certs[("acme", "seed")], s.parent)
    with pytest.raises(KmsError, match="32 bytes"):
        byok.wrap(node.certs[("acme", "seed")], tmp_path / "x", secret=b"short")


def test_cli_byok_flow(kit, node, tmp_path):
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args, config=True):
        pre = ["--config", str(node.config.path)] if config else []
        return run_cli("kms", *pre, *args, env=env)
    # The customer side needs no configuration and no HSM.
    out = tmp_path / "cust"
    w = kms("byok", "wrap", "--cert", str(node.certs[("acme", "dek")]), "--generate", "--out",
            str(out), config=False)
    assert w.returncode == 0, w.stderr
    bad = kms("byok", "wrap", "--cert", str(tmp_path / "missing.pem"), "--generate", "--out",
              str(tmp_path / "c2"), config=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c2").exists()
    # The CLI runs its own node on the same store; the module's clock is far ahead of real
    # time, so give it an org of its own.
    assert kms("tenant", "create", "--org", "cli-byok", "--no-secret").returncode == 0
    cert = tmp_path / "cli.pem"
    c = kms("byok", "certificate", "--org", "cli-byok", "--purpose", "dek", "--out", str(cert))
    assert c.returncode == 0 and "signed by the regional issuer" in c.stdout, c.stderr
    w = kms("byok", "wrap", "--cert", str(cert), "--generate", "--out", str(tmp_path / "c3"),
            config=False)
    assert w.returncode == 0, w.stderr
    up = kms("tenant", "byok-upload", "--org", "cli-byok", "--secret", str(tmp_path / "c3/secret.b64"),
             "--hash", str(tmp_path / "c3/secret.sha256.b64"), "--derivation", "NONE")
    assert up.returncode == 0 and "(NONE) ACTIVE" in up.stdout, up.stderr
    enc = kms("encrypt", "--org", "cli-byok", "byok via cli")
    dec = kms("decrypt", "--org", "cli-byok", enc.stdout.strip())
    assert dec.stdout == "byok via cli\n", dec.stderr
    # `tenant upload`, the deprecated name of byok-upload, is the same command
    again = kms("tenant", "upload", "--org", "cli-byok", "--secret",
                str(tmp_path / "c3/secret.b64"), "--hash",
                str(tmp_path / "c3/secret.sha256.b64"), "--derivation", "NONE")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "replayed upload" in again.stderr or "one new field secret" in again.stderr
    for stream in (w.stdout, up.stdout, enc.stdout, c.stdout, again.stderr):
        assert kit.regionals["eu"].user_pin.reveal() not in stream


def _forged_byok_certificate(node, org: str, purpose: str, path):
    """The regional user-PIN holder's move: one C_Sign with ``byok-issuer-eu`` over a
    certificate with the org's subject for an RSA key the insider generated (and so can
    decrypt with)."""
    from asn1crypto import keys as asn1keys
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hsm.keys import x509 as hx
    from hsm.core.token import KeyRef
    from pkcs11 import ObjectClass
    mine = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    spki = asn1keys.PublicKeyInfo.load(mine.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    issuer_label = f"byok-issuer-{node.config.region}"
    issuer_spki = hx.public_key_info(node.token, KeyRef(issuer_label, ObjectClass.PUBLIC_KEY))
    issuer_pem = node.certs[(org, purpose)].read_bytes().split(b"-----END CERTIFICATE-----\n",
                                                               1)[1]
    issuer_name = cx509.load_pem_x509_certificate(issuer_pem)
    from asn1crypto import x509 as asn1x509
    cert = hx.issue(node.token, issuer_key=KeyRef(issuer_label, ObjectClass.PRIVATE_KEY),
                    signature=byok.ISSUER_ROLE.signature,
                    subject=hx.names(role=f"BYOK {purpose} key of org {org}",
                                     token_label=node.token.label, organization="hsm-suite",
                                     region=node.config.region),
                    subject_spki=spki,
                    issuer_name=asn1x509.Certificate.load(issuer_name.public_bytes(
                        serialization.Encoding.DER)).subject,
                    issuer_spki=issuer_spki, ca=False, key_usage={"key_encipherment"}, days=30)
    path.write_bytes(hx.to_pem(cert) + issuer_pem)
    return path


def test_a_byok_certificate_signed_by_the_issuer_for_an_insiders_key_is_refused_once_pinned(
        node, tmp_path, byok_pin_file):
    """`kms byok wrap` pins the org's key on first use; the insider's certificate, though the
    regional issuer really signed it, carries another key and is refused: one line, exit 2,
    nothing written. Only the exact new fingerprint, given on purpose, is accepted."""
    genuine = node.certs[("acme", "seed")]
    want = node.store.customer_key("acme", byok.KIND)["seed"]["spki_sha256"]  # from the token

    def wrap(cert, out, *extra):
        return run_cli("kms", "byok", "wrap", "--cert", cert, "--generate", "--out", out, *extra)
    first = wrap(genuine, tmp_path / "first")
    assert first.returncode == 0, first.stderr
    assert f"SPKI SHA-256 {want} (pinned on first use" in first.stderr
    assert str(byok_pin_file) in first.stderr and byok_pin_file.stat().st_mode & 0o077 == 0
    again = wrap(genuine, tmp_path / "again")
    assert again.returncode == 0 and "the key pinned for this org" in again.stderr

    forged = _forged_byok_certificate(node, "acme", "seed", tmp_path / "forged.pem")
    leaf, issuer = cx509.load_pem_x509_certificates(forged.read_bytes())
    leaf.verify_directly_issued_by(issuer)     # the issuer's signature alone proves nothing
    got = byok.spki_sha256(leaf)
    refused = wrap(forged, tmp_path / "refused")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"kms: error: the BYOK seed certificate for org acme carries key {got}, not the key "
        f"pinned for that org on {_pinned_at(byok_pin_file)} ({want}) in {byok_pin_file}; "
        "nothing was written - if the KMS operator confirms the new key out of band, run "
        f"again with --accept-new-key {got}")
    assert not (tmp_path / "refused").exists()
    wrong = wrap(forged, tmp_path / "wrong", "--accept-new-key", want)
    assert wrong.returncode == 2 and "is not the key of this certificate" in wrong.stderr
    other_org = wrap(genuine, tmp_path / "other", "--org", "other")
    assert other_org.returncode == 2 and "for org acme, not other" in other_org.stderr
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "other").exists()
    accepted = wrap(forged, tmp_path / "accepted", "--accept-new-key", got.upper())
    assert accepted.returncode == 0 and f"accepted, replacing {want}" in accepted.stderr
    assert wrap(genuine, tmp_path / "back").returncode == 2   # now the old key is the stranger


def _pinned_at(pin_file) -> str:
    import json
    return json.loads(pin_file.read_text())["pins"]["acme"]["seed"]["pinned"]


def _pin_one(path: str, org: str) -> None:
    from pathlib import Path

    from kms.customer_keys import byok_pins
    with byok_pins.checked(Path(path), org, "seed", org.encode().hex().ljust(64, "0")):
        pass


def test_pins_from_concurrent_wraps_are_all_kept_and_a_broken_pin_file_is_named(tmp_path):
    """Four processes pinning four orgs at once lose none (the lock), and a pin file that is
    not one stops the wrap with one line naming it, leaving it as it was."""
    import multiprocessing

    from kms.customer_keys import byok_pins
    path = tmp_path / "cfg" / "byok-pins.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_pin_one, args=(str(path), f"org{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    import json
    assert sorted(json.loads(path.read_text())["pins"]) == [f"org{i}" for i in range(4)]
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    path.write_text("{not json")
    with pytest.raises(KmsError, match="cannot read the BYOK pin file .*byok-pins.json"):
        _pin_one(str(path), "org9")
    assert path.read_text() == "{not json"
