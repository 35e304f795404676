"""Tests of `kms`."""
