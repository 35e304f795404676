"""What the XKS tests share: a token with XKS keys, TLS material, secrets in files and the
environment, an ``[xks]``-only node TOML and a real ``kms --config XKS.toml serve`` process on
127.0.0.1 (started and stopped by the tests, bounded in time). Requests are signed by botocore
(``kms.xks.client``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kms.server.pki import Authority
from kms.xks.client import XksClient
from tests.service_kit import _toml_value as _toml

AWS_CN = "cks.kms.us-east-1.amazonaws.com"
REGION = "us-east-1"
MONITOR_CN = "monitor.test"


def access_key_id() -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return "".join(secrets.choice(alphabet) for _ in range(24))


def secret_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Cred:
    access_key_id: str
    secret: str
    source: str         # what the TOML says: env:VAR or file:PATH


@dataclass
class Tls:
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def context(self, who: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if who is not None:
            ctx.load_cert_chain(*map(str, self.clients[who]))
        return ctx


def make_tls(root: Path) -> Tls:
    root.mkdir(parents=True, exist_ok=True)
    ca = Authority.create("xks test CA")
    ca.save(root)
    tls = Tls(root / "ca.pem", ca.server(root, "server"))
    tls.clients["aws"] = ca.write(root, "aws", *ca.issue(AWS_CN))
    tls.clients["other-cn"] = ca.write(root, "other-cn",
                                       *ca.issue("cks.kms.eu-west-1.amazonaws.com"))
    tls.clients["monitor"] = ca.write(root, "monitor", *ca.issue(MONITOR_CN))
    other = Authority.create("not AWS")      # the right CN from a CA client_ca does not hold
    tls.clients["other-ca"] = other.write(root, "other-ca", *other.issue(AWS_CN))
    return tls


class XksNode:
    def __init__(self, proc: subprocess.Popen, config: Path, tls: Tls, log: Path):
        self.proc, self.config, self.tls, self.log = proc, config, tls, log
        self.port = 0
        self.lines: list[str] = []

    def wait(self, workers: int = 1, timeout: float = 60) -> None:
        line = self.proc.stdout.readline()
        if not line.startswith("kms: listening on "):
            self.kill()
            raise AssertionError(f"xks node did not start: {line!r}\n{self.stderr()}")
        self.port = int(line.split()[3].rsplit(":", 1)[1])
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while sum(1 for x in self.lines if " serving on port " in x) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"xks node not serving:\n{self.stderr()}")
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def base(self, prefix: str = "") -> str:
        return f"https://localhost:{self.port}{prefix}/kms/xks/v1"

    def client(self, prefix: str, cred: Cred, *, who: str | None = None,
               region: str = REGION) -> XksClient:
        return XksClient(self.base(prefix), cred.access_key_id, cred.secret, region,
                         context=self.tls.context(who))

    def audit(self) -> list[dict]:
        time.sleep(0.2)     # the writer thread fsyncs every audit_batch_ms (50)
        path = self.config.parent / "audit" / "audit-w0.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("xks node did not drain")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


def xks_section(token_label: str, tls: Tls, keystores: list[dict], **top) -> str:
    """The ``[xks]`` table. ``keystores``: dicts of the key store's fields plus ``credentials``
    ([Cred]) and ``rules`` (list of dicts)."""
    xks = {"token": token_label, "pin_source": "env:HSM_PIN", "host": "127.0.0.1", "port": 0,
           "certificate": str(tls.server[0]), "private_key": str(tls.server[1]),
           "client_ca": str(tls.ca), "audit_dir": "audit", **top}
    lines = ["[xks]"] + [f"{k} = {_toml(v)}" for k, v in xks.items()]
    for ks in keystores:
        lines += ["", "[[xks.keystores]]"] + [f"{k} = {_toml(v)}" for k, v in ks.items()
                                              if k not in ("credentials", "rules")]
        for c in ks["credentials"]:
            lines += ["[[xks.keystores.credentials]]", f"access_key_id = {_toml(c.access_key_id)}",
                      f"secret_source = {_toml(c.source)}"]
        for r in ks.get("rules", []):
            lines += ["[[xks.keystores.rules]]"] + [f"{k} = {_toml(v)}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


def write_config(root: Path, token_label: str, tls: Tls, keystores: list[dict],
                 **top) -> Path:
    """An ``[xks]``-only node configuration in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "xks.toml"
    path.write_text(xks_section(token_label, tls, keystores, **top))
    return path


def file_cred(root: Path) -> Cred:
    """A credential whose secret is in a 0600 file next to the configuration."""
    c = Cred(access_key_id(), secret_key(), "")
    path = root / "secrets" / c.access_key_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(c.secret + "\n")
    path.chmod(0o600)
    c.source = f"file:secrets/{c.access_key_id}"
    return c


def env_cred(env: dict) -> Cred:
    c = Cred(access_key_id(), secret_key(), "")
    var = f"XKS_SECRET_{c.access_key_id}"
    env[var] = c.secret
    c.source = f"env:{var}"
    return c


def start(config: Path, tls: Tls, env: dict, *, workers: int | None = None) -> XksNode:
    args = [sys.executable, "-m", "kms", "--config", str(config), "serve", "--port", "0"]
    if workers is not None:
        args += ["--workers", str(workers)]
    log = config.parent / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                stdin=subprocess.DEVNULL, cwd=config.parent,
                                start_new_session=True)
    node = XksNode(proc, config, tls, log)
    node.wait(workers or 1)
    return node
