"""Output files are created, never overwritten: O_CREAT|O_EXCL, written to a temporary name in the
same directory, fsynced, then linked into place so a crash leaves either no file or a whole one."""

from __future__ import annotations

import os
from pathlib import Path

from suite.errors import UsageError

__all__ = ["write_new"]


def write_new(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Create ``path`` with ``data``; refuse if it exists. Atomic: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails with EEXIST instead of replacing, unlike rename()
        except FileExistsError:
            raise UsageError(f"{path} already exists; outputs are never overwritten",
                             hint="move it away or choose another --out directory") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
