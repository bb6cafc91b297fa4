"""One job per output folder: an exclusive lock on ``OUT_DIR/.dtop-export.lock`` for as long as a job writes there.

The lock is the kernel's (``flock``): it is released when the job exits in any way, SIGKILL and a crashed node
included, so a lock is never stale; the file itself stays (removing it would let a third job lock a fresh file
while a second still holds the old one). While held, the file names its holder (process id, host, command,
start time), and a second job refuses in one line that quotes it. A file system without locks is refused in one
line; on a system without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dtop_export.errors import DToPError

LOCK_NAME = ".dtop-export.lock"


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["dtop-export", *sys.argv[1:]]) if sys.argv else "",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_holder(text: str) -> str:
    """``pid 123 on host, since 12:00:00 (dtop-export embed ...)`` from a lock file's content."""
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['started']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has just started)"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "job") -> Iterator[Path]:
    """Hold the lock of ``folder`` (which must exist) for the body; a :class:`DToPError` naming the holder when
    another process has it. Yields the lock file."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no kernel lock to take (run one job per folder yourself)
        yield Path(folder) / LOCK_NAME
        return
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fh: IO[str] = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DToPError(
                    f"cannot lock {folder} ({e.strerror}): its file system does not support file locks; write to a "
                    "folder on a local disk (or NFSv4)"
                ) from e
            fh.seek(0)
            raise DToPError(
                f"{folder} is in use by another {what}: {describe_holder(fh.read())}; wait for it to finish, or "
                "choose another output folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder()) + "\n")
        fh.flush()
        try:
            yield path
        finally:
            fh.seek(0)
            fh.truncate()  # a later reader sees no holder; the kernel drops the lock with the descriptor
            fh.flush()
    finally:
        fh.close()
