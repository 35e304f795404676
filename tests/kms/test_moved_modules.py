"""The module paths of the flat kms/ layout keep working until the next release: each old path
imports as the very same module object as its new path (a monkeypatch through either is seen
through both; module state such as a cache is not duplicated). The only place in the tree that
names the old paths."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import kms

OLD_PATHS = {
    "kms.service": "kms.node.node", "kms.config": "kms.node.config",
    "kms.limits": "kms.node.limits", "kms.importer": "kms.node.importer",
    "kms.derive": "kms.node.derive", "kms.sealing": "kms.node.sealing",
    "kms.rowcache": "kms.node.rowcache", "kms.orgid": "kms.node.orgid",
    "kms.advice": "kms.node.advice", "kms.cache": "kms.dek_cache", "kms.policy": "kms.key_rules",
    "kms.byok": "kms.customer_keys.byok", "kms.byok_pins": "kms.customer_keys.byok_pins",
    "kms.cacheonly": "kms.customer_keys.cache_only", "kms.ekm": "kms.customer_keys.ekm",
    "kms.outbound": "kms.customer_keys.outbound",
    "kms.keyservice": "kms.customer_keys.reference_service",
    "kms.sdk": "kms.caller.sdk", "kms.client": "kms.caller.client",
    "kms.invalidation": "kms.server.invalidation",
}


def test_the_alias_table_is_the_one_this_test_checks():
    assert kms.MOVED == OLD_PATHS


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_path_imports_as_the_same_module_object(old):
    new = OLD_PATHS[old]
    module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__name__ == new and module.__spec__.name == new   # its own spec, not the alias
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is module   # `from kms import cache`


def test_a_monkeypatch_through_the_old_path_is_seen_at_the_new(monkeypatch):
    from kms import service  # type: ignore[attr-defined]  # the deprecated path on purpose
    from kms.node import node
    monkeypatch.setattr(service, "WRAP_AAD", b"patched")
    assert node.WRAP_AAD == b"patched"


def test_an_old_path_imported_first_in_a_fresh_process_is_the_new_module():
    """Importing the old path before anything else loads the module once, under its new name."""
    code = ("import sys, kms.sdk as old; import kms.caller.sdk as new; "
            "assert old is new and sys.modules['kms.sdk'] is new; "
            "assert 'kms.client' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
