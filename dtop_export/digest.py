"""sha256 of files, remembered per process and computable in the background.

Checkpoints are ~0.5 GB: their digest goes into every artefact's metadata and every corpus's model hash.
Kept free of heavy imports so that a command can start hashing before it imports torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path


def file_sha256(*paths: str | Path) -> str:
    """sha256 of the bytes of ``paths``, in order, read in 4 MiB chunks (a full checkpoint is ~0.5 GB).

    Remembered per process for each state of the files (path, inode, size, modification time): a command
    that needs the digest of the same unchanged file twice (``embed --precision auto``: the recommendation's
    key and the shards' model hash) reads it once, and one started by :func:`prefetch_sha256` is waited
    for, not repeated."""
    return _digest(paths, background=False).result()


def prefetch_sha256(*paths: str | Path) -> None:
    """Start :func:`file_sha256` of ``paths`` in a background thread (hashlib releases the GIL, so it runs
    beside imports and tracing on another core); missing files are left to the caller's own checks."""
    if all(Path(p).is_file() for p in paths):
        _digest(paths, background=True)


_Key = tuple[tuple[str, int, int, int], ...]  # per file: path, inode, size, modification time
_digests: dict[_Key, Future[str]] = {}
_digests_lock = threading.Lock()


def _digest(paths: tuple[str | Path, ...], *, background: bool) -> Future[str]:
    key = tuple((str(Path(p).resolve()), (st := os.stat(p)).st_ino, st.st_size, st.st_mtime_ns) for p in paths)
    with _digests_lock:
        pending = _digests.get(key)
        if pending is None:
            pending = _digests[key] = Future()
        else:
            return pending
    if background:
        threading.Thread(target=_hash_into, args=(pending, key, paths), daemon=True).start()
    else:
        _hash_into(pending, key, paths)
    return pending


def _hash_into(result: Future[str], key: _Key, paths: tuple[str | Path, ...]) -> None:
    try:
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        result.set_result(h.hexdigest())
    except BaseException as e:  # the waiting caller sees it; a later call tries again
        with _digests_lock:
            _digests.pop(key, None)
        result.set_exception(e)
