-- Migration 2: customer-controlled keys (issue 9).
--
-- customer_keys: per org, what the customer registered - the EKM root key (kind 'ekm': its ARN,
-- endpoint and region as JSON) or the org's BYOK certificate (kind 'byok': the certificate PEM
-- and the label of its key pair in the regional HSM). Public parameters only, never key material.
-- byok_uploads: the SHA-256 of every BYOK ciphertext accepted, so a replayed upload is refused.
-- Both carry `checksum` like every row (kms/store.py: _digest).

CREATE TABLE customer_keys (
    org_id      TEXT NOT NULL REFERENCES orgs (org_id),
    kind        TEXT NOT NULL CHECK (kind IN ('ekm', 'byok')),
    spec        TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    checksum    TEXT NOT NULL,
    PRIMARY KEY (org_id, kind)
);

CREATE TABLE byok_uploads (
    org_id             TEXT NOT NULL REFERENCES orgs (org_id),
    ciphertext_sha256  TEXT NOT NULL,
    uploaded_at        DOUBLE PRECISION NOT NULL,
    checksum           TEXT NOT NULL,
    PRIMARY KEY (org_id, ciphertext_sha256)
);
