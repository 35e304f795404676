"""Tests of `hsm.keys`."""
