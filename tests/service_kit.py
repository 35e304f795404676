"""What the service tests share: one release ceremony, TLS material, and real `kms serve`
processes on 127.0.0.1 (started and stopped by the tests, each bounded in time).

``ServiceKit.node(...)`` writes a node TOML with a ``[service]`` section and starts
``python -m kms --config NODE.toml serve --port 0`` as a subprocess; it reads the bound port
from the first line the process prints and waits (bounded) until ``/readyz`` answers 200.
``Node.stop()`` sends SIGTERM and waits for exit 0; ``Node.kill()`` is SIGKILL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ceremony import plan as plans
from kms.server.pki import Authority
from tests.ceremony_kit import make_kit

DATA_ID = "spiffe://test/encryption-service"
ADMIN_ID = "spiffe://test/admin"
ACME_ID = "spiffe://test/acme-only"       # data plane, orgs acme-*, field keys only
STATUS_ID = "monitor.test"                 # a DNS SAN
CN_ID = "cn-only-client"                   # no SAN at all: the CN names it
DEFAULT_CLIENTS = [
    {"identity": DATA_ID, "roles": ["data"], "orgs": ["*"]},
    {"identity": ADMIN_ID, "roles": ["admin"], "orgs": ["*"]},
    {"identity": ACME_ID, "roles": ["data"], "orgs": ["acme-*"], "key_types": ["field"]},
    {"identity": "dns:" + STATUS_ID, "roles": ["status"]},
    {"identity": "cn:" + CN_ID, "roles": ["data"], "orgs": ["cn-*"]},
]
_n = itertools.count()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


@dataclass
class Tls:
    dir: Path
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def context(self, who: str | None = "data", *, ca: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca or self.ca))
        if who is not None:
            ctx.load_cert_chain(*map(str, self.clients[who]))
        return ctx


def make_tls(root: Path) -> Tls:
    root.mkdir(parents=True, exist_ok=True)
    ca = Authority.create("test service CA")
    ca.save(root)
    tls = Tls(root, root / "ca.pem", ca.server(root, "server"))
    for who, ident in (("data", DATA_ID), ("admin", ADMIN_ID), ("acme", ACME_ID),
                       ("unauthorised", "spiffe://test/nobody")):
        tls.clients[who] = ca.client(root, who, uri=ident)
    tls.clients["status"] = ca.write(root, "status", *ca.issue("monitor", dns=(STATUS_ID,)))
    tls.clients["cn"] = ca.client(root, CN_ID)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    tls.clients["expired"] = ca.write(root, "expired", *ca.issue(
        "expired", uris=(DATA_ID,), not_before=past, days=1))
    other = Authority.create("some other CA")
    tls.clients["other-ca"] = other.write(root, "other-ca", *other.issue(
        "other", uris=(DATA_ID,)))
    return tls


class Node:
    def __init__(self, proc: subprocess.Popen, config: Path, tls: Tls, log: Path):
        self.proc, self.config, self.tls, self.log = proc, config, tls, log
        self.port: int | None = None
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 30) -> None:
        line = self.proc.stdout.readline()
        if not line.startswith("kms: listening on "):
            self.kill()
            raise AssertionError(f"node did not start: {line!r}\n{self.stderr()}")
        self.port = int(line.split()[3].rsplit(":", 1)[1])
        self._reader.start()

    def wait_ready(self, timeout: float = 90, workers: int = 1) -> None:
        """Poll /readyz until every worker said it serves and one answers 200 (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}:\n{self.stderr()}")
            serving = sum(1 for line in self.lines if line.endswith(" serving"))
            if serving >= workers:
                try:
                    status, _ = self.call("GET", "/readyz")
                    if status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        self.dump_stacks()
        self.kill()
        raise AssertionError(f"node not ready within {timeout} s (stdout: {self.lines}):\n"
                             f"{self.stderr()}")

    def dump_stacks(self) -> None:
        """SIGUSR1 to the node's process group: every process prints its threads' stacks."""
        try:
            os.killpg(self.proc.pid, signal.SIGUSR1)
            time.sleep(1)
        except ProcessLookupError:
            pass

    def call(self, method: str, path: str, body=None, *, who: str | None = "data",
             raw: bytes | None = None, headers: dict | None = None, timeout: float = 30):
        """One request on a fresh connection; returns (status, parsed JSON or text)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                           context=self.tls.context(who))
        try:
            payload = raw if raw is not None else (json.dumps(body).encode()
                                                   if body is not None else None)
            conn.request(method, path, body=payload, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            self.last_headers = resp.headers
            return resp.status, (json.loads(data) if "json" in ctype else data.decode())
        finally:
            conn.close()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"node did not drain within {timeout} s")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the node's whole process group (its workers die with it in any case)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


class ServiceKit:
    def __init__(self, kit, release, tls: Tls, root: Path):
        self.kit, self.release, self.tls, self.root = kit, release, tls, root
        self.nodes: list[Node] = []

    def config(self, *, store: str | None = None, clients=None, workers: int = 1,
               audit: bool = True, **limits) -> Path:
        n = next(_n)
        d = self.root / f"node-{n}"
        d.mkdir()
        regional = self.kit.regionals["eu"]
        top = {"region": "eu", "token": regional.label, "pin_source": "env:HSM_PIN",
               "primary_certificate": str(self.kit.pki / f"{self.kit.primary.label}-signing.pem"),
               "bundle_dir": str(self.release.output_dir),
               "store": store or str(self.root / "shared-eu.db"), "pbkdf2_iterations": 50}
        service = {"host": "127.0.0.1", "port": 0, "workers": workers,
                   "certificate": str(self.tls.server[0]), "private_key": str(self.tls.server[1]),
                   "client_ca": str(self.tls.ca), **limits}
        if audit:
            service["audit_dir"] = str(d / "audit")
        lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
        lines += ["", "[service]"] + [f"{k} = {_toml_value(v)}" for k, v in service.items()]
        for c in (DEFAULT_CLIENTS if clients is None else clients):
            lines += ["", "[[service.clients]]"] + [f"{k} = {_toml_value(v)}"
                                                     for k, v in c.items()]
        path = d / "node.toml"
        path.write_text("\n".join(lines) + "\n" + self.kit.pins_toml())
        return path

    @contextlib.contextmanager
    def local_node(self, config: Path):
        """An in-process node on the same token and store as ``config``: the expected DEKs."""
        from kms.node import config as configs
        from kms.node.node import Kms
        kms = Kms(configs.load(config), pin=self.kit.regionals["eu"].user_pin)
        kms.start()
        try:
            yield kms
        finally:
            kms.close()

    def env(self) -> dict:
        return {**os.environ, **self.kit.regionals["eu"].env,
                "HSM_PIN": self.kit.regionals["eu"].user_pin.reveal()}

    def start(self, config: Path, *, workers: int | None = None, wait: bool = True) -> Node:
        args = [sys.executable, "-m", "kms", "--config", str(config), "serve", "--port", "0"]
        if workers is not None:
            args += ["--workers", str(workers)]
        log = config.parent / f"stderr-{next(_n)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env=self.env(), stdin=subprocess.DEVNULL,
                                    cwd=config.parent, start_new_session=True)
        node = Node(proc, config, self.tls, log)
        self.nodes.append(node)
        node.wait_listening()
        if wait:
            node.wait_ready(workers=workers or 1)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def node_fixtures(config):
    """Module-scoped ``node`` and ``local`` fixtures: ``node`` is one real ``kms serve`` on
    ``config(service_kit)`` (a config path), killed after the module; ``local`` an in-process
    node of the same region on the same store (the expected DEKs). In a module:
    ``node, local = node_fixtures(lambda kit: kit.config(...))``."""
    import pytest

    @pytest.fixture(scope="module")
    def node(service_kit):
        n = service_kit.start(config(service_kit))
        yield n
        n.kill()

    @pytest.fixture(scope="module")
    def local(service_kit, node):
        """An in-process node of the same region on the same store: the expected DEKs."""
        with service_kit.local_node(node.config) as kms:
            yield kms
    return node, local


def make_service_kit(root: Path, make_token) -> ServiceKit:
    kit = make_kit(root / "kit", make_token, regions=("eu",))
    plan_path = kit.write_plan()
    kit.open_and_approve(plan_path)
    proc = kit.cli("run", plan_path, "--env", kit.env_file())
    assert proc.returncode == 0, proc.stderr
    release = plans.load(plan_path)
    kit.countersign(release.output_dir)
    return ServiceKit(kit, release, make_tls(root / "tls"), root)
