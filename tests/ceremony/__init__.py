"""Tests of `ceremony`."""
