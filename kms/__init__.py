"""The regional KMS (lands with its own issue)."""
