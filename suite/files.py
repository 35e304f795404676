"""Output files are created, never overwritten: O_CREAT|O_EXCL, written to a temporary name in the
same directory, fsynced, then linked into place so a crash leaves either no file or a whole one."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from suite.errors import UsageError

__all__ = ["check_writable", "read_regular", "replace", "write_new", "write_set"]


UNWRITABLE_HINT = "choose a writable directory with free space, or fix this one"


def _cannot(what: str, path: Path, exc: OSError, hint: str = UNWRITABLE_HINT) -> UsageError:
    return UsageError(f"cannot {what} {path}: {exc.strerror or exc}", hint=hint)


def check_writable(directory: Path, *, what: str = "output directory") -> None:
    """Refuse, *before* any key is made, an output directory nobody can create files in
    (read-only, not a directory, no permission): the nearest existing ancestor must take a
    probe file. A full disk can still fail a later write; :func:`write_set` then undoes it."""
    directory = Path(directory)
    probe_in = directory
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UsageError(f"the {what} {directory}: {probe_in} is not a directory",
                         hint=UNWRITABLE_HINT + "; nothing was made")
    probe = probe_in / f".write-probe.{os.getpid()}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise _cannot(f"write the {what}", directory, exc,
                      UNWRITABLE_HINT + "; nothing was made") from None


def write_set(directory: Path, files: dict[str, bytes], mode: int = 0o644) -> list[Path]:
    """Write several new files into ``directory``: all of them or none. A failure (full disk,
    an existing name) removes the files this call wrote and the directory if it made it."""
    directory = Path(directory)
    made_dir = not directory.exists()
    written: list[Path] = []
    try:
        for name, data in files.items():
            written.append(write_new(directory / name, data, mode))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return written


def write_new(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Create ``path`` with ``data``; refuse if it exists. Atomic: readers see all or nothing.
    A directory or disk that refuses the write is a :class:`UsageError` naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot("create the directory", path.parent, exc) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise _cannot("write", path, exc) from None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # ENOSPC, EDQUOT, EIO: the temporary goes, nothing is left
            raise _cannot("write", path, exc) from None
        try:
            os.link(tmp, path)  # fails with EEXIST instead of replacing, unlike rename()
        except FileExistsError:
            raise UsageError(f"{path} already exists; outputs are never overwritten",
                             hint="move it away or choose another --out directory") from None
        except OSError as exc:
            raise _cannot("write", path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in ``directory`` survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename, directory
    fsync): a reader sees the old file or the new one, never a mix. For the one file kind that
    grows in place, a bundle its officers countersign; every other output is write-once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def read_regular(path: Path, max_bytes: int, *, what: str = "file") -> bytes:
    """Read a regular file of at most ``max_bytes``. A FIFO, a device (a link to /dev/zero), a
    directory or an oversized file is refused without blocking or reading it whole: the open is
    non-blocking and the type is checked on the opened descriptor, so a swap after a check
    cannot slip a FIFO in."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file (a FIFO, device or directory); "
                             f"refused as a {what}", hint="remove it or replace it with the "
                                                          "file itself")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UsageError(f"{path} is larger than {max_bytes} bytes; refused as a {what}",
                         hint="it is not one; remove it")
    return data
