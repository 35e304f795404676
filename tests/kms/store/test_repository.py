"""The TenantSecret store (kms/store/) on SQLite and on a real PostgreSQL 15 (tests/pg.py).

Every test that takes ``store``/``store_url`` runs on both backends. Beyond the API: rows corrupted
with raw SQL are reported and nothing else is affected; 8 threads x 2 processes lose no update and
let exactly one of many same-instant rate-limited calls through; processes SIGKILLed at every
checkpoint of every write (and inside the wrap callback) leave the old state or the new one;
migrations run once, atomically, and refuse edited or newer schemas; destroyed blobs leave the
SQLite files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest

from kms import key_rules
from kms.errors import (
    CorruptRecord,
    ImportRefused,
    KmsError,
    PolicyViolation,
    RateLimited,
    UnknownTenant,
)
from kms.store import (
    KILL_ENV,
    MIGRATIONS_DIR,
    SECRET_FIELDS,
    SecretRow,
    Store,
    load_migrations,
    utc_iso,
)
from tests.helpers import run_threads

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_800_000_000.0          # 2027-01-15T08:00:00Z
H, D = key_rules.HOUR, key_rules.DAY
SHA = "ab" * 32
MISSING_TABLE = (sqlite3.OperationalError, psycopg.errors.UndefinedTable)


# ----------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/kms.db"
        return
    server = request.getfixturevalue("postgresql_server")
    url = server.create_database()
    yield url
    server.drop_database(url)        # each is ~8 MB; keep the throw-away cluster small


@pytest.fixture
def store(store_url):
    s = Store.open(store_url)
    yield s
    s.close()


def blob(org: str, key_type: str, version: int) -> bytes:
    """A stand-in wrapped secret that names what it was wrapped for (the real one is AES-GCM)."""
    return f"wrapped:{org}:{key_type}:v{version}:".encode() + os.urandom(16)


def add(s: Store, org: str, key_type: str = "field", *, now: float, **kw) -> SecretRow:
    args = dict(source="HSM", derivation="PBKDF2", release="r1", iterations=1000)
    args.update(kw)
    return s.add_secret(org, key_type, now=now, wrap=lambda v: blob(org, key_type, v), **args)


def raw(url: str, sql: str, params=()) -> list:
    """Raw SQL behind the store's back (the corruption the store must detect)."""
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite://"):])) as c:
            rows = c.execute(sql, params).fetchall()
            c.commit()
            return rows
    with psycopg.connect(url, autocommit=True) as c:
        cur = c.execute(sql.replace("?", "%s"), params or None)
        return cur.fetchall() if cur.description else []


# 0001_initial and 0002_customer_keys (issue 9).
N_MIGRATIONS = 3


def by_version(rows):
    return {(r.key_type, r.version): r for r in rows}


# ----------------------------------------------------------------------------- open, schema
def test_open_migrates_once_and_reopens(store_url):
    with Store.open(store_url) as s:
        assert s.schema_version() == len(load_migrations()) == N_MIGRATIONS
    with Store.open(store_url) as s:
        assert s.schema_version() == N_MIGRATIONS
    rows = raw(store_url, "SELECT version, name, sha256 FROM schema_migrations ORDER BY version")
    assert [(v, n) for v, n, _ in rows] == [(1, "initial"), (2, "customer_keys"), (3, "org_seal")]
    assert [r[2] for r in rows] == [m.sha256 for m in load_migrations()]


def test_concurrent_first_open_applies_each_migration_once(store_url):
    stores = run_threads(6, lambda i: Store.open(store_url))  # re-raises any thread's error
    for s in stores:
        s.close()
    assert len(stores) == 6 and all(isinstance(s, Store) for s in stores)
    assert raw(store_url, "SELECT COUNT(*) FROM schema_migrations") == [(N_MIGRATIONS,)]


def test_migration_is_atomic_and_edits_or_newer_schemas_are_refused(store_url, tmp_path):
    mig = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, mig)
    (mig / "0004_broken.sql").write_text(
        "CREATE TABLE extra (x TEXT);\nINSERT INTO extra (x) VALUES ('half');\n"
        "CREATE TABLE broken (;\n")
    with pytest.raises(KmsError, match="0004_broken failed .nothing of it applied"):
        Store.open(store_url, migrations_dir=mig)
    # Migrations 1-3 committed; nothing of migration 4 did.
    assert raw(store_url, "SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,), (3,)]
    with Store.open(store_url) as s:
        assert s.schema_version() == 3
    with pytest.raises(MISSING_TABLE):
        raw(store_url, "SELECT * FROM extra")

    # A fixed migration 4 applies; then the code without it refuses the newer store.
    (mig / "0004_broken.sql").write_text("CREATE TABLE extra (x TEXT);\n")
    with Store.open(store_url, migrations_dir=mig) as s:
        assert s.schema_version() == 4
    with pytest.raises(KmsError, match="newer than this code"):
        Store.open(store_url)
    # Editing an applied migration is detected.
    (mig / "0004_broken.sql").write_text("CREATE TABLE extra (x TEXT, y TEXT);\n")
    with pytest.raises(KmsError, match="0004_broken was changed after it was applied"):
        Store.open(store_url, migrations_dir=mig)


def test_migration_files_are_numbered_without_gaps(tmp_path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(KmsError, match="without gaps"):
        load_migrations(tmp_path)
    (tmp_path / "3_bad.sql").write_text("SELECT 1;")
    with pytest.raises(KmsError, match="NNNN_name.sql"):
        load_migrations(tmp_path)


def test_sqlite_settings_and_file_mode(tmp_path):
    path = tmp_path / "kms.db"
    with Store.open(str(path)) as s, s.db.lease() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert path.stat().st_mode & 0o777 == 0o600


def test_store_urls(tmp_path):
    for url in (str(tmp_path / "a.db"), f"sqlite://{tmp_path}/b.db", tmp_path / "c.db"):
        Store.open(url).close()
    for bad, msg in (("sqlite://relative.db", "must be absolute"), (":memory:", "database file"),
                     ("sqlite:///:memory:", "database file"),
                     ("mysql://x/y", "unsupported store URL"),
                     (str(tmp_path / "missing" / "x.db"), "cannot create")):
        with pytest.raises(KmsError, match=msg):
            Store.open(bad)


def test_closed_store_refuses(store):
    store.close()
    with pytest.raises(KmsError, match="closed"):
        store.orgs()


# ----------------------------------------------------------------------------- orgs
def test_orgs(store):
    store.create_org("zeta-prod", "production")
    store.create_org("acme-sbx", "sandbox")
    store.create_org("dev-1", "developer")
    assert store.orgs() == [("acme-sbx", "sandbox"), ("dev-1", "developer"),
                            ("zeta-prod", "production")]
    assert store.org_type("dev-1") == "developer"
    with pytest.raises(KmsError, match="'acme-sbx' already exists"):
        store.create_org("acme-sbx", "production")
    assert store.org_type("acme-sbx") == "sandbox"
    with pytest.raises(KmsError, match="org type must be one of production, developer, sandbox"):
        store.create_org("x", "enterprise")
    for bad in ("", "a\nb", "x" * 256, None):
        with pytest.raises(KmsError, match="org id"):
            store.create_org(bad, "sandbox")
    with pytest.raises(UnknownTenant, match="no org 'nobody'"):
        store.org_type("nobody")
    for call in (lambda: store.secrets("nobody"), lambda: store.get("nobody", "field", 1),
                 lambda: store.active("nobody", "field", now=T0),
                 lambda: add(store, "nobody", now=T0),
                 lambda: store.destroy_secret("nobody", "field", 1, now=T0),
                 lambda: store.export_rows("nobody"), lambda: store.import_rows("nobody", [])):
        with pytest.raises(UnknownTenant):
            call()


# ----------------------------------------------------------------------------- add_secret
def test_add_secret_versions_states_and_fields(store):
    store.create_org("acme", "production")
    seen = []

    def wrap(v):
        seen.append(v)
        return b"blob-%d" % v
    r1 = store.add_secret("acme", "field", source="UPLOADED", derivation="NONE", release=None,
                          iterations=0, now=T0, wrap=wrap)
    assert r1 == SecretRow("acme", "field", 1, "ACTIVE", "UPLOADED", "NONE", None, b"blob-1", 0,
                           T0, T0, None)
    r2 = store.add_secret("acme", "field", source="HSM", derivation="PBKDF2", release="r7",
                          iterations=120_000, now=T0 + D, wrap=wrap)
    assert seen == [1, 2]
    assert (r2.version, r2.state, r2.release, r2.iterations, r2.wrapped) == \
        (2, "ACTIVE", "r7", 120_000, b"blob-2")
    assert store.get("acme", "field", 1) == dataclasses.replace(r1, state="ARCHIVED")
    assert store.get("acme", "field", 2) == r2
    assert store.secrets("acme") == [store.get("acme", "field", 1), r2]
    assert "blob" not in repr(r2) and "wrapped" not in repr(r2)   # ciphertext stays out of logs
    # Key types have their own versions and their own ACTIVE secret.
    d1 = add(store, "acme", "database", now=T0 + D)
    assert (d1.version, d1.state) == (1, "ACTIVE")
    assert [(r.key_type, r.version, r.state) for r in store.secrets("acme")] == [
        ("database", 1, "ACTIVE"), ("field", 1, "ARCHIVED"), ("field", 2, "ACTIVE")]
    with pytest.raises(KmsError, match="has no field secret v9"):
        store.get("acme", "field", 9)


@pytest.mark.parametrize("bad, msg", [
    (dict(key_type="blob"), "key type"), (dict(source="USB"), "source"),
    (dict(derivation="HKDF"), "derivation"), (dict(iterations=0), "iterations"),
    (dict(iterations=True), "iterations"), (dict(now=float("nan")), "now"),
    (dict(release=""), "release"),
])
def test_add_secret_rejects_bad_input(store, bad, msg):
    store.create_org("acme", "sandbox")
    args = dict(key_type="field", source="HSM", derivation="PBKDF2", release="r1",
                iterations=1000, now=T0)
    args.update(bad)
    kt = args.pop("key_type")
    with pytest.raises(KmsError, match=msg):
        store.add_secret("acme", kt, wrap=lambda v: b"x", **args)
    assert store.secrets("acme") == []


@pytest.mark.parametrize("org_type", key_rules.ORG_TYPES)
def test_rate_limit_per_org_type(store, org_type):
    interval = key_rules.NEW_SECRET_INTERVAL[org_type]
    store.create_org("org", org_type)
    store.create_org("other", org_type)
    add(store, "org", now=T0)
    called = []
    with pytest.raises(RateLimited) as info:
        store.add_secret("org", "field", source="HSM", derivation="PBKDF2", release="r1",
                         iterations=1000, now=T0 + interval - 1,
                         wrap=lambda v: called.append(v) or b"x")
    assert info.value.next_allowed == T0 + interval
    assert f"next allowed at {utc_iso(T0 + interval)}" in str(info.value)
    assert f"{interval / 3600:g} h for {org_type} orgs" in str(info.value)
    assert called == []                                   # refused before wrapping anything
    assert [r.version for r in store.secrets("org")] == [1]
    # Other key types and other orgs are not limited by it; the boundary itself is allowed.
    add(store, "org", "database", now=T0 + 1)
    add(store, "other", now=T0 + 1)
    assert add(store, "org", now=T0 + interval).version == 2


def test_rate_limit_message_names_utc_iso():
    assert utc_iso(T0) == "2027-01-15T08:00:00Z"
    assert utc_iso(T0 + 0.2) == "2027-01-15T08:00:01Z"     # rounded up: never early
    assert "after the Unix epoch" in utc_iso(1e20)


def test_rate_limit_counts_destroyed_and_out_of_order_clocks(store):
    store.create_org("acme", "sandbox")
    add(store, "acme", now=T0)
    store.destroy_secret("acme", "field", 1, now=T0 + 60)
    with pytest.raises(RateLimited):
        add(store, "acme", now=T0 + 2 * H)
    with pytest.raises(RateLimited):                      # a node whose clock is behind
        add(store, "acme", now=T0 - D)
    assert add(store, "acme", now=T0 + 4 * H).version == 2


def test_wrap_failure_or_bad_blob_changes_nothing(store):
    store.create_org("acme", "production")
    r1 = add(store, "acme", now=T0)

    def boom(v):
        raise RuntimeError("HSM unplugged")
    with pytest.raises(RuntimeError, match="HSM unplugged"):
        store.add_secret("acme", "field", source="HSM", derivation="PBKDF2", release="r1",
                         iterations=1000, now=T0 + D, wrap=boom)
    for bad in (b"", "text", None):
        with pytest.raises(KmsError, match="non-empty bytes"):
            store.add_secret("acme", "field", source="HSM", derivation="PBKDF2", release="r1",
                             iterations=1000, now=T0 + D, wrap=lambda v, bad=bad: bad)
    assert store.secrets("acme") == [r1]
    assert add(store, "acme", now=T0 + D).version == 2   # the version was not consumed


def test_wrap_runs_inside_the_transaction(store, store_url):
    store.create_org("acme", "production")
    r1 = add(store, "acme", now=T0)
    other = Store.open(store_url)
    seen = {}

    def wrap(v):
        # Another connection still sees the old state while the new version is being wrapped.
        seen["outside"] = other.secrets("acme")
        with pytest.raises(KmsError, match="from inside one of its own transactions"):
            store.secrets("acme")
        return b"blob-%d" % v
    try:
        store.add_secret("acme", "field", source="HSM", derivation="PBKDF2", release="r1",
                         iterations=1000, now=T0 + D, wrap=wrap)
        assert seen["outside"] == [r1]
        assert [r.state for r in other.secrets("acme")] == ["ARCHIVED", "ACTIVE"]
    finally:
        other.close()


# ----------------------------------------------------------------------------- active / destroy
def test_database_secret_activation_delay(store):
    store.create_org("acme", "production")
    d1 = add(store, "acme", "database", now=T0)
    assert d1.usable_from == T0 + key_rules.DATABASE_ACTIVATION_DELAY
    assert store.active("acme", "database", now=T0) is None
    assert store.active("acme", "database", now=T0 + 24 * H - 1) is None
    assert store.active("acme", "database", now=T0 + 24 * H).version == 1
    d2 = add(store, "acme", "database", now=T0 + 30 * D)
    assert store.get("acme", "database", 1).state == "ARCHIVED"
    # The new ACTIVE one is not used for new DEKs for 24 h: the archived one keeps serving.
    assert store.active("acme", "database", now=T0 + 30 * D).version == 1
    assert store.active("acme", "database", now=d2.usable_from - 1).version == 1
    assert store.active("acme", "database", now=d2.usable_from).version == 2
    # Field secrets are usable at once.
    f1 = add(store, "acme", "field", now=T0)
    assert f1.usable_from == T0 and store.active("acme", "field", now=T0) == f1
    store.create_org("empty", "sandbox")
    assert store.active("empty", "field", now=T0) is None


def test_destroy_field_secret_shreds_and_is_idempotent(store):
    store.create_org("acme", "sandbox")
    r1 = add(store, "acme", now=T0)
    r2 = add(store, "acme", now=T0 + 5 * H)
    d = store.destroy_secret("acme", "field", 1, now=T0 + 5 * H + 1)
    assert (d.state, d.wrapped, d.destroyed_at) == ("DESTROYED", None, T0 + 5 * H + 1)
    assert dataclasses.replace(d, state="ARCHIVED", wrapped=r1.wrapped, destroyed_at=None) == \
        dataclasses.replace(r1, state="ARCHIVED")
    assert store.get("acme", "field", 1) == d
    assert store.destroy_secret("acme", "field", 1, now=T0 + 9 * D) == d     # unchanged
    assert store.active("acme", "field", now=T0 + 6 * H) == r2
    # Field keys can be destroyed at any time, the ACTIVE one included; then none is usable.
    store.destroy_secret("acme", "field", 2, now=T0 + 5 * H + 2)
    assert store.active("acme", "field", now=T0 + 6 * H) is None
    with pytest.raises(KmsError, match="has no field secret v3"):
        store.destroy_secret("acme", "field", 3, now=T0)
    assert len(store.secrets("acme")) == 2


def test_destroy_database_secret_minimum_lifespan(store):
    store.create_org("acme", "developer")
    d1 = add(store, "acme", "database", now=T0)
    earliest = T0 + key_rules.DATABASE_MIN_LIFESPAN
    with pytest.raises(PolicyViolation, match=f"not be destroyed before {utc_iso(earliest)}"):
        store.destroy_secret("acme", "database", 1, now=earliest - 1)
    assert store.get("acme", "database", 1) == d1
    assert store.destroy_secret("acme", "database", 1, now=earliest).state == "DESTROYED"


def test_active_is_the_newest_and_destroying_it_revives_no_older_secret(store):
    store.create_org("acme", "sandbox")
    for i in range(3):
        add(store, "acme", now=T0 + i * 5 * H)
    assert store.active("acme", "field", now=T0 + 11 * H).version == 3
    # Destroying an archived secret leaves the active one serving...
    store.destroy_secret("acme", "field", 2, now=T0 + 11 * H)
    assert store.active("acme", "field", now=T0 + 11 * H).version == 3
    # ...but destroying the newest (say, rotated out for compromise) must not quietly bring
    # back an older one for new data: the org needs a new secret.
    store.destroy_secret("acme", "field", 3, now=T0 + 11 * H)
    assert store.active("acme", "field", now=T0 + 11 * H) is None
    # Before a secret existed, nothing was usable.
    assert store.active("acme", "field", now=T0 - 1) is None


def test_sqlite_destroy_erases_the_blob_from_the_files(tmp_path):
    path = tmp_path / "kms.db"
    marker = b"SHRED-ME-" + os.urandom(24).hex().encode()
    with Store.open(str(path)) as s:
        s.create_org("acme", "sandbox")
        s.add_secret("acme", "field", source="HSM", derivation="PBKDF2", release="r1",
                     iterations=1000, now=T0, wrap=lambda v: marker)
        add(s, "acme", now=T0 + 5 * H)

        def files() -> bytes:
            return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert marker in files()
        s.destroy_secret("acme", "field", 1, now=T0 + 6 * H)
        assert marker not in files()
    assert marker not in files()


# ----------------------------------------------------------------------------- releases
def test_releases(store):
    assert store.releases() == {}
    store.record_release("2026.1", "cer-1", SHA, T0)
    store.record_release("2026.1", "cer-1", SHA, T0 + 5)            # same: a no-op
    store.record_release("2026.2", "cer-2", "cd" * 32, T0 + 6)
    assert store.releases() == {"2026.1": ("cer-1", SHA), "2026.2": ("cer-2", "cd" * 32)}
    with pytest.raises(ImportRefused, match="already recorded from ceremony 'cer-1'"):
        store.record_release("2026.1", "cer-9", SHA, T0)
    with pytest.raises(ImportRefused):
        store.record_release("2026.1", "cer-1", "ef" * 32, T0)
    with pytest.raises(KmsError, match="64 lowercase hex"):
        store.record_release("2026.3", "cer-3", "AB" * 32, T0)
    assert store.releases()["2026.1"] == ("cer-1", SHA)


# ----------------------------------------------------------------------------- export / import
def _populated(s: Store, org="acme"):
    s.create_org(org, "production")
    add(s, org, now=T0)
    add(s, org, now=T0 + D)
    add(s, org, now=T0 + 2 * D, source="UPLOADED", derivation="NONE", iterations=0)
    s.destroy_secret(org, "field", 1, now=T0 + 3 * D)
    add(s, org, "database", now=T0)


def test_export_import_round_trip(store, store_url, tmp_path):
    _populated(store)
    rows = store.export_rows("acme")
    assert all(set(r) == {*SECRET_FIELDS, "checksum"} for r in rows)
    assert json.loads(json.dumps(rows, default=lambda b: b.hex()))     # JSON-able but for bytes
    with Store.open(f"sqlite://{tmp_path}/restore.db") as dest:
        dest.create_org("acme", "production")
        dest.import_rows("acme", rows)
        assert dest.secrets("acme") == store.secrets("acme")
        assert dest.active("acme", "field", now=T0 + 3 * D).version == 3
        assert dest.verify() == []
        # Importing again is refused, whole: nothing of a batch with one clash is imported.
        extra = {k: v for k, v in rows[-1].items() if k != "checksum"}
        extra.update(version=9, state="ARCHIVED")
        with pytest.raises(KmsError, match=r"nothing imported.*already holds field v2"):
            dest.import_rows("acme", [rows[2], extra])
        assert len(dest.secrets("acme")) == 4


def test_import_refusals(store):
    _populated(store)
    rows = store.export_rows("acme")
    store.create_org("beta", "production")
    with pytest.raises(KmsError, match="belongs to org 'acme', not 'beta'"):
        store.import_rows("beta", rows)
    moved = [dict(r, org_id="beta") for r in rows]
    with pytest.raises(CorruptRecord, match="fails its checksum"):
        store.import_rows("beta", moved)                 # checksums bind the org too
    unchecked = [{k: v for k, v in r.items() if k != "checksum"} for r in moved]
    two_active = unchecked + [dict(unchecked[-1], version=7)]
    with pytest.raises(KmsError, match="2 ACTIVE field secrets"):
        store.import_rows("beta", two_active)
    with pytest.raises(KmsError, match="repeat field v1"):
        store.import_rows("beta", unchecked + [unchecked[1]])
    with pytest.raises(KmsError, match="unknown fields"):
        store.import_rows("beta", [dict(unchecked[0], plaintext=b"no")])
    with pytest.raises(KmsError, match="DESTROYED row has no wrapped blob"):
        store.import_rows("beta", [dict(unchecked[1], wrapped=b"x")])
    assert store.secrets("beta") == []
    # A second ACTIVE beside one the store already has is refused too.
    add(store, "beta", now=T0)
    active_only = [r for r in unchecked if r["state"] == "ACTIVE" and r["key_type"] == "field"]
    with pytest.raises(KmsError, match="second ACTIVE one beside v1"):
        store.import_rows("beta", [dict(active_only[0], version=5)])
    assert [r.version for r in store.secrets("beta")] == [1]
    store.import_rows("beta", [dict(r, version=r["version"] + 10) for r in unchecked
                               if r["state"] != "ACTIVE"])
    assert [(r.key_type, r.version) for r in store.secrets("beta")] == [
        ("field", 1), ("field", 11), ("field", 12)]


def test_export_from_sqlite_import_into_postgresql(tmp_path, postgresql_server):
    url = postgresql_server.create_database()
    with Store.open(f"sqlite://{tmp_path}/a.db") as a, Store.open(url) as b:
        _populated(a)
        b.create_org("acme", "production")
        b.import_rows("acme", a.export_rows("acme"))
        assert b.secrets("acme") == a.secrets("acme")
        assert b.export_rows("acme") == a.export_rows("acme")


# ----------------------------------------------------------------------------- corruption
# column -> its new value, computed from the intact row (field v2 of org "acme")
CORRUPTIONS = {
    "wrapped-bit-flip": ("wrapped", lambda r: bytes([r.wrapped[0] ^ 1]) + r.wrapped[1:]),
    "blob-from-other-version": ("wrapped", None),     # v1's blob copied into v2's row
    "usable-earlier": ("usable_from", lambda r: r.usable_from - D),
    "iterations": ("iterations", lambda r: 1),
    "release": ("release_id", lambda r: "r0"),
    "checksum": ("checksum", lambda r: "0" * 64),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_secret_row_is_reported_and_nothing_else_affected(store, store_url, kind):
    for org in ("acme", "beta"):
        store.create_org(org, "sandbox")
        for i in range(3):
            add(store, org, now=T0 + i * 5 * H)
        add(store, org, "database", now=T0)
    before = {org: store.secrets(org) for org in ("acme", "beta")}
    column, value = CORRUPTIONS[kind]
    new = value(store.get("acme", "field", 2)) if value else store.get("acme", "field", 1).wrapped
    raw(store_url, f"UPDATE tenant_secrets SET {column} = ? WHERE org_id = 'acme' AND "
                   "key_type = 'field' AND version = 2", (new,))

    with pytest.raises(CorruptRecord) as info:
        store.get("acme", "field", 2)
    e = info.value
    assert (e.org_id, e.key_type, e.version) == ("acme", "field", 2)
    assert "org 'acme', field secret v2 failed its integrity check" in str(e)
    # Other rows of the same org, and the other org entirely, are unaffected.
    assert store.get("acme", "field", 1) == before["acme"][1]
    assert store.get("acme", "field", 3) == before["acme"][3]
    assert store.active("acme", "field", now=T0 + D) == before["acme"][3]   # v3, newer than v2
    assert store.active("acme", "database", now=T0 + D) == before["acme"][0]
    assert store.secrets("beta") == before["beta"]
    add(store, "beta", now=T0 + D)
    store.destroy_secret("beta", "field", 2, now=T0 + D)
    # Listings name the corrupt row and carry the intact ones.
    with pytest.raises(CorruptRecord) as info:
        store.secrets("acme")
    assert info.value.records == [("tenant_secrets", "acme", "field", 2)]
    assert info.value.intact == [r for r in before["acme"] if r.version != 2 or
                                 r.key_type != "field"]
    assert "org 'acme' field v2" in str(info.value)
    with pytest.raises(CorruptRecord):
        store.export_rows("acme")
    assert store.verify() == [("tenant_secrets", "acme", "field", 2)]
    # Rotating and destroying still work around it; the corrupt row is never re-checksummed.
    add(store, "acme", now=T0 + D)
    store.destroy_secret("acme", "field", 1, now=T0 + D)
    with pytest.raises(CorruptRecord):
        store.destroy_secret("acme", "field", 2, now=T0 + D)
    assert store.verify() == [("tenant_secrets", "acme", "field", 2)]


def test_corrupt_newest_or_active_row_blocks_only_its_key(store, store_url):
    store.create_org("acme", "sandbox")
    for i in range(2):
        add(store, "acme", now=T0 + i * 5 * H)
    add(store, "acme", "database", now=T0)
    # Hide the ACTIVE v2 from a naive "WHERE state = 'ACTIVE'": the store must not fall back to v1.
    raw(store_url, "UPDATE tenant_secrets SET state = 'ARCHIVED' WHERE org_id = 'acme' AND "
                   "key_type = 'field' AND version = 2")
    with pytest.raises(CorruptRecord, match="field secret v2"):
        store.active("acme", "field", now=T0 + D)
    with pytest.raises(CorruptRecord, match="field secret v2"):
        add(store, "acme", now=T0 + D)                   # rate limit basis and ACTIVE are corrupt
    assert store.active("acme", "database", now=T0 + D).version == 1
    assert store.get("acme", "field", 1).state == "ARCHIVED"


def test_sqlite_type_corruption_is_detected(tmp_path):
    url = f"sqlite://{tmp_path}/kms.db"
    with Store.open(url) as s:
        s.create_org("acme", "sandbox")
        add(s, "acme", now=T0)
        add(s, "acme", now=T0 + 5 * H)
        raw(url, "UPDATE tenant_secrets SET iterations = 'many' WHERE version = 1")
        raw(url, "UPDATE tenant_secrets SET created_at = 'yesterday' WHERE version = 2")
        assert s.verify() == [("tenant_secrets", "acme", "field", 1),
                              ("tenant_secrets", "acme", "field", 2)]
        with pytest.raises(CorruptRecord) as info:
            s.secrets("acme")
        assert len(info.value.records) == 2 and info.value.intact == []


def test_corrupt_org_and_release_rows(store, store_url):
    store.create_org("acme", "sandbox")
    store.create_org("beta", "production")
    add(store, "beta", now=T0)
    store.record_release("r1", "c1", SHA, T0)
    store.record_release("r2", "c2", SHA, T0)
    raw(store_url, "UPDATE orgs SET org_type = 'production' WHERE org_id = 'acme'")
    raw(store_url, "UPDATE releases SET ceremony_id = 'evil' WHERE release_id = 'r1'")
    with pytest.raises(CorruptRecord, match="org 'acme'") as info:
        store.org_type("acme")
    assert info.value.org_id == "acme"
    with pytest.raises(CorruptRecord):
        add(store, "acme", now=T0)
    with pytest.raises(CorruptRecord) as info:
        store.orgs()
    assert info.value.records == [("orgs", "acme")]
    assert info.value.intact == [("beta", "production")]
    with pytest.raises(CorruptRecord) as info:
        store.releases()
    assert info.value.records == [("releases", "r1")] and info.value.intact == {"r2": ("c2", SHA)}
    with pytest.raises(CorruptRecord):
        store.record_release("r1", "c1", SHA, T0)
    assert store.org_type("beta") == "production"
    assert add(store, "beta", now=T0 + D).version == 2
    assert store.verify() == [("orgs", "acme"), ("releases", "r1")]


# ----------------------------------------------------------------------------- worker processes
def _worker_main() -> None:
    """Entry point of the subprocesses below: ``python -c ... '<json spec>'``."""
    spec = json.loads(sys.argv[1])
    store = Store.open(spec["url"])
    op = spec["op"]
    out: dict = {}
    if op == "race":
        out = _race(store, spec)
    elif op == "add":
        def wrap(v):
            if spec.get("in_wrap") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if spec.get("in_wrap") == "sleep":
                Path(spec["marker"]).write_text("in wrap")
                time.sleep(120)
            return blob(spec["org"], spec["key_type"], v)
        store.add_secret(spec["org"], spec["key_type"], source="HSM", derivation="PBKDF2",
                         release="r1", iterations=1000, now=spec["now"], wrap=wrap)
    elif op == "destroy":
        store.destroy_secret(spec["org"], spec["key_type"], spec["version"], now=spec["now"])
    elif op == "import":
        rows = [{k: bytes.fromhex(v[4:]) if isinstance(v, str) and v.startswith("hex:") else v
                 for k, v in r.items()} for r in spec["rows"]]
        store.import_rows(spec["org"], rows)
    elif op == "create_org":
        store.create_org(spec["org"], "sandbox")
    elif op == "open":
        pass
    store.close()
    print(json.dumps(out))


def _race(store: Store, spec: dict) -> dict:
    """``threads`` threads calling add_secret; ``same_now``: all at one instant, else a fake clock
    on which one real nanosecond is one second (so calls are hours apart) with retries when a
    call that read the clock earlier commits later and is rate-limited."""
    go = Path(spec["go"])
    while not go.exists():
        time.sleep(0.001)
    barrier = threading.Barrier(spec["threads"])
    res = {"ok": [], "limited": 0, "retries": 0, "errors": []}
    lock = threading.Lock()

    def clock() -> float:
        return T0 + float(time.monotonic_ns() - spec["start_ns"])

    def run():
        barrier.wait()
        for _ in range(spec["calls"]):
            for _attempt in range(10_000):
                now = T0 if spec["same_now"] else clock()
                try:
                    row = add(store, spec["org"], now=now)
                except RateLimited:
                    with lock:
                        res["limited" if spec["same_now"] else "retries"] += 1
                    if spec["same_now"]:
                        break
                    continue
                except Exception as exc:   # reported to the parent, which fails the test
                    with lock:
                        res["errors"].append(repr(exc))
                    break
                with lock:
                    res["ok"].append(row.version)
                break
    run_threads(spec["threads"], lambda i: run())  # a thread's error fails the worker
    return res


def _spawn(spec: dict, *, kill_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.Popen(
        [sys.executable, "-c",
         "from tests.kms.store.test_repository import _worker_main; _worker_main()",
         json.dumps(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _run(spec: dict, *, kill_at: str | None = None, timeout: float = 120):
    proc = _spawn(spec, kill_at=kill_at)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ----------------------------------------------------------------------------- concurrency
def test_threads_lose_no_update(store, store_url):
    store.create_org("sbx", "sandbox")
    start_ns = time.monotonic_ns()
    go = Path(os.environ.get("TMPDIR", "/tmp")) / f"go-{os.getpid()}-{start_ns}"
    go.touch()
    try:
        res = _race(store, dict(go=str(go), threads=8, calls=6, same_now=False, org="sbx",
                                start_ns=start_ns))
    finally:
        go.unlink()
    assert res["errors"] == []
    _assert_consecutive(store, "sbx", 48)
    assert sorted(res["ok"]) == list(range(1, 49))


def _assert_consecutive(store: Store, org: str, n: int) -> None:
    rows = store.secrets(org)
    assert [r.version for r in rows] == list(range(1, n + 1))    # consecutive, no duplicate
    assert [r.state for r in rows] == ["ARCHIVED"] * (n - 1) + ["ACTIVE"]
    for r in rows:                              # each blob was wrapped for its own version
        assert r.wrapped.startswith(f"wrapped:{org}:field:v{r.version}:".encode())
    created = [r.created_at for r in rows]
    assert all(b - a >= key_rules.NEW_SECRET_INTERVAL["sandbox"] for a, b in pairwise(created))


def _race_two_processes(store: Store, store_url: str, tmp_path: Path, **race) -> list[dict]:
    """Two worker processes of 8 threads each racing :func:`_race` on org "sbx" (made here),
    released together by a "go" file; each process's results, after checking that both exited 0
    and none of their threads raised."""
    store.create_org("sbx", "sandbox")
    go = tmp_path / "go"
    spec = dict(op="race", url=store_url, org="sbx", threads=8, go=str(go), **race)
    procs = [_spawn(spec) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["errors"] for r in results] == [[], []]
    return results


@pytest.mark.slow
def test_two_processes_of_eight_threads_lose_no_update(store, store_url, tmp_path):
    results = _race_two_processes(store, store_url, tmp_path, calls=5, same_now=False,
                                  start_ns=time.monotonic_ns())
    _assert_consecutive(store, "sbx", 80)
    assert sorted(results[0]["ok"] + results[1]["ok"]) == list(range(1, 81))


@pytest.mark.slow
def test_same_instant_rate_limited_calls_let_exactly_one_through(store, store_url, tmp_path):
    results = _race_two_processes(store, store_url, tmp_path, calls=1, same_now=True, start_ns=0)
    assert sorted(results[0]["ok"] + results[1]["ok"]) == [1]
    assert results[0]["limited"] + results[1]["limited"] == 15
    assert [(r.version, r.state) for r in store.secrets("sbx")] == [(1, "ACTIVE")]


def test_pool_smaller_than_thread_count(store_url):
    with Store.open(store_url, pool_size=2) as s:
        s.create_org("sbx", "sandbox")

        def work(i):
            for j in range(5):
                s.orgs()
                s.active("sbx", "field", now=T0)
                s.record_release(f"r{i}.{j}", "c", SHA, T0)
        run_threads(8, work)  # re-raises every thread's error
        assert len(s.releases()) == 40


def test_forked_child_reconnects_and_parent_keeps_its_connections(store):
    store.create_org("acme", "sandbox")
    add(store, "acme", now=T0)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            add(store, "acme", now=T0 + 5 * H)
            code = 0 if store.get("acme", "field", 2).state == "ACTIVE" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.state for r in store.secrets("acme")] == ["ARCHIVED", "ACTIVE"]
    assert add(store, "acme", now=T0 + 10 * H).version == 3


# ----------------------------------------------------------------------------- crashes
def _hexed(rows):
    return [{k: ("hex:" + v.hex()) if isinstance(v, bytes) else v for k, v in r.items()}
            for r in rows]


def _prepare(store: Store) -> None:
    store.create_org("acme", "sandbox")
    add(store, "acme", now=T0)
    add(store, "acme", now=T0 + 5 * H)
    store.create_org("dest", "sandbox")


ADD_POINTS = ["add_secret:archived", "add_secret:inserted", "commit", "committed"]
DESTROY_POINTS = ["destroy_secret:updated", "commit", "committed"]
IMPORT_POINTS = ["import_rows:inserted", "commit", "committed"]
ORG_POINTS = ["create_org:inserted", "commit", "committed"]


def _crash_cases():
    for p in ADD_POINTS:
        yield "add", p
    yield "add", "in-wrap"
    for p in DESTROY_POINTS:
        yield "destroy", p
    for p in IMPORT_POINTS:
        yield "import", p
    for p in ORG_POINTS:
        yield "create_org", p


@pytest.mark.slow
@pytest.mark.parametrize("op, point", list(_crash_cases()),
                         ids=[f"{o}-{p.replace(':', '-')}" for o, p in _crash_cases()])
def test_sigkill_at_every_checkpoint_leaves_old_or_new_state(store, store_url, op, point):
    _prepare(store)
    before = {org: store.secrets(org) for org in ("acme", "dest")}
    spec = dict(url=store_url, op=op, org="acme", key_type="field")
    if op == "add":
        spec.update(now=T0 + 10 * H, in_wrap="kill" if point == "in-wrap" else None)
    elif op == "destroy":
        spec.update(version=1, now=T0 + 10 * H)
    elif op == "import":
        spec.update(org="dest", rows=_hexed(store.export_rows("acme")))
        spec["rows"] = [dict(r, org_id="dest") for r in spec["rows"]]
        for r in spec["rows"]:
            del r["checksum"]
    elif op == "create_org":
        spec.update(org="newco")
    code, _out, err = _run(spec, kill_at=None if point == "in-wrap" else point)
    assert code == -signal.SIGKILL, (code, err)

    with Store.open(store_url) as s:
        assert s.verify() == []
        committed = point == "committed"
        if op == "add":
            rows = s.secrets("acme")
            if committed:
                assert [(r.version, r.state) for r in rows] == [
                    (1, "ARCHIVED"), (2, "ARCHIVED"), (3, "ACTIVE")]
                assert rows[:2] == [dataclasses.replace(before["acme"][0]),
                                    dataclasses.replace(before["acme"][1], state="ARCHIVED")]
            else:
                assert rows == before["acme"]
        elif op == "destroy":
            r1 = s.get("acme", "field", 1)
            assert (r1.state == "DESTROYED" and r1.wrapped is None) if committed \
                else r1 == before["acme"][0]
            assert s.get("acme", "field", 2) == before["acme"][1]
        elif op == "import":
            rows = s.secrets("dest")
            assert len(rows) == (2 if committed else 0)
        elif op == "create_org":
            assert ("newco", "sandbox") in s.orgs() if committed else \
                ("newco", "sandbox") not in s.orgs()
        # The store is writable at once: no lock outlived the killed process.
        started = time.monotonic()
        add(s, "acme", now=T0 + 100 * H)
        assert time.monotonic() - started < 10


@pytest.mark.slow
def test_sigkill_from_outside_while_wrap_holds_the_transaction(store, store_url, tmp_path):
    _prepare(store)
    before = store.secrets("acme")
    marker = tmp_path / "in-wrap"
    proc = _spawn(dict(url=store_url, op="add", org="acme", key_type="field", now=T0 + 10 * H,
                       in_wrap="sleep", marker=str(marker)))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Meanwhile a reader sees the old state (the transaction is open, not committed).
        assert store.secrets("acme") == before
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert store.secrets("acme") == before and store.verify() == []
    started = time.monotonic()
    assert add(store, "acme", now=T0 + 10 * H).version == 3
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_sigkill_during_migration_leaves_no_half_schema(store_url):
    code, _, err = _run(dict(url=store_url, op="open"), kill_at="migration:1")
    assert code == -signal.SIGKILL, err
    assert raw(store_url, "SELECT COUNT(*) FROM schema_migrations") == [(0,)]
    with pytest.raises(MISSING_TABLE):
        raw(store_url, "SELECT * FROM tenant_secrets")
    with Store.open(store_url) as s:
        assert s.schema_version() == N_MIGRATIONS
        s.create_org("acme", "sandbox")


def test_postgresql_connections_lost_are_replaced(postgresql_server):
    """A server restart or failover kills every pooled connection: reads and not-yet-committed
    writes go through on a fresh one."""
    url = postgresql_server.create_database()
    kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'hsm-suite-kms'")
    with Store.open(url, pool_size=4) as s:
        s.create_org("acme", "sandbox")
        barrier = threading.Barrier(4, timeout=60)

        def hold(i):  # put four connections in the pool
            with s.db.lease():
                barrier.wait()
        run_threads(4, hold)
        assert len(raw(url, kill)) == 4
        assert s.orgs() == [("acme", "sandbox")]
        raw(url, kill)
        assert add(s, "acme", now=T0).version == 1
        raw(url, kill)
        assert add(s, "acme", now=T0 + 5 * H).version == 2
        assert [r.state for r in s.secrets("acme")] == ["ARCHIVED", "ACTIVE"]
    postgresql_server.drop_database(url)
