"""Helpers every test package uses: the CLI runner and the thread runner.

Written once here so that each test says only what it proves: how a `python -m hsm|ceremony|kms`
subprocess is started, and how threads are started, bounded and made to report their failures.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

PROGRAMS = ("hsm", "ceremony", "kms")


def run_cli(program: str, *args: Any, env: Mapping[str, str] | None = None,
            cwd: Path | str | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <program> <args>`` (each arg through ``str``) as a real subprocess.

    ``env`` is the child's whole environment (default: this process's); ``stdin`` is
    ``/dev/null`` unless ``input`` is given, so nothing can wait on a prompt; stdout and stderr
    are captured as text. The exit status is the caller's to assert.
    """
    if program not in PROGRAMS:
        raise ValueError(f"not one of the suite's programs: {program!r}")
    return subprocess.run([sys.executable, "-m", program, *map(str, args)],
                          capture_output=True, text=True, env=dict(env or os.environ),
                          cwd=cwd, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def environ(drop: Callable[[str], bool] = lambda name: False, **add: str) -> dict[str, str]:
    """This process's environment without the variables ``drop`` names, plus ``add``."""
    return {**{k: v for k, v in os.environ.items() if not drop(k)}, **add}


class Threads:
    """Threads started by :func:`start_threads`; :meth:`join` bounds the wait and re-raises."""

    def __init__(self, n: int, fn: Callable[..., Any], args: Iterable[tuple] | None = None,
                 name: str = "test-thread"):
        self.results: list[Any] = [None] * n
        self.errors: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()
        arg_list = list(args) if args is not None else [(i,) for i in range(n)]
        if len(arg_list) != n:
            raise ValueError(f"{n} threads but {len(arg_list)} argument tuples")

        def body(i: int, a: tuple) -> None:
            try:
                self.results[i] = fn(*a)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised by join()
                with self._lock:
                    self.errors.append((i, exc))

        # Daemon threads: one stuck thread fails its test (join) without hanging the session.
        self.threads = [threading.Thread(target=body, args=(i, a), daemon=True,
                                         name=f"{name}-{i}") for i, a in enumerate(arg_list)]
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 300) -> list[Any]:
        """Wait at most ``timeout`` seconds for all of them; then raise every thread's exception
        (one: itself; several: an ExceptionGroup), or fail naming the threads still running.
        Returns each thread's return value, by index."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        errors = sorted(self.errors, key=lambda e: e[0])
        if errors:
            if len(errors) == 1 and not alive:
                raise errors[0][1]
            raise ExceptionGroup(
                f"{len(errors)} of {len(self.threads)} threads failed"
                + (f"; still running after {timeout:.0f} s: {alive}" if alive else ""),
                [e for _, e in errors])
        assert not alive, f"threads still running after {timeout:.0f} s: {alive}"
        return self.results


def start_threads(n: int, fn: Callable[..., Any], *, args: Iterable[tuple] | None = None,
                  name: str = "test-thread") -> Threads:
    """Start ``n`` threads running ``fn(i)`` (or ``fn(*args[i])``); join them with ``.join()``."""
    return Threads(n, fn, args, name)


def run_threads(n: int, fn: Callable[..., Any], *, args: Iterable[tuple] | None = None,
                timeout: float = 300) -> list[Any]:
    """Run ``fn(i)`` for i in range(n) (or ``fn(*args[i])``) in ``n`` threads at once, wait at
    most ``timeout`` seconds, and re-raise every thread's exception; the return values by index."""
    return start_threads(n, fn, args=args).join(timeout)



# --------------------------------------------------------------------------- the hsm command
def run_hsm(tt, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m hsm`` for the test token ``tt`` (an hsm.testing.TestToken): no inherited
    ``HSM_*`` variable, the token's own environment, then ``env``."""
    child = environ(lambda k: k.startswith("HSM_"), **{**tt.env, **(env or {})})
    return run_cli("hsm", *args, env=child, timeout=timeout)


def assert_no_secrets(result: subprocess.CompletedProcess, *secret_values: str) -> None:
    for value in secret_values:
        assert value not in result.stdout, "a PIN appeared on stdout"
        assert value not in result.stderr, "a PIN appeared on stderr"


def assert_one_line_error(result: subprocess.CompletedProcess, program: str = "hsm") -> str:
    """The command failed with exactly one line on stderr, ``<program>: error: ...``."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"{program}: error:"), lines[0]
    return lines[0]


def secret_forms(secret: bytes) -> list[bytes]:
    """The forms a leaked secret would take in a file: raw, hex (both cases), base64, base64url
    (padded and not)."""
    import base64
    b64, url = base64.b64encode(secret), base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), b64, url,
            b64.rstrip(b"="), url.rstrip(b"=")]


def assert_secrets_absent(secrets: Iterable[bytes], paths: Iterable[Path | str]) -> int:
    """No secret, in any of :func:`secret_forms`, is in any of the files; returns how many
    files were read (so a caller can assert it looked at something)."""
    forms = [(s, f) for s in secrets for f in secret_forms(s)]
    read = 0
    for path in paths:
        data = Path(path).read_bytes()
        read += 1
        for _secret, form in forms:
            assert form not in data, f"secret material found in {path}"
    return read


# --------------------------------------------------------------------------- certificates
def self_signed_pem(private_key, common_name: str, hash_algorithm) -> bytes:
    """A PEM certificate of ``private_key``'s public key, self-signed with it (``hash_algorithm``,
    e.g. ``hashes.SHA256()``), subject and issuer ``CN=<common_name>``, serial 1, valid from now
    for one day."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private_key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(private_key, hash_algorithm))
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- unwritable outputs
@contextlib.contextmanager
def small_filesystem(path: Path, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs mounted at ``path``: read-only, or writable but full (a filler file takes
    every block; creating an empty file still works, writing a byte does not). Needs the mount
    privilege (root, as `make test` runs on the project's Debian machine); skips saying so
    otherwise. Unmounted at the end."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    options = "ro,size=64k" if read_only else "size=64k"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to play a read-only or full disk: "
                    f"{mounted.stderr.strip()}")
    try:
        if not read_only:
            with open(path / ".filler", "wb", buffering=0) as fh:
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * 4096)
                        fh.flush()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def recording_listener() -> Iterator[tuple[str, list[bytes]]]:
    """A plain-TCP listener on 127.0.0.1 that records every byte anyone sends it: the target of
    a hostile redirect, to prove that nothing (no credential, no signed request) reaches it.
    Yields its ``http://`` base URL and the list of what it received; closed on exit."""
    import socket
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    received.append(conn.recv(65536))
    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", received
    finally:
        stop.set()
        recorder.join(5)
        listener.close()
