"""The regional KMS end to end on real tokens: ceremony bundles -> import -> tenants -> DEKs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

import pytest
from pkcs11 import Attribute

from ceremony import plan as plans
from kms.errors import (CorruptRecord, ImportRefused, KeyDestroyed, KmsError, PolicyViolation,
                        RateLimited, ReleaseNotHeld, UnknownTenant)
from kms.key_rules import BACKUP_VALIDITY, DAY, HOUR
from kms.caller.sdk import FieldEncryptor
from kms.node import rowcache
from kms.node.node import Kms
from tests.ceremony_kit import kit_fixture
from tests.kms_kit import Clock, kms_config
from tests.helpers import run_cli


kit = kit_fixture("kms", regions=("eu", "us"))


@pytest.fixture(scope="module")
def release(kit):
    """One closed release ceremony; its output directory is the KMS bundle directory."""
    return kit.run_release()


@pytest.fixture
def node(kit, release, tmp_path):
    clock = Clock()
    kms = Kms(kms_config(kit, tmp_path, release.output_dir), pin=kit.regionals["eu"].user_pin,
              clock=clock)
    kms.start()
    kms.test_clock = clock
    yield kms
    kms.close()


def _token_objects(token) -> int:
    return token.run("count", lambda lease: sum(
        1 for _ in lease.session.get_objects({Attribute.TOKEN: True})))


def test_import_holds_the_release_in_session_objects_only(kit, release, tmp_path):
    token = kit.regionals["eu"].token
    before = _token_objects(token)
    kms = Kms(kms_config(kit, tmp_path, release.output_dir), pin=kit.regionals["eu"].user_pin)
    report = kms.start()
    try:
        assert list(report.held) == [release.release] and report.refused == {}
        held = report.held[release.release]
        attrs = token.run("read", lambda lease: lease.key(held.seed).get_attributes(
            [Attribute.TOKEN, Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.SIGN,
             Attribute.DECRYPT, Attribute.ENCRYPT]))
        assert attrs == {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                         Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                         Attribute.DECRYPT: False, Attribute.ENCRYPT: False}
        assert _token_objects(token) == before  # nothing about releases persisted in the token
        assert kms.store.releases()[release.release][0] == release.id
    finally:
        kms.close()


def test_tampered_practice_and_foreign_bundles_are_refused_the_rest_imported(kit, release,
                                                                            tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    src = next(release.output_dir.glob("bundle-*-eu.p7"))
    shutil.copy(src, bundles / src.name)
    tampered = bytearray(src.read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    (bundles / "bundle-x-eu-tampered.p7").write_bytes(bytes(tampered))
    practice_plan = kit.write_plan(regions=["eu"], practice=True)
    kit.open_and_approve(practice_plan)
    assert kit.cli("run", practice_plan, "--env", kit.env_file()).returncode == 0
    practice = next(plans.load(practice_plan).output_dir.glob("bundle-*-eu-PRACTICE.p7"))
    shutil.copy(practice, bundles / practice.name)
    kms = Kms(kms_config(kit, tmp_path, bundles), pin=kit.regionals["eu"].user_pin)
    report = kms.start()
    try:
        assert list(report.held) == [release.release]
        assert "bundle-x-eu-tampered.p7" in report.refused
        assert "PRACTICE" in report.refused[practice.name]
    finally:
        kms.close()
    # The us node ignores the eu bundle (another region) and holds nothing.
    us = Kms(kms_config(kit, tmp_path, bundles, region="us"), pin=kit.regionals["us"].user_pin)
    try:
        assert us.start().held == {}
        with pytest.raises(ReleaseNotHeld):
            us.current_release()
    finally:
        us.close()


def test_a_replayed_or_conflicting_bundle_for_a_held_release_is_refused(kit, release, tmp_path):
    cfg = kms_config(kit, tmp_path, release.output_dir)
    from kms.store import Store
    store = Store.open(cfg.store)
    store.record_release(release.release, "an-older-ceremony", "00" * 32, 0.0)
    store.close()
    kms = Kms(cfg, pin=kit.regionals["eu"].user_pin)
    report = kms.start()
    try:
        assert report.held == {}
        assert any("replayed or conflicting" in why for why in report.refused.values())
    finally:
        kms.close()


def test_tenant_lifecycle_rotation_destroy_and_sdk(node):
    sdk = FieldEncryptor(node)
    node.create_tenant("acme", "production")
    v1 = node.generate_secret("acme")
    assert (v1.version, v1.state, v1.source, v1.derivation) == (1, "ACTIVE", "HSM", "PBKDF2")
    old = sdk.encrypt("acme", b"4111-1111-1111-1111")
    assert b"4111" not in old
    with pytest.raises(RateLimited) as err:
        node.rotate("acme")
    assert "next allowed" in str(err.value)
    node.test_clock.now += 25 * HOUR
    v2 = node.rotate("acme")
    assert v2.version == 2
    new = sdk.encrypt("acme", b"5500-0000-0000-0004")
    assert sdk.decrypt("acme", old) == b"4111-1111-1111-1111"  # archived key still decrypts
    assert [r.state for r in node.store.secrets("acme")] == ["ARCHIVED", "ACTIVE"]
    node.destroy("acme", "field", 1)
    with pytest.raises(KeyDestroyed, match="key destroyed"):
        sdk.decrypt("acme", old)
    assert sdk.decrypt("acme", new) == b"5500-0000-0000-0004"
    assert node.store.get("acme", "field", 1).wrapped is None  # crypto-shredded


def test_deks_are_cached_encrypted_and_invalidated_on_destroy(node):
    node.create_tenant("cachy", "sandbox")
    node.generate_secret("cachy")
    version, mode, dek = node.dek_for_encrypt("cachy")
    misses = node.cache.stats()["misses"]
    assert node.dek_for_decrypt("cachy", "field", version) == dek
    assert node.cache.stats()["hits"] >= 1 and node.cache.stats()["misses"] == misses
    node.destroy("cachy", "field", version)
    with pytest.raises(KeyDestroyed):
        node.dek_for_decrypt("cachy", "field", version)


def test_a_wrapped_secret_copied_to_another_tenant_does_not_unwrap(node):
    node.create_tenant("alice-org", "production")
    node.create_tenant("mallory-org", "production")
    row = node.generate_secret("alice-org")
    node.generate_secret("mallory-org")
    stolen = dataclasses.replace(row, org_id="mallory-org")
    with pytest.raises(CorruptRecord, match="failed its authentication in the HSM"):
        node._tenant_secret(stolen)
    other_version = dataclasses.replace(row, version=row.version + 1)
    with pytest.raises(CorruptRecord, match="failed its authentication in the HSM"):
        node._tenant_secret(other_version)


def test_database_secrets_wait_24h_and_live_3_months(node):
    node.create_tenant("dbco", "production")
    row = node.generate_secret("dbco", "database")
    with pytest.raises(KmsError, match="no usable database secret") as info:
        node.dek_for_encrypt("dbco", "database")
    assert type(info.value) is KmsError  # what the service raises for it: no subclass
    node.test_clock.now += 24 * HOUR + 1
    version, _, dek_a = node.dek_for_encrypt("dbco", "database", fragment="block-1")
    _, _, dek_b = node.dek_for_encrypt("dbco", "database", fragment="block-2")
    assert version == row.version and dek_a != dek_b  # a unique DEK per data fragment
    with pytest.raises(PolicyViolation):
        node.destroy("dbco", "database", row.version)
    node.test_clock.now += 91 * DAY
    assert node.destroy("dbco", "database", row.version).state == "DESTROYED"


def test_unknown_tenant_and_a_release_not_held(node):
    with pytest.raises(UnknownTenant):
        node.dek_for_encrypt("nobody")
    node.create_tenant("old-rel", "developer")
    row = node.generate_secret("old-rel")
    with pytest.raises(ReleaseNotHeld):
        node._dek(dataclasses.replace(row, release="999"), None, node.cache.generation())


def test_uploaded_dek_without_derivation_is_used_as_is(node):
    node.create_tenant("byok", "production")
    customer_dek = hashlib.sha256(b"customer key").digest()
    node.upload_secret("byok", "field", customer_dek, derivation="NONE")
    version, mode, dek = node.dek_for_encrypt("byok")
    assert (mode, dek) == ("NONE", customer_dek)


def test_backup_round_trip_and_tamper_detection(node, tmp_path):
    node.create_tenant("backed", "production")
    row = node.generate_secret("backed")
    blob = FieldEncryptor(node).encrypt("backed", b"payload")
    path = node.export_backup("backed", tmp_path / "backed.json")
    assert b"payload" not in path.read_bytes()
    doc = json.loads(path.read_text())
    assert doc["region"] == "eu" and doc["expires"] - doc["created"] == BACKUP_VALIDITY
    # A row lost from this store comes back from the backup, and old data decrypts again.
    _delete_row(node, "backed", row.version)
    node.cache.flush()
    assert node.import_backup(path) == "backed"
    assert FieldEncryptor(node).decrypt("backed", blob) == b"payload"
    tampered = tmp_path / "tampered.json"
    text = path.read_text()
    i = text.index('"ciphertext": "') + 20
    tampered.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:])
    with pytest.raises(KmsError, match="integrity"):
        node.import_backup(tampered)


def _delete_row(node, org, version):
    import sqlite3
    db = node.config.store.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM tenant_secrets WHERE org_id = ? AND version = ?",
                     (org, version))


def test_backup_never_revives_a_destroyed_key_here_or_in_another_store(node, tmp_path):
    node.create_tenant("shred", "production")
    row = node.generate_secret("shred")
    blob = FieldEncryptor(node).encrypt("shred", b"gone for good")
    path = node.export_backup("shred", tmp_path / "shred.json")
    node.destroy("shred", "field", row.version)
    # Same store: the tombstone (the DESTROYED row) blocks the import; nothing is revived.
    with pytest.raises(KmsError, match="already holds field v1"):
        node.import_backup(path)
    with pytest.raises(KeyDestroyed):
        FieldEncryptor(node).decrypt("shred", blob)
    # Another region: refused before anything else.
    doc = json.loads(path.read_text())
    assert doc["region"] == "eu"
    wrong = tmp_path / "us.json"
    wrong.write_text(json.dumps({**doc, "region": "us"}))
    with pytest.raises(KmsError, match="of region 'us'; this KMS serves 'eu'"):
        node.import_backup(wrong)
    # Rewriting the binding (region, expiry) in the file breaks its authentication.
    node.test_clock.now += BACKUP_VALIDITY + 1
    with pytest.raises(KmsError, match="expired"):
        node.import_backup(path)
    stretched = tmp_path / "stretched.json"
    stretched.write_text(json.dumps({**doc, "expires": doc["expires"] + 10 * BACKUP_VALIDITY}))
    _delete_row(node, "shred", row.version)  # even with the tombstone gone
    with pytest.raises(KmsError, match="integrity"):
        node.import_backup(stretched)
    assert node.store.secrets("shred") == []
    # (Last: a second node in this process destroys the first one's session keys on close.)
    # Another store of the same region (a fresh database): refused, the org is not its own.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Kms(dataclasses.replace(node.config, store=f"sqlite:///{other_dir / 'o.db'}"),
                pin=node._pin)
    other.start()
    try:
        with pytest.raises(KmsError, match="does not exist in this store"):
            other.import_backup(path)
        other.create_tenant("shred", "production")  # recreated: another creation record
        with pytest.raises(KmsError, match="exported from another store"):
            other.import_backup(path)
        assert other.store.secrets("shred") == []
    finally:
        other.close()


def test_restart_reimports_and_old_data_still_decrypts(kit, release, tmp_path):
    cfg = kms_config(kit, tmp_path, release.output_dir)
    first = Kms(cfg, pin=kit.regionals["eu"].user_pin)
    first.start()
    first.create_tenant("persist", "production")
    first.generate_secret("persist")
    blob = FieldEncryptor(first).encrypt("persist", b"kept across restarts")
    first.close()
    again = Kms(cfg, pin=kit.regionals["eu"].user_pin)
    again.start()
    try:
        assert FieldEncryptor(again).decrypt("persist", blob) == b"kept across restarts"
    finally:
        again.close()


def test_cli_import_status_and_errors(kit, release, tmp_path):
    cfg = kms_config(kit, tmp_path, release.output_dir)
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", cfg.path, *args, env=env)
    assert kms("init").returncode == 0
    proc = kms("import")
    assert proc.returncode == 0 and f"imported release {release.release}" in proc.stdout
    proc = kms("tenant", "create", "--org", "cli-org", "--type", "sandbox")
    assert proc.returncode == 0, proc.stderr
    enc = kms("encrypt", "--org", "cli-org", "hello")
    assert enc.returncode == 0
    dec = kms("decrypt", "--org", "cli-org", enc.stdout.strip())
    assert dec.stdout.strip() == "hello"
    proc = kms("decrypt", "--org", "no-such-org", enc.stdout.strip())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    env["HSM_PIN"] = "wrong-pin"
    proc = kms("status")
    assert proc.returncode == 2 and "CKR_PIN_INCORRECT" in proc.stderr
    assert "wrong-pin" not in proc.stderr and kit.regionals["eu"].user_pin.reveal() not in \
        proc.stderr


def test_cli_bad_input_gets_one_line_and_leaves_nothing_behind(kit, release, tmp_path):
    from hsm.core.pin import token_env
    cfg = kms_config(kit, tmp_path, release.output_dir)
    eu = kit.regionals["eu"]
    # The per-token PIN variable alone is enough (no HSM_PIN): HSM_PIN_<LABEL>.
    env = {k: v for k, v in kit.environ().items() if not k.startswith("HSM_")}
    env[token_env("HSM_PIN", eu.label)] = eu.user_pin.reveal()

    def kms(*args, config=cfg.path):
        return run_cli("kms", "--config", config, *args, env=env)

    def one_line(proc, needle):
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert needle in proc.stderr, proc.stderr
    imported = kms("import")
    assert imported.returncode == 0, imported.stderr
    # Another region's bundle and the escrow bundle are reported, not silently skipped.
    assert "skipped bundle-" in imported.stdout and "for region 'us'" in imported.stdout
    assert "the escrow bundle" in imported.stdout
    assert kms("tenant", "create", "--org", "bad-input").returncode == 0
    one_line(kms("decrypt", "--org", "bad-input", "%%% not base64 %%%"), "not base64")
    one_line(kms("tenant", "export", "--org", "bad-input"), "needs --file")
    one_line(kms("tenant", "destroy", "--org", "bad-input"), "needs --version")
    # A bundle directory that does not exist: said so, exit non-zero.
    (tmp_path / "m").mkdir()
    missing = kms_config(kit, tmp_path / "m", tmp_path / "no-such-dir")
    one_line(kms("import", config=missing.path), "does not exist")
    # cache_max_entries = 0 is refused before any store is created.
    zero_dir = tmp_path / "zero"
    zero_dir.mkdir()
    text = cfg.path.read_text().replace(str(tmp_path / "kms-eu.db"), str(zero_dir / "z.db"))
    (zero_dir / "z.toml").write_text("cache_max_entries = 0\n" + text)  # a top-level key
    one_line(kms("status", config=zero_dir / "z.toml"), "cache_max_entries must be >= 1")
    assert not (zero_dir / "z.db").exists()


def test_import_refused_is_a_kms_error(kit, tmp_path):
    """A node whose bundle directory is missing refuses to start with ImportRefused, and a
    caller handling KMS errors catches it as one (whatever KmsError's own base is)."""
    node = Kms(kms_config(kit, tmp_path, tmp_path / "no-such-dir"),
               pin=kit.regionals["eu"].user_pin)
    try:
        with pytest.raises(KmsError, match="no-such-dir does not exist") as info:
            node.start()
        assert type(info.value) is ImportRefused
    finally:
        node.close()


def test_no_new_wraps_under_an_older_release_when_a_newer_one_is_missing(node):
    node.create_tenant("late", "production")
    node.store.record_release("99999", "a-later-ceremony", "ab" * 32, node.clock())
    with pytest.raises(ReleaseNotHeld, match="refusing to wrap new secrets"):
        node.generate_secret("late")
    # Nor is a new tenant created (it could get no first secret): no org row is left behind.
    with pytest.raises(ReleaseNotHeld):
        node.create_tenant("later", "production")
    assert "later" not in [org for org, _ in node.store.orgs()]


def test_node_reimports_after_its_sessions_are_closed_behind_its_back(node):
    node.create_tenant("survivor", "production")
    node.generate_secret("survivor")
    sdk = FieldEncryptor(node)
    blob = sdk.encrypt("survivor", b"still here")
    node.cache.flush()
    # Someone closes every session of the application: the login and all session objects
    # (release secrets, cache master) are gone.
    assert node.token.module.raw.close_all_sessions(node.token.slot_id) == 0
    assert sdk.decrypt("survivor", blob) == b"still here"
    assert sdk.decrypt("survivor", sdk.encrypt("survivor", b"new")) == b"new"


def test_hit_path_keeps_its_row_until_any_other_connection_writes(node, kit):
    """The hit path reads nothing from the store while SQLite's data_version stands still, and
    sees a destroy made by another process and a database writer's edit in every lookup made
    rowcache.STAMP_REUSE (1 ms) after them (kms.node.rowcache: the org's head is read again)."""
    node.create_tenant("rows", "production")
    node.generate_secret("rows")
    version, _, dek = node.dek_for_encrypt("rows")
    assert node.dek_for_decrypt("rows", "field", version) == dek
    reads = node.rows.reads
    for _ in range(20):
        assert node.dek_for_encrypt("rows")[2] == dek
        assert node.dek_for_decrypt("rows", "field", version) == dek
    assert node.rows.reads == reads            # forty answers, no store read
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}
    proc = run_cli("kms", "--config", node.config.path, "tenant", "destroy", "--org", "rows",
                   "--version", version, env=env)      # another process, another connection
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(KeyDestroyed):          # the next request (the CLI took over 1 ms)
        node.dek_for_decrypt("rows", "field", version)
    with pytest.raises(KmsError, match="no usable field secret"):
        node.dek_for_encrypt("rows")
    # a database writer's edit is a write too: the next request reads the org's head again
    node.create_tenant("rows2", "production")
    node.generate_secret("rows2")
    assert node.dek_for_decrypt("rows2", "field", 1)
    assert node.dek_for_decrypt("rows2", "field", 1)
    reads = node.rows.reads
    _delete_row(node, "rows2", 1)              # behind the node's back (its sealed view decides)
    time.sleep(rowcache.STAMP_REUSE)           # the bound: a lookup 1 ms after the edit sees it
    try:
        node.dek_for_decrypt("rows2", "field", 1)
    except KmsError:
        pass
    assert node.rows.reads == reads + 1


def test_cli_lookalikes_of_bundles_orgs_and_outputs_are_refused_in_one_line(kit, release,
                                                                            tmp_path):
    """A FIFO and a link to /dev/zero named like bundles are refused (they once hung the
    import); look-alike org ids are refused; `tenant create --source ekm` and `tenant import
    --org` with another org's backup refuse and make nothing; an unwritable backup path is one
    line."""
    import os

    from tests.helpers import small_filesystem
    bundles = tmp_path / "bundles"
    shutil.copytree(release.output_dir, bundles)
    os.mkfifo(bundles / "bundle-9999-eu.p7")
    (bundles / "bundle-9998-eu.p7").symlink_to("/dev/zero")
    cfg = kms_config(kit, tmp_path, bundles)
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", cfg.path, *args, env=env, timeout=60)

    def one_line(proc, *needles):
        err = proc.stderr.strip()
        assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        for needle in needles:
            assert needle in err, (needle, err)
    imported = kms("import")
    assert imported.returncode == 4, imported.stderr  # 4: some bundles were refused
    assert f"imported release {release.release}" in imported.stdout
    for name in ("bundle-9999-eu.p7", "bundle-9998-eu.p7"):
        assert f"{name}: " in imported.stdout and "not a regular file" in imported.stdout
    for bad in (" acme", "acme ", "ac\u200bme", "acme\u2028", "ac\x07me"):
        one_line(kms("tenant", "create", "--org", bad), "org id")
    assert kms("tenant", "create", "--org", "ekm-org", "--source", "ekm").returncode == 2
    assert "ekm-org" not in kms("status").stdout
    for org in ("kept", "other"):
        assert kms("tenant", "create", "--org", org).returncode == 0
    backup = tmp_path / "kept.backup"
    assert kms("tenant", "export", "--org", "kept", "--file", backup).returncode == 0
    one_line(kms("tenant", "import", "--org", "other", "--file", backup),
             "is of org 'kept', not --org 'other'", "nothing was imported")
    with small_filesystem(tmp_path / "ro", read_only=True) as ro:
        one_line(kms("tenant", "export", "--org", "kept", "--file", ro / "b.json"),
                 "Read-only file system")


def test_cli_customer_key_registrations_are_checked_before_anything_is_registered(
        kit, release, tmp_path):
    """`cache-only add` once registered a missing --ca file, port 99999 or a URL with a password
    (echoing it) as the org's ACTIVE key, using up its rate limit; `ekm add` took http://, a
    missing CA bundle and a region the ARN contradicts. Each is one line; nothing registered."""
    cfg = kms_config(kit, tmp_path, release.output_dir)
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", cfg.path, *args, env=env, timeout=60)
    assert kms("tenant", "create", "--org", "reg-co", "--no-secret").returncode == 0
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    add = ("cache-only", "add", "--org", "reg-co", "--kid", "k1")
    arn = "arn:aws:kms:eu-west-1:123456789012:key/0123abcd-12ab-34cd-56ef-1234567890ab"
    cases = [
        ((*add, "--url", "https://127.0.0.1:8443", "--ca", tmp_path / "no-ca.pem"),
         "--ca", "is not a file"),
        ((*add, "--url", "https://127.0.0.1:99999", "--ca", ca), "port outside 1-65535"),
        ((*add, "--url", "https://alice:s3cret-pw@127.0.0.1:8443", "--ca", ca),
         "carries a user or password"),
        (("ekm", "add", "--org", "reg-co", "--key-id", arn, "--endpoint-url",
          "http://127.0.0.1:4566"), "must be an https:// URL"),
        (("ekm", "add", "--org", "reg-co", "--key-id", arn, "--endpoint-url",
          "https://127.0.0.1:4566", "--ca-bundle", tmp_path / "none.pem"), "--ca-bundle"),
        (("ekm", "add", "--org", "reg-co", "--key-id", arn, "--aws-region", "us-east-1"),
         "contradicts the key ARN's region eu-west-1"),
    ]
    for args, *needles in cases:
        proc = kms(*args)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, (args, err)
        assert "Traceback" not in err and "s3cret-pw" not in err + proc.stdout, err
        for needle in needles:
            assert needle in err, (needle, err)
    listed = kms("tenant", "list", "--org", "reg-co")
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed.stdout


def test_cli_destroying_the_only_active_key_warns_and_encrypt_names_when_a_new_one_can_be_made(
        kit, release, tmp_path):
    cfg = kms_config(kit, tmp_path, release.output_dir)
    env = {**kit.environ(), "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", cfg.path, *args, env=env, timeout=60)
    assert kms("tenant", "create", "--org", "last-key").returncode == 0
    destroyed = kms("tenant", "destroy", "--org", "last-key", "--version", "1")
    assert destroyed.returncode == 0, destroyed.stderr
    warning = destroyed.stderr.strip()
    assert warning.startswith("kms: warning: last-key has no ACTIVE field key now"), warning
    assert "(the rate limit)" in warning and "kms tenant rotate --org last-key" in warning
    refused = kms("encrypt", "--org", "last-key", "text")
    err = refused.stderr.strip()
    assert refused.returncode == 2 and len(err.splitlines()) == 1, err
    assert "has no usable field secret" in err and "a new key can be made from 20" in err, err
    # What the hint says is what the rate limit says.
    rotate = kms("tenant", "rotate", "--org", "last-key")
    assert rotate.returncode == 2 and "next allowed at" in rotate.stderr
    when = err.split("a new key can be made from ", 1)[1].split(" ", 1)[0]
    assert when[:16] in rotate.stderr.replace("Z", "+00:00"), (when, rotate.stderr)


def test_cli_a_missing_token_is_said_to_be_missing_before_any_pin_is_asked(kit, release,
                                                                           tmp_path):
    cfg = kms_config(kit, tmp_path, release.output_dir)
    cfg.path.write_text(cfg.path.read_text().replace(kit.regionals["eu"].label, "no-such-token"))
    env = {k: v for k, v in kit.environ().items() if not k.startswith("HSM_")}
    proc = run_cli("kms", "--config", cfg.path, "status", env=env, timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no token with label='no-such-token'" in err and "PIN" not in err, err


def test_hit_only_lookups_answer_as_the_full_path_or_not_at_all(node):
    """What the server answers on its event loop: the full path's answer while it needs neither
    the HSM nor the store, else None (and the full path, on the pool, says what is wrong)."""
    node.create_tenant("hits", "production")
    node.generate_secret("hits")
    assert node.cached_dek_for_encrypt("hits") is None          # nothing served yet
    version, derivation, dek = node.dek_for_encrypt("hits")
    reads = node.rows.reads
    assert node.cached_dek_for_encrypt("hits") == (version, derivation, dek)
    assert node.cached_dek_for_decrypt("hits", "field", version) == dek
    assert node.rows.reads == reads                             # no store read
    assert node.cached_dek_for_encrypt("hits", "field", "another fragment") is None
    assert node.cached_dek_for_decrypt("hits", "field", version, "another fragment") is None
    node.destroy("hits", "field", version)
    assert node.cached_dek_for_encrypt("hits") is None
    assert node.cached_dek_for_decrypt("hits", "field", version) is None
    with pytest.raises(KeyDestroyed):
        node.dek_for_decrypt("hits", "field", version)


def test_every_change_the_node_commits_is_announced_by_the_node(node):
    """One place announces to the other nodes (Kms.announce), after the local cache dropped
    the entries: each rotation and a destroy."""
    heard = []
    node.announce = lambda *change: heard.append(change)
    node.create_tenant("told", "production")
    row = node.generate_secret("told")
    node.test_clock.now += DAY + 1
    node.generate_secret("told")
    node.destroy("told", "field", row.version)
    assert heard == [("rotate", "told", "field", None), ("rotate", "told", "field", None),
                     ("destroy", "told", "field", row.version)]


def test_a_lost_login_is_noted_by_the_token_hook_and_reading_releases_changes_nothing(node):
    node.create_tenant("hooked", "production")
    node.generate_secret("hooked")
    version, _, dek = node.dek_for_encrypt("hooked")
    report = node.report
    assert node.token.module.raw.close_all_sessions(node.token.slot_id) == 0
    assert list(node.releases) == list(report.held) and node.report is report   # a read
    node.cache.flush()
    assert node.dek_for_decrypt("hooked", "field", version) == dek
    assert node.report is not report     # the token's hook said so; the node imported again
