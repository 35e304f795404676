"""Tests of `hsm.cloud`."""
