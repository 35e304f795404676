-- Migration 1: the TenantSecret store (SQLite and PostgreSQL alike).
--
-- One file serves both databases; the runner in kms/store.py replaces the single token {bytes}
-- with BLOB (SQLite) or BYTEA (PostgreSQL). Every other type is spelled the same in both:
-- TEXT, BIGINT (SQLite: INTEGER affinity) and DOUBLE PRECISION (SQLite: REAL affinity).
-- Statements are split on ';' (so no ';' inside a statement, and no triggers), and the whole file
-- runs in one transaction together with its row in schema_migrations.
--
-- Every row carries `checksum`: SHA-256 over its canonical fields (kms/store.py: _digest), checked
-- on every read. The allowed values below mirror kms/policy.py.

CREATE TABLE orgs (
    org_id      TEXT NOT NULL PRIMARY KEY,
    org_type    TEXT NOT NULL CHECK (org_type IN ('production', 'developer', 'sandbox')),
    created_at  DOUBLE PRECISION NOT NULL,
    checksum    TEXT NOT NULL
);

CREATE TABLE tenant_secrets (
    org_id       TEXT NOT NULL REFERENCES orgs (org_id),
    key_type     TEXT NOT NULL CHECK (key_type IN ('field', 'database')),
    version      BIGINT NOT NULL CHECK (version >= 1),
    state        TEXT NOT NULL CHECK (state IN ('ACTIVE', 'ARCHIVED', 'DESTROYED')),
    source       TEXT NOT NULL CHECK (source IN ('HSM', 'UPLOADED', 'REMOTE')),
    derivation   TEXT NOT NULL CHECK (derivation IN ('PBKDF2', 'NONE')),
    release_id   TEXT,
    -- the tenant secret wrapped by the release's tenant wrapping key; NULL once DESTROYED
    wrapped      {bytes},
    iterations   BIGINT NOT NULL CHECK (iterations >= 0),
    created_at   DOUBLE PRECISION NOT NULL,
    usable_from  DOUBLE PRECISION NOT NULL,
    destroyed_at DOUBLE PRECISION,
    checksum     TEXT NOT NULL,
    PRIMARY KEY (org_id, key_type, version),
    CHECK ((state = 'DESTROYED') = (wrapped IS NULL)),
    CHECK ((state = 'DESTROYED') = (destroyed_at IS NOT NULL))
);

-- At most one ACTIVE secret per org and key type, whatever the code above does.
CREATE UNIQUE INDEX tenant_secrets_one_active ON tenant_secrets (org_id, key_type)
    WHERE state = 'ACTIVE';

CREATE TABLE releases (
    release_id    TEXT NOT NULL PRIMARY KEY,
    ceremony_id   TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    recorded_at   DOUBLE PRECISION NOT NULL,
    checksum      TEXT NOT NULL
);
