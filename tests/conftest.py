"""Shared fixtures. Token fixtures come from the project's own pytest plugin (hsm.testing)."""

from __future__ import annotations

import secrets

import pytest

from hsm import provision
from hsm.pin import Pin
from hsm.softhsm import init_token_in_process
from hsm.testing import TestToken


@pytest.fixture(scope="module")
def module_token_factory(softhsm_module):
    """Fresh SoftHSM2 tokens that live for a whole test module (RSA-4096 keygen is slow)."""
    made = []

    def make(prefix: str) -> TestToken:
        label = f"{prefix}-{secrets.token_hex(3)}"
        so_pin, user_pin = Pin(secrets.token_hex(8)), Pin(secrets.token_hex(8))
        init_token_in_process(softhsm_module, label, so_pin, user_pin)
        import os
        tt = TestToken("softhsm2", label, so_pin, user_pin, softhsm_module.path,
                       env={"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]})
        made.append(tt)
        return tt

    yield make
    for tt in made:
        tt.close()


@pytest.fixture(scope="module")
def provisioned(module_token_factory, tmp_path_factory):
    """A primary and a certified regional HSM, provisioned once per test module."""
    out = tmp_path_factory.mktemp("pki")
    primary = module_token_factory("primary")
    regional = module_token_factory("regional")
    outcomes = provision.init_primary(primary.token, out)
    request = provision.init_regional(regional.token, "eu", out)
    cert = provision.certify_regional(primary.token, request.request, out,
                                      confirmed_fingerprint=request.fingerprint)
    return {"out": out, "primary": primary, "regional": regional, "outcomes": outcomes,
            "request": request, "regional_cert": cert}
