"""Tests of `hsm.commands`."""
