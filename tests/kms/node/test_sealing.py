"""The database writer against the sealed org state (issue 16), on real tokens, real SQLite and
real PostgreSQL: every edit is refused naming the org, the version and what differs; an older
copy of rows or of the whole database yields nothing once its key-encryption key (KEK) is gone;
SIGKILL at each step of a key replacement leaves the old state or the new; two processes rotating
at once make one new state; node B notices a KEK node A destroyed; a store made by the previous
code is sealed in place at start and serves every DEK unchanged.

The writer recomputes every row checksum (a checksum is keyless), so each edit meets the seal,
not the checksum. A running node serves the state it verified and reloads when the org's
generation or seal changes; ``_reload`` stands for its next verification (a restart, a
generation change, or its next start)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsm.keys import orgkek
from kms.customer_keys import ekm
from kms.node import sealing
from kms.errors import (CorruptRecord, KeyDestroyed, KmsError,
                        RolledBack)
from kms.key_rules import DAY, HOUR
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms
from kms.store.records import checksum, secret_checksum, secret_from_db, SECRET_COLUMNS
from tests.ceremony_kit import kit_fixture
from tests.kms.store.test_repository import raw
from tests.kms_kit import Clock, kms_config

kit = kit_fixture("sealing", regions=("eu",))
LEGACY_COMMIT = "ab23631"   # main before issue 16: the code that made the stores to upgrade


@pytest.fixture(scope="module")
def release(kit):
    return kit.run_release()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/kms-eu.db"
        return
    server = request.getfixturevalue("postgresql_server")
    u = server.create_database()
    yield u
    server.drop_database(u)


def _node(kit, release, tmp_path, url, clock=None) -> Kms:
    cfg = kms_config(kit, tmp_path, release.output_dir, store=url)
    node = Kms(cfg, pin=kit.regionals["eu"].user_pin, clock=clock or Clock())
    node.start()
    return node


@pytest.fixture
def node(kit, release, tmp_path, url):
    n = _node(kit, release, tmp_path, url)
    yield n
    n.close()


def _reload(node: Kms) -> None:
    node._views.clear()
    node.cache.flush()


def _rows(url: str, org: str) -> dict:
    """Everything the store holds for the org (what a backup or replica holds)."""
    return {"orgs": raw(url, "SELECT org_id, org_type, created_at, checksum, generation, "
                             "sealed_state, seal FROM orgs WHERE org_id = ?", (org,)),
            "tenant_secrets": raw(url, f"SELECT {SECRET_COLUMNS} FROM tenant_secrets "
                                       "WHERE org_id = ?", (org,)),
            "customer_keys": raw(url, "SELECT org_id, kind, spec, created_at, checksum FROM "
                                      "customer_keys WHERE org_id = ?", (org,)),
            "byok_uploads": raw(url, "SELECT org_id, ciphertext_sha256, uploaded_at, checksum "
                                     "FROM byok_uploads WHERE org_id = ?", (org,))}


_COLUMNS = {"orgs": "org_id, org_type, created_at, checksum, generation, sealed_state, seal",
            "tenant_secrets": SECRET_COLUMNS,
            "customer_keys": "org_id, kind, spec, created_at, checksum",
            "byok_uploads": "org_id, ciphertext_sha256, uploaded_at, checksum"}


def _restore(url: str, org: str, saved: dict) -> None:
    """The writer puts an older copy of the org's rows back, complete and authentic."""
    for table in ("byok_uploads", "customer_keys", "tenant_secrets"):
        raw(url, f"DELETE FROM {table} WHERE org_id = ?", (org,))
    raw(url, "DELETE FROM orgs WHERE org_id = ?", (org,))
    for table in ("orgs", "tenant_secrets", "customer_keys", "byok_uploads"):
        cols = _COLUMNS[table]
        marks = ", ".join("?" * len(cols.split(",")))
        for row in saved[table]:
            raw(url, f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row))


def _put_secret(url: str, row) -> None:
    """The writer rewrites one secret row, checksum recomputed."""
    raw(url, "UPDATE tenant_secrets SET state = ?, wrapped = ?, created_at = ?, destroyed_at = ?, "
             "checksum = ? WHERE org_id = ? AND key_type = ? AND version = ?",
        (row.state, row.wrapped, row.created_at, row.destroyed_at, secret_checksum(row),
         row.org_id, row.key_type, row.version))


def _secret(url: str, org: str, version: int, key_type: str = "field"):
    return secret_from_db([bytes(v) if isinstance(v, memoryview) else v for v in raw(
        url, f"SELECT {SECRET_COLUMNS} FROM tenant_secrets WHERE org_id = ? AND key_type = ? "
             "AND version = ?", (org, key_type, version))[0]])


def _two_versions(node: Kms, org: str) -> tuple:
    node.create_tenant(org, "production")
    v1 = node.generate_secret(org)
    blob = FieldEncryptor(node).encrypt(org, b"under v1")
    node.clock.now += DAY
    v2 = node.generate_secret(org)
    return v1, v2, blob


def _keks(node: Kms, org: str) -> list[int]:
    """The KEK generations of the org the token holds, by one fresh search."""
    out = []
    for label in orgkek.find_all(node.token).values():
        parsed = sealing.parse_label(label)
        if parsed and parsed[0] == node._seals().keks.store_id and parsed[2] == org:
            out.append(parsed[1])
    return sorted(out)


# ----------------------------------------------------------------------------- the writer
def test_a_destroyed_version_put_back_as_archived_yields_nothing(node, url):
    """The demo's attack: v1's wrapped blob from an older copy of its row, put back ARCHIVED."""
    v1, v2, blob = _two_versions(node, "shred")
    old_row = _secret(url, "shred", 1)            # a copy made before the destroy
    old_generation = node.store.org_head("shred")[0]
    node.destroy("shred", "field", 1)
    assert _keks(node, "shred") == [old_generation + 1]     # the old KEK is gone from the token
    _put_secret(url, old_row)
    _reload(node)
    with pytest.raises(CorruptRecord, match=r"org 'shred': the store does not match the state "
                       r"sealed in the HSM \(generation \d+\): field v1: state is 'ARCHIVED' in "
                       r"the store, 'DESTROYED' in the sealed state") as info:
        node.dek_for_decrypt("shred", "field", 1)
    assert ("tenant_secrets", "shred", "field", 1) in info.value.records
    # Even a PIN holder cannot open the old blob: its KEK is not in the token any more.
    label = node._seals().keks.label("shred", old_generation)
    assert orgkek.find(node.token, label) is None


def test_the_ekm_endpoint_or_arn_edited_is_refused_and_nothing_is_sent(node, url, tmp_path):
    from tests import localtls
    pki = localtls.make_pki(tmp_path / "pki")
    node.create_tenant("ekm-org", "production")
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    ekm.register(node, "ekm-org", arn, endpoint_url="https://127.0.0.1:1", ca_bundle=str(pki.ca))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    evil = f"https://127.0.0.1:{listener.getsockname()[1]}"
    ((spec, created),) = [(s, c) for _, _, s, c, _ in _rows(url, "ekm-org")["customer_keys"]]
    for field_, value, what in (("endpoint_url", evil, "endpoint_url"),
                                ("key_id", arn.replace("1234abcd", "9999abcd"), "key_id"),
                                ("ca_pem", "-----BEGIN CERTIFICATE-----\nevil", "ca_pem")):
        edited = json.dumps({**json.loads(spec), field_: value}, sort_keys=True)
        raw(url, "UPDATE customer_keys SET spec = ?, checksum = ? WHERE org_id = ?",
            (edited, checksum("customer_keys", ("ekm-org", "ekm", edited, created)), "ekm-org"))
        _reload(node)
        with pytest.raises(CorruptRecord, match=f"org 'ekm-org': .*the ekm registration's "
                                                f"{what} differ"):
            ekm.dek(node, _fake_row("ekm-org"), {"kind": "ekm", "key_id": arn, "blob": ""})
    with pytest.raises(BlockingIOError):
        listener.accept()        # no connection ever reached the writer's endpoint
    listener.close()


def _fake_row(org):
    from kms.store.records import SecretRow
    return SecretRow(org, "field", 1, "ACTIVE", "REMOTE", "NONE", "1", b"x", 0, 0.0, 0.0, None)


def test_the_ca_bundle_file_rewritten_after_registration_changes_nothing(node, tmp_path):
    from tests import localtls
    pki = localtls.make_pki(tmp_path / "pki")
    node.create_tenant("ca-org", "production")
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    original = Path(pki.ca).read_text()
    ekm.register(node, "ca-org", arn, endpoint_url="https://127.0.0.1:1", ca_bundle=str(pki.ca))
    Path(pki.ca).write_text("-----BEGIN CERTIFICATE-----\nthe writer's CA\n")
    assert node.customer_key("ca-org", "ekm")["ca_pem"] == original   # what _aws verifies with


def test_deleting_the_newest_tombstone_does_not_revive_the_older_version(node, url):
    _two_versions(node, "tomb")
    node.destroy("tomb", "field", 2)
    with pytest.raises(KmsError, match="no usable field secret"):
        node.dek_for_encrypt("tomb")
    raw(url, "DELETE FROM tenant_secrets WHERE org_id = 'tomb' AND version = 2")
    _reload(node)
    with pytest.raises(CorruptRecord, match=r"field v2: its row is missing from the store \(the "
                                            r"sealed state has it DESTROYED\)"):
        node.dek_for_encrypt("tomb")


def test_flipping_which_version_is_current_is_refused(node, url):
    _two_versions(node, "flip")
    v1, v2 = _secret(url, "flip", 1), _secret(url, "flip", 2)
    raw(url, "DELETE FROM tenant_secrets WHERE org_id = 'flip' AND version = 2")
    _put_secret(url, dataclasses.replace(v1, state="ACTIVE"))
    raw(url, f"INSERT INTO tenant_secrets ({SECRET_COLUMNS}) VALUES "
             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*dataclasses.replace(v2, state="ARCHIVED").values(),
         secret_checksum(dataclasses.replace(v2, state="ARCHIVED"))))
    _reload(node)
    with pytest.raises(CorruptRecord, match=r"field v1: state is 'ACTIVE' in the store, "
                                            r"'ARCHIVED' in the sealed state; field v2: state is "
                                            r"'ARCHIVED' in the store, 'ACTIVE'"):
        node.dek_for_encrypt("flip")


def test_restoring_an_orgs_older_rows_rolls_nothing_back(node, url):
    v1, _v2, blob = _two_versions(node, "roll")
    node.clock.now -= DAY
    saved = _rows(url, "roll")                   # complete and authentic, before the rotation
    node.clock.now += 2 * DAY
    node.generate_secret("roll")
    _restore(url, "roll", saved)
    _reload(node)
    generation = saved["orgs"][0][4]
    with pytest.raises(RolledBack, match=f"org 'roll': the store holds its state of generation "
                       f"{generation}, whose key-encryption key the HSM no longer holds "
                       f"\\(it holds generation {generation + 1}\\)"):
        node.dek_for_encrypt("roll")
    with pytest.raises(RolledBack):
        FieldEncryptor(node).decrypt("roll", blob)
    with pytest.raises(RolledBack):          # and no write builds on the rolled-back rows
        node.generate_secret("roll")


def test_back_dating_created_at_lifts_no_limit(node, url):
    _two_versions(node, "dated")
    v2 = _secret(url, "dated", 2)
    _put_secret(url, dataclasses.replace(v2, created_at=v2.created_at - 2 * DAY))
    _reload(node)
    with pytest.raises(CorruptRecord, match=r"field v2: created_at is .* in the store, .* in the "
                                            r"sealed state"):
        node.generate_secret("dated")            # the 24 h interval is not lifted
    with pytest.raises(CorruptRecord, match="field v2: created_at"):
        node.dek_for_encrypt("dated")


def test_deleting_an_upload_record_does_not_let_the_upload_be_replayed(node, url):
    node.create_tenant("byok", "production")
    sha = "ab" * 32
    node.upload_secret("byok", "field", os.urandom(32), upload_sha256=sha)
    raw(url, "DELETE FROM byok_uploads WHERE org_id = 'byok'")
    _reload(node)
    node.clock.now += 2 * DAY
    with pytest.raises(CorruptRecord, match=r"the BYOK upload record abababababababab\.\.\. is "
                                            "missing from the store"):
        node.upload_secret("byok", "field", os.urandom(32), upload_sha256=sha)


def test_clearing_an_orgs_seal_is_not_an_upgrade(node, url, kit, release, tmp_path):
    node.create_tenant("unsealed", "production")
    node.generate_secret("unsealed")
    raw(url, "UPDATE orgs SET generation = NULL, sealed_state = NULL, seal = NULL "
             "WHERE org_id = 'unsealed'")
    second = _node(kit, release, tmp_path, url)
    try:
        assert any("org 'unsealed': not sealed in the store, but the HSM holds a key-encryption "
                   "key for it" in line for line in second.report.lines())
        with pytest.raises(CorruptRecord, match="org 'unsealed' is not sealed in the HSM"):
            second.dek_for_encrypt("unsealed")
    finally:
        second.close()


# ----------------------------------------------------------------------------- whole database
def test_a_whole_database_restored_from_before_a_destroy_yields_nothing(kit, release, tmp_path,
                                                                         url):
    clock = Clock()
    node = _node(kit, release, tmp_path, url, clock)
    try:
        _v1, _v2, blob = _two_versions(node, "full")
        tables = ("orgs", "tenant_secrets", "customer_keys", "byok_uploads", "releases")
        every = {t: raw(url, f"SELECT * FROM {t}") for t in tables}    # the backup
        node.destroy("full", "field", 1)
    finally:
        node.close()
    for t in reversed(tables[:4]):
        raw(url, f"DELETE FROM {t}")
    for t in tables[:4]:
        for row in every[t]:
            raw(url, f"INSERT INTO {t} VALUES ({', '.join('?' * len(row))})", tuple(row))
    restored = _node(kit, release, tmp_path, url, clock)
    try:
        assert any("the store was rolled back" in line for line in restored.report.lines())
        with pytest.raises(RolledBack, match="org 'full'"):
            FieldEncryptor(restored).decrypt("full", blob)
        with pytest.raises(RolledBack):
            restored.dek_for_decrypt("full", "field", 1)
    finally:
        restored.close()


# ----------------------------------------------------------------------------- processes
_NODE = textwrap.dedent("""
    import json, os, sys, time
    from kms.node import config as configs
    from kms.node.node import Kms
    from hsm.core.pin import Pin
    from tests.kms_kit import Clock
    spec = json.loads(sys.argv[1])
    clock = Clock()
    clock.now = spec["now"]
    node = Kms(configs.load(spec["config"]), pin=Pin(os.environ["NODE_PIN"]), clock=clock)
    node.start()
    if spec["op"] == "rotate":
        if "go" in spec:
            print("started", flush=True)
            while not os.path.exists(spec["go"]):
                time.sleep(0.005)
        try:
            print(json.dumps({"version": node.rotate(spec["org"]).version}), flush=True)
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__}), flush=True)
    elif spec["op"] == "serve":
        print("ready", flush=True)
        for line in sys.stdin:
            org, version = line.split()
            t0 = time.perf_counter()
            try:
                node.dek_for_decrypt(org, "field", int(version))
                out = "ok"
            except Exception as exc:
                out = type(exc).__name__
            print(out, time.perf_counter() - t0, flush=True)
    node.close()
""")


def _spawn(kit, node: Kms, op: str, **spec) -> subprocess.Popen:
    env = {**os.environ, **kit.regionals["eu"].env, "NODE_PIN": kit.regionals["eu"].user_pin.reveal(),
           "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    env.update(spec.pop("env", {}))
    arg = json.dumps({"op": op, "config": str(node.config.path), "now": node.clock(), **spec})
    return subprocess.Popen([sys.executable, "-c", _NODE, arg], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("step", ["seal:new-kek", "reseal:updated", "commit", "committed",
                                  "seal:old-kek-destroyed"])
def test_sigkill_at_each_step_leaves_the_old_state_or_the_new(kit, release, tmp_path, step):
    url = f"sqlite:///{tmp_path}/kms-eu.db"
    node = _node(kit, release, tmp_path, url)
    try:
        node.create_tenant("crash", "sandbox")
        node.generate_secret("crash")
        blob = FieldEncryptor(node).encrypt("crash", b"before")
        before = node.store.org_head("crash")[0]
        node.clock.now += 5 * HOUR
        p = _spawn(kit, node, "rotate", org="crash",
                   env={"KMS_STORE_TEST_KILL_AT": step})
        p.communicate(timeout=120)
        assert p.returncode == -9
    finally:
        node.close()
    after = _node(kit, release, tmp_path, url)
    try:
        generation = after.store.org_head("crash")[0]
        new_state = step in ("committed", "seal:old-kek-destroyed")
        assert generation == (before + 1 if new_state else before)
        assert [r.version for r in after.secrets("crash")] == ([1, 2] if new_state else [1])
        assert _keks(after, "crash") == [generation]      # the sweep left only the committed KEK
        assert FieldEncryptor(after).decrypt("crash", blob) == b"before"
    finally:
        after.close()


def test_two_processes_rotating_one_org_make_one_new_state(kit, release, tmp_path, url):
    node = _node(kit, release, tmp_path, url)
    try:
        node.create_tenant("race", "sandbox")
        node.generate_secret("race")
        before = node.store.org_head("race")[0]
        node.clock.now += 5 * HOUR
        go = tmp_path / "go"
        procs = []
        for _ in range(2):      # started one after the other: SoftHSM2 2.6.1 may skip a token
            procs.append(_spawn(kit, node, "rotate", org="race", go=str(go)))  # another
            assert procs[-1].stdout.readline().strip() == "started"          # process holds
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
        results = sorted(json.loads(out.splitlines()[-1]).get("error", "ok") for out, _ in outs)
        assert results == ["RateLimited", "ok"]
        assert node.store.org_head("race")[0] == before + 1
        _reload(node)
        assert [r.version for r in node.secrets("race")] == [1, 2]
        assert _keks(node, "race") == [before + 1]
    finally:
        node.close()


def test_node_b_notices_a_key_node_a_destroyed_at_its_next_request(kit, release, tmp_path, url):
    """B serves v1 from its cache; A destroys v1 (a new KEK, the old one destroyed); B's next
    request reads the org's new generation and refuses v1. Then the writer rolls the org's rows
    back to a state B had verified: B's re-check in the token (at most RECHECK_S later) finds
    that state's KEK gone and refuses it too."""
    node = _node(kit, release, tmp_path, url)
    b = None
    try:
        _two_versions(node, "multi")
        saved = _rows(url, "multi")
        b = _spawn(kit, node, "serve")
        assert b.stdout.readline().strip() == "ready"

        def ask(version: int) -> str:
            b.stdin.write(f"multi {version}\n")
            b.stdin.flush()
            return b.stdout.readline().split()[0]
        assert ask(1) == "ok" and ask(1) == "ok"          # a miss, then a hit
        node.destroy("multi", "field", 1)
        assert ask(1) == "KeyDestroyed"
        assert ask(2) == "ok"
        _restore(url, "multi", saved)                     # the state B verified before
        time.sleep(sealing.RECHECK_S)
        assert ask(2) == "RolledBack"
    finally:
        if b is not None:
            b.stdin.close()
            b.wait(timeout=60)
        node.close()


# ----------------------------------------------------------------------------- upgrade
# Runs the previous code (LEGACY_COMMIT), so it names that code's module paths.
_LEGACY = textwrap.dedent("""
    import json, os, sys
    from kms import config as configs
    from kms.service import Kms
    from kms.sdk import FieldEncryptor
    from hsm.pin import Pin
    from tests.kms_kit import Clock
    spec = json.loads(sys.argv[1])
    clock = Clock()
    node = Kms(configs.load(spec["config"]), pin=Pin(os.environ["NODE_PIN"]), clock=clock)
    node.start()
    out = {}
    for org in ("old-a", "old-b"):
        node.create_tenant(org, "production")
        node.generate_secret(org)
        out[org] = {"blob": FieldEncryptor(node).encrypt(org, b"kept").hex(),
                    "dek1": node.dek_for_decrypt(org, "field", 1).hex()}
    clock.now += 2 * 86400
    node.generate_secret("old-a")
    node.destroy("old-a", "field", 1)
    out["old-a"]["dek2"] = node.dek_for_decrypt("old-a", "field", 2).hex()
    node.close()
    print(json.dumps(out))
""")


def countersign_bundle(kit, path: Path, officers) -> None:
    from ceremony.officers import FileSigner
    from release import bundle as bundles
    from release import signers
    from release.certificates import as_asn1, load as load_cert
    cert = as_asn1(load_cert(kit.primary_cert, "primary signing"))
    for name in officers:
        signer = FileSigner(kit.officer_keys[name])
        path.write_bytes(bundles.countersign(path.read_bytes(), cert, signer,
                                             signers.certificate(signer, name)))


def test_a_store_made_by_the_previous_code_is_sealed_at_start_and_serves_the_same_deks(
        kit, release, tmp_path):
    repo = Path(__file__).resolve().parents[3]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", LEGACY_COMMIT, "kms", "hsm",
                              "release", "tests/kms_kit.py", "tests/__init__.py"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the previous code ({LEGACY_COMMIT}) is not in this clone's history "
                    "(a shallow clone)")
    subprocess.run(["tar", "-x", "-C", str(legacy)], input=archive.stdout, check=True)
    url = f"sqlite:///{tmp_path}/kms-eu.db"
    # The previous code reads bundles of its own format (a version-1 manifest, the primary's
    # signature only) and a configuration without [[officers]]; officers countersign the
    # bundle afterwards, as the upgrade says (docs/ceremony-quorum.md).
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    bundle = bundles / f"bundle-{release.release}-eu.p7"
    bundle.write_bytes(kit.previous_format_bundle(release, "eu"))
    cfg = kms_config(kit, tmp_path, bundles, store=url)
    legacy_cfg = tmp_path / "legacy-kms-eu.toml"
    legacy_cfg.write_text(cfg.path.read_text().split("\n[[officers]]")[0])
    env = {**os.environ, **kit.regionals["eu"].env, "PYTHONPATH": str(legacy),
           "NODE_PIN": kit.regionals["eu"].user_pin.reveal()}
    made = subprocess.run([sys.executable, "-c", _LEGACY, json.dumps({"config": str(legacy_cfg)})],
                          env=env, capture_output=True, text=True, timeout=300, cwd=legacy)
    assert made.returncode == 0, made.stderr
    countersign_bundle(kit, bundle, ("alice", "bob"))
    before = json.loads(made.stdout.splitlines()[-1])
    clock = Clock()
    clock.now += 2 * DAY
    node = Kms(cfg, pin=kit.regionals["eu"].user_pin, clock=clock)
    node.start()
    try:
        assert "sealed 2 org(s) of a store made before per-org key-encryption keys (a one-time " \
               "upgrade; DEKs are unchanged)" in node.report.lines()
        sdk = FieldEncryptor(node)
        assert sdk.decrypt("old-b", bytes.fromhex(before["old-b"]["blob"])) == b"kept"
        with pytest.raises(KeyDestroyed):       # old-a v1 was destroyed before the upgrade
            sdk.decrypt("old-a", bytes.fromhex(before["old-a"]["blob"]))
        assert node.dek_for_decrypt("old-b", "field", 1).hex() == before["old-b"]["dek1"]
        assert node.dek_for_decrypt("old-a", "field", 2).hex() == before["old-a"]["dek2"]
        with pytest.raises(KeyDestroyed):
            node.dek_for_decrypt("old-a", "field", 1)
        assert _keks(node, "old-a") == [1] and _keks(node, "old-b") == [1]
    finally:
        node.close()
    again = Kms(cfg, pin=kit.regionals["eu"].user_pin, clock=clock)
    again.start()              # a second start seals nothing and says nothing
    try:
        assert not any("sealed" in line for line in again.report.lines())
    finally:
        again.close()
