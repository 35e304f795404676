"""Tenant secret policy: who may do what, when. Plain numbers, one place."""

from __future__ import annotations

HOUR = 3600.0
DAY = 24 * HOUR

ORG_TYPES = ("production", "developer", "sandbox")
# One new tenant secret (generate or upload) per interval, per org and key type.
NEW_SECRET_INTERVAL = {"production": 24 * HOUR, "developer": 24 * HOUR, "sandbox": 4 * HOUR}

KEY_TYPES = ("field", "database")
# Database-encryption secrets: not destroyable for 3 months, not used for new DEKs for 24 h.
DATABASE_MIN_LIFESPAN = 90 * DAY
DATABASE_ACTIVATION_DELAY = 24 * HOUR


# A tenant backup restores only into the store (and region) it came from, and only this long:
# an old backup is how a destroyed key would come back, so none lives forever.
BACKUP_VALIDITY = 30 * DAY
# How long a copy of the regional token (a backup of its key store) may be kept: the bound on how
# long a destroyed version can be revived from such a copy (docs/store.md, "Shredding and
# recovery"). Enforced by the operator's backup rotation, printed at every destroy.
TOKEN_COPY_RETENTION = 7 * DAY


def usable_from(key_type: str, now: float) -> float:
    """When a new secret of ``key_type`` created at ``now`` may first serve new DEKs (database
    keys wait a day). One definition for the store that records it and the KMS that binds it
    into the secret's AES-GCM associated data."""
    return now + (DATABASE_ACTIVATION_DELAY if key_type == "database" else 0.0)

STATES = ("ACTIVE", "ARCHIVED", "DESTROYED")
SOURCES = ("HSM", "UPLOADED", "REMOTE")
DERIVATIONS = ("PBKDF2", "NONE")

DEFAULT_PBKDF2_ITERATIONS = 1000
CACHE_FLUSH_AFTER = 72 * HOUR
CACHE_MAX_ENTRIES = 100_000
