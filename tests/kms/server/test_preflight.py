"""A server says "listening" only when it can serve: `kms serve` and `kms keyservice serve` check
their TLS files and their address first, and each mistake is one line naming the setting and the
file, exit 2, with nothing announced. No token is needed: every refusal comes before one is
opened (a node once printed "listening" and died in its worker with a traceback)."""

from __future__ import annotations

import socket

import pytest

from kms.server.pki import Authority
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight-tls")
    ca = Authority.create("preflight CA")
    ca.save(root)
    cert, key = ca.server(root, "server")
    other_cert, other_key = ca.server(root, "other")
    return {"root": root, "ca": root / "ca.pem", "cert": cert, "key": key,
            "other_key": other_key}


def node_toml(tmp_path, tls, **service) -> str:
    values = {"host": "127.0.0.1", "port": 0, "certificate": tls["cert"],
              "private_key": tls["key"], "client_ca": tls["ca"], **service}
    path = tmp_path / "node.toml"
    path.write_text('region = "eu"\ntoken = "no-token-needed"\nprimary_certificate = "p.pem"\n'
                    'bundle_dir = "bundles"\nstore = "kms.db"\n\n[service]\n'
                    + "".join(f'{k} = "{v}"\n' if isinstance(v, (str, type(tls["ca"])))
                              else f"{k} = {v}\n" for k, v in values.items())
                    # the officers a node pins (it refuses to load without them)
                    + '\n[[officers]]\nfrom_release = "1"\nm = 1\nkeys = { alice = "'
                    + "ab" * 32 + '" }\n')
    return str(path)


def refused(proc, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert "listening" not in proc.stdout + err and "serving" not in err, (proc.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_kms_serve_checks_port_address_and_tls_files_before_listening(tls, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        cases = [
            ({"port": port}, ("already in use", f"127.0.0.1:{port}")),
            ({"host": "192.0.2.1"}, ("192.0.2.1 is not an address of this host",)),
            ({"host": "no-such-host.invalid"}, ("not an address or a name",)),
            ({"certificate": tls["key"]}, ("service.certificate", "holds no PEM certificate",
                                           "it is a private key")),
            ({"private_key": tls["other_key"]}, ("service.private_key", "is not the key of "
                                                 "service.certificate")),
            ({"client_ca": tls["root"] / "missing-ca.pem"}, ("service.client_ca",
                                                            "missing-ca.pem does not exist")),
            ({"client_ca": tls["key"]}, ("service.client_ca", "holds no usable CA")),
        ]
        for service, needles in cases:
            d = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
            d.mkdir()
            config = node_toml(d, tls, **service)
            refused(run_cli("kms", "--config", config, "serve", timeout=60), *needles)
        refused(run_cli("kms", "--config", node_toml(tmp_path, tls), "serve", "--port",
                        "99999", timeout=60), "--port 99999 is not a TCP port")
    finally:
        busy.close()


def test_keyservice_refuses_a_file_as_its_key_directory_and_bad_tls(tls, tmp_path):
    base = ["keyservice", "serve", "--cert", tls["cert"], "--key", tls["key"], "--port", "0"]
    refused(run_cli("kms", *base, "--keys", "/etc/hostname", timeout=60),
            "--keys /etc/hostname is not a directory")
    refused(run_cli("kms", "keyservice", "serve", "--keys", tmp_path, "--cert", tls["key"],
                    "--key", tls["key"], "--port", "0", timeout=60),
            "--cert", "holds no PEM certificate")
