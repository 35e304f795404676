-- Migration 3: each org's state sealed in the HSM (issue 16).
--
-- orgs.generation: which per-org key-encryption key (KEK) in the regional HSM protects the org
-- now (NULL: an org of a store made before this migration, sealed at the KMS's next start).
-- orgs.sealed_state: the org's whole state (every version's columns, its registrations, its
-- BYOK upload records) as canonical JSON; orgs.seal: the AES-GCM tag over it, computed in the
-- HSM with that generation's KEK (kms/sealing.py). Every wrapped tenant secret is wrapped again
-- under the KEK, so destroying the KEK makes older copies of the rows useless.
-- store_meta: the store's random id, which names its KEKs in a token several stores may share.

ALTER TABLE orgs ADD COLUMN generation BIGINT;
ALTER TABLE orgs ADD COLUMN sealed_state TEXT;
ALTER TABLE orgs ADD COLUMN seal {bytes};

CREATE TABLE store_meta (
    name   TEXT NOT NULL PRIMARY KEY,
    value  TEXT NOT NULL
);
