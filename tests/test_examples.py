"""The files in examples/ are valid: each is parsed with the loader the suite itself uses, and the
annotated ones name every key their format has, so a new key without an example fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ceremony import environment, plan
from kms.node import config
from kms.customer_keys import reference_service
from kms.server import settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _keys_shown(path: Path) -> set[str]:
    """Every `key =` the file shows, set or commented out (`# key = ...`)."""
    return set(re.findall(r"^\s*(?:#\s*)?([a-z0-9_]+)\s*=", path.read_text(), re.M))


def test_release_plan_is_a_valid_plan():
    p = plan.load(EXAMPLES / "release-plan.toml")
    assert (p.type, p.release, p.quorum, p.practice) == ("release-secrets", "2", 2, False)
    assert [o.name for o in p.officers] == ["alice", "bob", "carol"]
    assert [r.name for r in p.regions] == ["eu", "us"]
    assert [(s.name, s.type) for s in p.secrets] == [("kdf-seed", "hmac-sha256-seed"),
                                                     ("tenant-wrapping-key", "aes-256")]
    assert p.primary_signing_certificate == EXAMPLES / ".." / "pki" / "primary-signing.pem"


def test_ceremony_environment_is_valid_and_shows_every_key():
    env = environment.load(EXAMPLES / "ceremony-env.toml")
    assert env.primary_token == "primary"
    assert env.user_pin_source == "env:HSM_PIN_PRIMARY"
    assert env.so_pin_source == "env:HSM_SO_PIN_PRIMARY"
    assert _keys_shown(EXAMPLES / "ceremony-env.toml") == set(environment._FIELDS)


def test_node_configuration_is_valid_and_comments_every_key():
    path = EXAMPLES / "kms-node.toml"
    cfg = config.load(path)
    assert (cfg.region, cfg.token, cfg.store) == (
        "eu", "regional-eu", f"sqlite:///{(EXAMPLES / 'kms-eu.db').resolve()}")
    assert cfg.service is not None and cfg.service.workers == 2
    assert [c.name for c in cfg.service.clients] == [("uri", "spiffe://acme/encryption-service"),
                                                     ("dns", "ops.acme.example")]
    assert cfg.service.clients[1].roles == {"admin"}
    # Every key of the three tables, shown; and every line that sets one says what it is.
    known = (set(config._FIELDS) - {"service", "officers"}) | \
        (set(settings._FIELDS) - {"clients"}) | set(settings._CLIENT_FIELDS) | \
        {"from_release", "m", "keys"}  # an [[officers]] set (release.quorum)
    assert cfg.officers is not None and cfg.officers.sets[0].m == 2
    assert _keys_shown(path) == known
    data = tomllib.loads(path.read_text())
    assert set(data["service"]) - {"clients"} == set(settings._FIELDS) - {"clients"}
    uncommented = [line for line in path.read_text().splitlines()
                   if re.match(r"^[a-z0-9_]+\s*=", line) and "#" not in line]
    assert uncommented == []


def test_keyservice_key_directory_is_what_the_key_service_reads():
    keys = EXAMPLES / "keyservice-keys"
    kids = sorted(p.stem for p in keys.glob("*.dek"))
    assert kids == sorted(p.stem for p in keys.glob("*.pem")) == ["acme-prod-2026-12"]
    dek, cert = reference_service.read_key(keys, kids[0])
    assert dek == b"EXAMPLE-DEK-not-a-secret-do-not-"
    # The answer the service would give: a compact JWE to the certificate's RSA key.
    jwe = reference_service.make_jwe(dek, cert, kids[0], "0" * 32)
    assert jwe.count(".") == 4
