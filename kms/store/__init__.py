"""The TenantSecret store: orgs, their wrapped tenant secrets, customer keys and the releases
this KMS imported, on SQLite (the embedded default) or PostgreSQL (several KMS nodes).

One transaction per state change, no lost update (each write takes its org's lock), only wrapped
material, and every row checked on read. How and why: ``docs/store.md``.

Layers, bottom up: :mod:`.records` (rows and their checksums), :mod:`.checks` (arguments),
:mod:`.backends` (what SQLite and PostgreSQL do differently), :mod:`.database` (the pool and
transactions), :mod:`.migrations` (the schema), :mod:`.repository` (:class:`Store`).
"""

from kms.store.database import KILL_ENV
from kms.store.migrations import MIGRATIONS_DIR, Migration, load_migrations
from kms.store.records import SECRET_FIELDS, SecretRow, secret_checksum, utc_iso
from kms.store.repository import Store

__all__ = [
    "KILL_ENV",
    "MIGRATIONS_DIR",
    "SECRET_FIELDS",
    "Migration",
    "SecretRow",
    "Store",
    "load_migrations",
    "secret_checksum",
    "utc_iso",
]
