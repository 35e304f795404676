"""Numbered schema migrations (``kms/migrations/NNNN_name.sql``), recorded with their SHA-256 in
``schema_migrations``, each applied in one transaction together with its record. A database
newer than the code, or whose applied migrations were edited since, is refused."""

from __future__ import annotations

import re
import time
import hashlib
from dataclasses import dataclass
from pathlib import Path

from kms.errors import KmsError, StoreUnavailable

from .database import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    sha256: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    directory = Path(directory)
    if not directory.is_dir():
        raise KmsError(f"store migrations not found in {directory}",
                       hint="the kms package was installed without kms/migrations/*.sql")
    found = []
    for p in sorted(directory.iterdir()):
        m = _MIGRATION_FILE.match(p.name)
        if m is None:
            if p.suffix == ".sql":
                raise KmsError(f"migration file {p.name} is not named NNNN_name.sql")
            continue
        text = p.read_text(encoding="utf-8")
        found.append(Migration(int(m.group(1)), m.group(2), text,
                               hashlib.sha256(text.encode()).hexdigest()))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise KmsError(f"migrations in {directory} must be numbered 0001, 0002, ... without gaps: "
                       f"{[m.version for m in found]}")
    return found


def _statements(sql: str, bytes_type: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    text = "\n".join(lines).replace("{bytes}", bytes_type)
    return [s.strip() for s in text.split(";") if s.strip()]


def migrate(db: Database, migrations: list[Migration]) -> int:
    """Apply the pending migrations; returns the schema version."""
    b = db.backend
    known = {m.version: m for m in migrations}
    with db.lease() as conn:
        def run(fn):
            try:
                b.begin(conn, migration=True)
                out = fn()
                b.commit(conn)
                return out
            except BaseException as exc:
                b.rollback_quietly(conn)
                if b.driver_error(exc):
                    raise StoreUnavailable(f"store migration failed: {b.describe(exc)}") from exc
                raise

        def applied() -> dict[int, str]:
            rows = db.execute(conn, "SELECT version, sha256 FROM schema_migrations").fetchall()
            have = {int(v): sha for v, sha in rows}
            newer = sorted(v for v in have if v not in known)
            if newer:
                raise KmsError(f"the store's schema is at migration {max(have)}, newer than "
                               f"this code knows ({len(known)})",
                               hint="upgrade hsm-suite on this node")
            for v, sha in have.items():
                if known[v].sha256 != sha:
                    raise KmsError(f"migration {v:04d}_{known[v].name} was changed after it "
                                   "was applied to this store",
                                   hint="never edit an applied migration; add a new one")
            return have

        def apply(m: Migration) -> None:
            if m.version in applied():
                return        # another node applied it while this one waited for the lock
            for stmt in _statements(m.sql, b.bytes_type):
                try:
                    db.execute(conn, stmt)
                except Exception as exc:
                    if b.driver_error(exc):
                        raise KmsError(f"store migration {m.version:04d}_{m.name} failed "
                                       f"(nothing of it applied): {b.describe(exc)}") from exc
                    raise
            db.checkpoint(f"migration:{m.version}")
            db.execute(conn, "INSERT INTO schema_migrations (version, name, sha256, applied_at) "
                             "VALUES (?, ?, ?, ?)", (m.version, m.name, m.sha256, time.time()))

        run(lambda: db.execute(conn, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                                     "version BIGINT NOT NULL PRIMARY KEY, "
                                     "name TEXT NOT NULL, sha256 TEXT NOT NULL, "
                                     "applied_at DOUBLE PRECISION NOT NULL)"))
        have = run(applied)
        for m in migrations:
            if m.version not in have:
                run(lambda m=m: apply(m))
        return max(run(applied), default=0)
