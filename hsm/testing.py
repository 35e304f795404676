"""pytest plugin: fresh, real SoftHSM2 tokens (and an NSS softokn token) for integration tests.

Installed as the ``hsm_tokens`` pytest11 entry point (through :mod:`hsm.pytest_plugin`), so
any project that depends on this package with its token side gets the fixtures::

    def test_wraps(softhsm_token):           # a fresh token, logged in, per test
        tok = softhsm_token.token             # hsm.core.token.Token
        ...
    def test_many(softhsm_token_factory):    # as many fresh tokens as a test needs
        a, b = softhsm_token_factory(), softhsm_token_factory()

SoftHSM2 reads its configuration once per process, so the plugin points ``SOFTHSM2_CONF`` at a
session-wide temporary token directory before the module is first loaded and creates each token
with ``C_InitToken`` in-process (a token made by ``softhsm2-util`` would be invisible here).
Subprocesses started by a test inherit ``SOFTHSM2_CONF`` and see every token created so far.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pkcs11
import pytest

from hsm.core import module as modules
from hsm.core.pin import Pin
from hsm.core.softhsm import init_token_in_process, write_config
from hsm.core.token import Token

_counter = itertools.count()


@dataclass
class TestToken:
    """A token made for a test: its label, PINs (test-only, random), and the opened Token."""

    __test__ = False  # not a test class, despite the name

    backend: str
    label: str
    so_pin: Pin | None  # None for NSS softokn, which has no SO role (CKR_USER_TYPE_INVALID)
    user_pin: Pin
    module_path: str
    parameters: str | None = None
    env: dict = field(default_factory=dict)
    _token: Token | None = None

    @property
    def token(self) -> Token:
        if self._token is None:
            self._token = Token.open(self.label, module=self.module_path,
                                     parameters=self.parameters, pin=self.user_pin)
        return self._token

    def close(self) -> None:
        if self._token is not None:
            self._token.close()
            self._token = None


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory) -> Path:
    """The session's SoftHSM2 configuration and token directory (SOFTHSM2_CONF points here)."""
    base = tmp_path_factory.mktemp("softhsm")
    conf = write_config(base / "softhsm2.conf", base / "tokens")
    loaded = modules.loaded_paths()
    if modules.resolve(modules.DEFAULT_MODULE) in loaded and \
            os.environ.get("SOFTHSM2_CONF") != str(conf):
        pytest.fail("SoftHSM2 was initialised before the hsm_tokens plugin could point it at a "
                    "temporary directory; do not load it at import time in tests")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return base


@pytest.fixture(scope="session")
def softhsm_module(softhsm_dir) -> modules.LoadedModule:
    return modules.load(modules.DEFAULT_MODULE)


def new_softhsm_token(softhsm_module: modules.LoadedModule, label: str | None = None, *,
                      prefix: str = "test") -> TestToken:
    """A fresh, empty SoftHSM2 token with random test-only PINs (opened lazily via ``.token``).

    For fixtures of any scope; the ``softhsm_module`` fixture must have been requested first so
    SoftHSM2 points at the session's temporary token directory.
    """
    label = label or f"{prefix}-{os.getpid()}-{next(_counter)}"
    so_pin, user_pin = Pin(secrets.token_hex(8)), Pin(secrets.token_hex(8))
    init_token_in_process(softhsm_module, label, so_pin, user_pin)
    return TestToken("softhsm2", label, so_pin, user_pin, softhsm_module.path,
                     env={"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]})


def _factory(softhsm_module, **defaults):
    made: list[TestToken] = []

    def make(label: str | None = None, **kwargs) -> TestToken:
        tt = new_softhsm_token(softhsm_module, label, **{**defaults, **kwargs})
        made.append(tt)
        return tt
    return make, made


@pytest.fixture
def softhsm_token_factory(softhsm_module):
    """Call it to get a fresh, empty SoftHSM2 token (with random PINs), opened and logged in."""
    make, made = _factory(softhsm_module)
    yield make
    for tt in made:
        tt.close()


@pytest.fixture(scope="session")
def softhsm_session_token_factory(softhsm_module):
    """The same, for tokens shared by a module or session (e.g. slow RSA-4096 provisioning)."""
    make, made = _factory(softhsm_module)
    yield make
    for tt in made:
        tt.close()


@pytest.fixture
def softhsm_token(softhsm_token_factory) -> TestToken:
    return softhsm_token_factory()


# ------------------------------------------------------------------ NSS softokn
@pytest.fixture(scope="session")
def nss_token(tmp_path_factory) -> Iterator[TestToken]:
    """The session's NSS softokn token: a fresh database, a random PIN, opened and logged in.

    Shared by every test of the session because softokn is initialised once per process with one
    database (its parameter string): give objects :func:`unique_label` labels.
    """
    from hsm.core import nss

    reason = nss.missing()
    if reason:
        pytest.skip(reason)
    db_dir = tmp_path_factory.mktemp("nssdb")
    user_pin = Pin(secrets.token_hex(8))
    nss.create_database(db_dir, user_pin)
    tt = TestToken("nss", nss.TOKEN_LABEL, None, user_pin, nss.MODULE_PATH,
                   parameters=nss.parameters(db_dir))
    _ = tt.token  # open and log in now, so a broken setup fails here and not inside a test
    yield tt
    tt.close()


@pytest.fixture(params=["softhsm2", "nss"], ids=["softhsm2", "nss"])
def hsm_token(request) -> TestToken:
    """Each backend in turn: a fresh SoftHSM2 token per test, or the session's shared NSS token.

    The fixtures are looked up lazily so a missing NSS skips only the ``nss`` variant.
    """
    if request.param == "softhsm2":
        return request.getfixturevalue("softhsm_token_factory")()
    return request.getfixturevalue("nss_token")


def unique_label(prefix: str) -> str:
    """A label no other test uses: NSS allows duplicate labels, which the layer refuses to pick."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"


def require_mechanism(test_token: TestToken, mechanism: int, why: str = "") -> None:
    """Skip the calling test unless the token lists ``mechanism`` (a Mechanism or raw int)."""
    if mechanism in test_token.token.p11token.slot.get_mechanisms():
        return
    try:
        name = pkcs11.Mechanism(mechanism).name
    except ValueError:
        name = "vendor/unnamed mechanism"
    pytest.skip(f"{test_token.backend} token {test_token.label!r} does not offer {name} "
                f"(0x{int(mechanism):x})" + (f": {why}" if why else ""))
