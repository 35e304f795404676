"""Tests of `hsm.core`."""
