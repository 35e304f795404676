"""Tests of `hsm`."""
