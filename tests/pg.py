"""A throw-away PostgreSQL server for the tests, from Debian's own packages (no Docker, no mocks).

``start()`` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin`` (or
``$PG_BINDIR``) in a fresh directory under /tmp: the server listens on 127.0.0.1 only, on a free
port, with its unix socket inside that directory, and trusts connections from 127.0.0.1 only (it
holds nothing but test data and lives for one test session). As root it runs as the ``postgres``
system user through ``runuser -u postgres --`` (the server refuses to run as root); otherwise as
the current user. ``stop()`` shuts it down (``pg_ctl stop -m immediate``: no shutdown checkpoint
for data about to be deleted) and removes the directory; an ``atexit`` hook does the same if a
session ends without calling it.

The conftest fixture ``postgresql_server`` starts one per test session; when the binaries are
missing it skips, naming the package to install (``make test`` installs it).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PREFERRED_VERSION = "15"
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
                "apt-get install postgresql (`make test` installs it)")


class PostgresUnavailable(Exception):
    """The server cannot run here for a reason the caller may turn into a skip."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: $PG_BINDIR, Debian's
    /usr/lib/postgresql/<version>/bin (15 first, then the newest), or initdb on PATH."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if (p / "bin").is_dir()),
                          key=lambda p: (p.name != PREFERRED_VERSION,
                                         -int(p.name) if p.name.isdigit() else 0))
        candidates += [p / "bin" for p in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root: Path | None = None
        self.port: int | None = None
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0
        self._running = False
        self.version = ""

    # ------------------------------------------------------------------ process helpers
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root or "/", check=False)

    def _check(self, what: str, proc: subprocess.CompletedProcess) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"PostgreSQL test server: {what} failed "
                               f"(exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}"
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.root / "server.log" if self.root else None
        if log and log.exists():
            return "\n--- server.log (tail) ---\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-20:])
        return ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostgresServer:
        if self._as_postgres:
            try:
                import pwd
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("no `postgres` system user to run the server as; "
                                          "apt-get install postgresql creates it") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("runuser (util-linux) is missing")
        # Directly under /tmp: pytest's own temp root is 0700 root, which postgres cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="hsm-suite-pg-"))
        os.chmod(self.root, 0o700)
        if self._as_postgres:
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        atexit.register(self.stop)
        data, sock = self.root / "data", self.root / "sock"
        self._check("mkdir", self._run("mkdir", "-m", "0700", sock))
        self._check("initdb", self._run(
            self.bindir / "initdb", "-D", data, "-U", self.user, "-E", "UTF8", "--no-locale",
            "--auth-local=trust", "--auth-host=reject", "--no-sync"))
        # Trust only this loopback address (and the private socket directory); reject the rest.
        hba = ("local all all trust\n"
               "host all all 127.0.0.1/32 trust\n"
               "host all all 0.0.0.0/0 reject\n"
               "host all all ::/0 reject\n")
        self._check("write pg_hba.conf", subprocess.run(
            (["runuser", "-u", "postgres", "--"] if self._as_postgres else [])
            + ["tee", str(data / "pg_hba.conf")], input=hba, capture_output=True, text=True,
            check=False))
        last = None
        for _ in range(5):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                    f"-c unix_socket_directories={sock} -c max_connections=200 "
                    f"-c shared_buffers=32MB -c log_min_messages=warning")
            proc = self._run(self.bindir / "pg_ctl", "-D", data, "-l", self.root / "server.log",
                             "-w", "-t", "60", "-o", opts, "start")
            if proc.returncode == 0:
                self._running = True
                break
            last = proc
            if "could not bind" not in self._log_tail() and "in use" not in self._log_tail():
                break
        if not self._running:
            self._check("pg_ctl start", last)
        self.version = self._version()
        return self

    def restart(self) -> None:
        """Stop (fast: connections are cut, as in a failover) and start again on the same port
        (pg_ctl reuses the options the server was started with)."""
        self._check("pg_ctl restart", self._run(
            self.bindir / "pg_ctl", "-D", self.root / "data", "-l", self.root / "server.log",
            "-m", "fast", "-w", "-t", "60", "restart"))

    def _version(self) -> str:
        out = subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True,
                             text=True, check=False).stdout
        m = re.search(r"(\d+(\.\d+)?)", out)
        return m.group(1) if m else out.strip()

    def stop(self) -> None:
        if self.root is None:
            return
        if self._running:
            # immediate: no shutdown checkpoint, the data directory is deleted right after
            self._run(self.bindir / "pg_ctl", "-D", self.root / "data", "-m", "immediate", "-w",
                      "-t", "60", "stop")
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # ------------------------------------------------------------------ databases
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start() -> PostgresServer:
    """Start a server, or raise PostgresUnavailable (binaries, user or driver missing)."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(INSTALL_HINT)
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("the psycopg driver is missing: pip install "
                                  "'psycopg[binary]' (it is a dependency of hsm-suite)")
    server = PostgresServer(bindir)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise

