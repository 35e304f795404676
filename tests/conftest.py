"""Shared fixtures. Token fixtures come from the project's own pytest plugin (hsm.testing)."""

from __future__ import annotations

import pytest

from hsm.keys import provision


@pytest.fixture(scope="session")
def _byok_pin_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("byok-pins")


@pytest.fixture(autouse=True)
def byok_pin_file(_byok_pin_dir, request, monkeypatch):
    """Each test's own BYOK pin file (``kms byok wrap`` pins keys per user): never the real
    ~/.config of whoever runs the tests, and no pin leaks from one test into another.
    Subprocesses inherit it through the environment."""
    import hashlib
    path = _byok_pin_dir / (hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
                            + ".json")
    monkeypatch.setenv("HSM_SUITE_BYOK_PINS", str(path))
    return path


@pytest.fixture(scope="module")
def module_token_factory(softhsm_session_token_factory):
    """Fresh SoftHSM2 tokens for a whole test module (RSA-4096 keygen is slow)."""
    return lambda prefix: softhsm_session_token_factory(prefix=prefix)


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


@pytest.fixture(scope="session")
def postgresql_server():
    """A throw-away PostgreSQL server (Debian's packages) on 127.0.0.1 for the whole test session
    (tests/pg.py); skips, naming `apt-get install postgresql`, when the binaries are missing.
    ``postgresql_server.create_database()`` gives each test its own database URL."""
    from tests import pg
    try:
        server = pg.start()
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def service_kit(tmp_path_factory, softhsm_session_token_factory):
    """One eu release ceremony and TLS material for every service test module; the nodes they
    start are real `kms serve` processes on 127.0.0.1 (tests/service_kit.py), all killed here
    at the end if a test left one running."""
    from tests.service_kit import make_service_kit
    kit = make_service_kit(tmp_path_factory.mktemp("service"),
                           lambda prefix: softhsm_session_token_factory(prefix=prefix))
    try:
        yield kit
    finally:
        kit.close()
