"""The High Assurance Virtual Ceremony (lands with its own issue)."""
