"""One ceremony at a time: exclusive locks on the plan, the output directory and the primary token.

Two runs of one plan at once could both journal steps (two "closed" transcripts with different
heads) and generate two seeds under one label; two *different* plans on one primary race for its
release record. So a run holds three ``flock`` locks for as long as it touches anything:

- the plan file itself,
- the output directory itself (a directory can be flocked; no lock file to leave behind),
- the primary token, named by module and token serial, as a file in a per-user lock directory.

``flock`` locks belong to the open file, so the kernel drops them when the process dies however it
dies (SIGKILL included): a killed run never leaves a stale lock, and ``ceremony run`` resumes at
once. A second run is refused at once with one line; it never waits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import CeremonyError

BUSY_HINT = ("wait until that run ends (or stop it); a run that was killed releases its lock "
             "at once, and `ceremony run PLAN` then resumes it")


class CeremonyBusy(CeremonyError):
    """Another ceremony run holds the plan, the output directory or the primary token."""


def lock_dir() -> Path:
    """This user's directory for token locks (0700, owned by us: nobody else can pre-create or
    swap a lock file to block or fake a run)."""
    # A fixed place, not $TMPDIR: two runs with different TMPDIRs must find the same lock.
    path = Path("/tmp") / f"hsm-suite-locks-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CeremonyError(f"{path} is not a private directory of this user",
                            hint="remove it; it holds only ceremony lock files")
    return path


def _flock(fd: int, what: str) -> int:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CeremonyBusy(f"another ceremony run is using {what}", hint=BUSY_HINT) from None
        raise
    return fd


def _lock_path(path: Path, what: str) -> int:
    return _flock(os.open(path, os.O_RDONLY | os.O_CLOEXEC), what)


def token_key(module_path: str, serial: str, label: str) -> str:
    return f"{os.path.realpath(module_path)}\x00{serial}\x00{label}"


def _token_lock_path(key: str) -> Path:
    return lock_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")


def _lock_token(path: Path, label: str) -> int:
    """Lock the token's file. The holder removes it when it is done (no lock files pile up), so
    a lock taken on a file that was removed meanwhile is retried on the new one."""
    while True:
        fd = _flock(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600),
                    f"the primary token {label!r}")
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def exclusive(plan_path: Path, output_dir: Path,
              token: tuple[str, str, str] | None = None) -> Iterator[None]:
    """Hold the plan, the output directory and (when given as (module, serial, label)) the
    primary token for the block; refuse at once with :class:`CeremonyBusy` if another run
    holds any of them."""
    fds: list[int] = []
    token_file: Path | None = None
    try:
        fds.append(_lock_path(plan_path, f"the plan {plan_path}"))
        fds.append(_lock_path(output_dir, f"the output directory {output_dir}"))
        if token is not None:
            path = _token_lock_path(token_key(*token))
            fds.append(_lock_token(path, token[2]))
            token_file = path
        yield
    finally:
        if token_file is not None:  # removed while still held: see _lock_token
            with contextlib.suppress(FileNotFoundError):
                os.unlink(token_file)
        for fd in fds:
            os.close(fd)
