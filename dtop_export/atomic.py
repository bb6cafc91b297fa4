"""Atomic file writes: a temp file in the destination folder, fsync, then ``os.replace``; the reader of the
format-tagged JSON files written that way (manifests, sidecars); and :func:`file_state`, what tells that a file was
written or replaced since it was last seen.

A temporary file is created private (``mkstemp``: 0600); the file that replaces ``dest`` gets the mode a plain
``open()`` would have given it under the process umask (0644 under umask 022), so a model written by one
user can be read by a service running as another, as with every other file the user creates."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError


def process_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux: ``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a new regular file gets under the umask (0o666 & ~umask)."""
    return 0o666 & ~process_umask()


def new_folder_mode() -> int:
    """The permission bits a new folder gets under the umask (0o777 & ~umask)."""
    return 0o777 & ~process_umask()


def output_folder(dest: str | os.PathLike[str]) -> Path:
    """The folder ``dest`` is written into; a one-line :class:`DToPError` when it does not exist (outputs never
    create folders: a mistyped path fails instead of scattering files)."""
    parent = Path(dest).parent if str(Path(dest).parent) else Path(".")
    if not parent.is_dir():
        raise DToPError(f"output folder {parent} does not exist: create it or choose another path")
    return parent


def file_state(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(bytes, mtime_ns) of ``path``, None when it cannot be stat'ed (gone, no permission): a file written since
    (an atomic write's rename too) has another state, unless it kept its size and its mtime was set back (``cp -p``,
    ``rsync -t``, ``tar x``) or the file system's clock is coarser than the two writes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest``.

    If the body raises, the temporary file is removed and ``dest`` is left untouched, so an interrupted
    or failed write never leaves a half-written file behind.
    """
    with atomic_paths([dest]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in the main thread, then delivered on exit through the handlers they had: a few
    renames run whole. The handlers are swapped for ones that note the signal, rather than the signal blocked in the
    main thread: the kernel gives a signal sent to the process to any thread that does not block it (a native thread
    of torch's or a runtime's), and Python then runs the handler in the main thread all the same."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    # a handler installed outside Python (getsignal: None) cannot be put back, so it stays
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None}
    for s in before:
        signal.signal(s, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        _deliver(dict.fromkeys(arrived))


def _deliver(signums: Iterable[int]) -> None:
    """Raise each signal in turn through its handler; one whose handler raises (KeyboardInterrupt) does not keep
    the next from being delivered (Ctrl-C then SIGTERM: the SIGTERM handler runs too); the first error is raised."""
    import signal

    error: BaseException | None = None
    for s in signums:
        try:
            signal.raise_signal(s)
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every signal is delivered
            error = error or e
    if error is not None:
        raise error


@contextlib.contextmanager
def atomic_paths(dests: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """All or nothing for several files: yield one temporary path next to each of ``dests``; only when the body
    returns are they all flushed and then renamed onto ``dests`` (each rename atomic, in order).

    If the body raises, every temporary file is removed and every ``dest`` is left as it was (an existing one too:
    a command that replaces files under ``--force`` replaces none of them when one of its outputs fails). So too
    when a rename fails partway (:func:`_put_in_place`): the files already renamed are put back.
    """
    targets = [Path(d) for d in dests]
    temps: list[Path] = []
    try:
        for dest in targets:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=output_folder(dest))
            os.close(fd)
            temps.append(Path(tmp_name))
        yield list(temps)
        mode = new_file_mode()
        for tmp in temps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)  # mkstemp made it 0600; the writer may also have re-created it
        with signals_held():  # Ctrl-C or SIGTERM between two renames would leave some files new, some old
            _put_in_place(temps, targets)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def _put_in_place(temps: Sequence[Path], targets: Sequence[Path]) -> None:
    """Rename each of ``temps`` onto its target; when one rename fails (EXDEV, permissions), the targets renamed
    before it get their old files back (or are removed where there was none) and the error is raised. The old files
    are kept under a second name until every rename is done: a hard link (each target stays in place, so a reader
    sees its old file or its new one), else, where the file system has no hard links, the old file moved aside.
    One target needs none: its one rename does all or nothing."""
    backups: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for dest in targets if len(targets) > 1 else ():
            if os.path.lexists(dest) and not (dest.is_dir() and not dest.is_symlink()):  # a folder: its rename fails
                backups[dest] = _second_name(dest)
        for tmp, dest in zip(temps, targets, strict=True):
            os.replace(tmp, dest)
            done.append(dest)
    except BaseException as error:
        for dest in done:
            if dest not in backups:
                dest.unlink(missing_ok=True)
        stranded: list[str] = []
        for dest, backup in backups.items():
            try:
                if dest in done or not os.path.lexists(dest):  # else dest still holds the old file (linked)
                    os.replace(backup, dest)
                backup.unlink(missing_ok=True)
            except OSError:  # it stays under its second name: the error says where
                stranded.append(f"the old {dest} is kept as {backup.name}")
        if stranded:
            raise DToPError(
                f"{error}; putting the old files back failed too: {'; '.join(stranded)} (rename it back by hand)"
            ) from error
        raise
    for backup in backups.values():
        with contextlib.suppress(OSError):
            backup.unlink()


def _second_name(dest: Path) -> Path:
    """A new hidden name next to ``dest`` for its file (a link itself, not what it points to): a hard link, else
    (no hard links there) ``dest`` moved to it."""
    while True:
        backup = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.old")
        try:
            os.link(dest, backup, follow_symlinks=False)
            return backup
        except FileExistsError:
            continue
        except OSError:
            if os.path.lexists(backup):
                continue
            os.rename(dest, backup)
            return backup


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    atomic_write_bytes(dest, text.encode("utf-8"))


def read_tagged_json(path: str | os.PathLike[str], fmt: str, what: str, fix: str) -> dict[str, Any]:
    """``path`` as a JSON object whose ``"format"`` is ``fmt``; otherwise a one-line :class:`DToPError` that
    says the file is not ``what`` (or not readable) and ends with ``fix``. Callers check existence first."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DToPError(f"cannot read {path} ({e}): {fix}") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise DToPError(f"{path} is not {what} (format {fmt!r} expected): {fix}")
    return data
