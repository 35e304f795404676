"""A KMS node whose TOML also has ``[xks]``: one ``kms serve``, two listeners in each worker. The
KMS listener keeps mandatory client certificates and its routes; the XKS listener asks for no
certificate and serves only the XKS routes; both share the regional token's login."""

from __future__ import annotations

import http.client
import re
import ssl
import time

import pytest

from hsm.keys import xks as xkeys
from kms.server.audit import verify
from tests import xks_kit as kit


def _xks_port(node, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in node.lines:
            m = re.match(r"kms: xks worker 0 serving on port (\d+)$", line)
            if m:
                return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no XKS listener line in {node.lines}")


def test_kms_node_with_an_xks_listener_beside_it(service_kit, tmp_path, monkeypatch):
    regional = service_kit.kit.regionals["eu"]
    xkeys.create(regional.token, "beside")
    tls = kit.make_tls(tmp_path / "xks-tls")
    env: dict = {}
    cred = kit.env_cred(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)       # the node inherits it through service_kit.env()
    config = service_kit.config()
    with open(config, "a") as f:
        f.write("\n" + kit.xks_section(regional.label, tls, [
            {"name": "beside", "path_prefix": "/beside", "region": kit.REGION,
             "keys": ["beside"], "credentials": [cred]}], audit_dir="audit-xks"))
    node = service_kit.start(config)
    try:
        port = _xks_port(node)
        xks = kit.XksNode(node.proc, config, tls, node.log)
        xks.port = port
        client = xks.client("/beside", cred)           # no client certificate
        status, enc = client.encrypt("beside", b"next to the KMS", b"aad")
        assert status == 200, enc
        assert client.decrypt("beside", enc, b"aad")[0] == 200
        client.base = f"https://localhost:{port}"      # a KMS route on the XKS listener
        assert client.post("/v1/dek", {"org": "x"})[0] == 404
        client.close()
        # the KMS listener: its routes with a client certificate, none without one
        assert node.call("GET", "/readyz")[0] == 200
        assert node.call("POST", "/beside/kms/xks/v1/health", {}, who="data")[0] == 404
        conn = http.client.HTTPSConnection("127.0.0.1", node.port,
                                           context=service_kit.tls.context(None))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/healthz")
            conn.getresponse()
        conn.close()
    finally:
        assert node.stop() == 0
    assert verify(config.parent / "audit-xks" / "audit-w0.jsonl")[1] is None
    assert verify(config.parent / "audit" / "audit-w0.jsonl")[1] is None


def test_one_audit_directory_for_both_listeners_is_refused(service_kit, tmp_path, monkeypatch):
    from kms.node import config as configs
    from kms.errors import ConfigError
    from kms.xks import worker
    tls = kit.make_tls(tmp_path / "xks-tls")
    env: dict = {}
    cred = kit.env_cred(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = service_kit.config()
    with open(config, "a") as f:
        f.write("\n" + kit.xks_section("t", tls, [
            {"name": "b", "region": kit.REGION, "keys": ["k"], "credentials": [cred]}],
            audit_dir="audit"))
    with pytest.raises(ConfigError, match="own audit_dir"):
        worker.beside(configs.load(config))


def test_the_nodes_other_commands_do_not_need_the_xks_secrets(service_kit, tmp_path):
    """`kms --config NODE.toml tenant ...` loads the TOML without reading the SigV4 secrets (the
    [xks] table is still checked strictly); `serve` reads them and says which one is missing."""
    from kms.node import config as configs
    from kms.errors import ConfigError
    from kms.xks import worker
    tls = kit.make_tls(tmp_path / "xks-tls")
    cred = kit.Cred(kit.access_key_id(), kit.secret_key(), "env:XKS_SECRET_NOT_SET_HERE")
    config = service_kit.config()
    with open(config, "a") as f:
        f.write("\n" + kit.xks_section("t", tls, [
            {"name": "b", "region": kit.REGION, "keys": ["k"], "credentials": [cred]}],
            audit_dir="audit-xks"))
    cfg = configs.load(config)
    assert cfg.xks is not None and cfg.xks.keystores[0].credentials[0].secret is None
    with pytest.raises(ConfigError, match="XKS_SECRET_NOT_SET_HERE"):
        worker.beside(cfg)
