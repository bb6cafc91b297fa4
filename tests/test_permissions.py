"""Every artefact the toolkit writes gets the permissions a plain new file gets under the user's umask (0644
under umask 022), not the private 0600 of the temporary file it was written to before the rename: a serving
process running as another user must be able to read the model."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dtop_export.atomic import atomic_write_bytes, atomic_write_text, new_file_mode, new_folder_mode, process_umask


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_process_umask_reads_without_changing_it() -> None:
    with umask(0o027):
        assert process_umask() == 0o027
        assert process_umask() == 0o027  # reading did not reset it
        assert new_file_mode() == 0o640
        assert new_folder_mode() == 0o750


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    with umask(mask):
        atomic_write_bytes(tmp_path / "model.plan", b"x" * 10)
        atomic_write_text(tmp_path / "model.plan.json", "{}")
    assert mode(tmp_path / "model.plan") == expected
    assert mode(tmp_path / "model.plan.json") == expected
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("to", ["process", "worker-thread"])
def test_several_files_are_put_in_place_whole_through_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str
) -> None:
    """atomic_paths renames its files one by one: Ctrl-C between two renames left some files new and some old (a
    review). The signal now waits until every file is in place, then arrives as usual. It did not when the kernel
    gave it to another thread (a native thread of torch's; pytest's process has one), which the main thread's
    blocked signal mask did not cover: this test failed about one run in four, as the signal came in time or not;
    it now waits until the signal has come (the wakeup fd Python's handler writes to, in whichever thread)."""
    import select
    import signal
    import threading

    from dtop_export import atomic

    dests = [tmp_path / "a.pte", tmp_path / "b.pte"]
    for d in dests:
        d.write_bytes(b"old")
    replace, stop = os.replace, threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)  # started here: it does not block SIGINT either
    worker.start()
    r, w = os.pipe()
    os.set_blocking(w, False)
    wakeup = signal.set_wakeup_fd(w)

    def ctrl_c_after_the_first(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        replace(src, dst)
        if to == "process":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            signal.pthread_kill(worker.ident or 0, signal.SIGINT)
        assert select.select([r], [], [], 10)[0], "SIGINT never came"
        os.read(r, 1)

    monkeypatch.setattr(atomic.os, "replace", ctrl_c_after_the_first)
    try:
        with pytest.raises(KeyboardInterrupt), atomic.atomic_paths(dests) as temps:
            for t in temps:
                t.write_bytes(b"new")
    finally:
        signal.set_wakeup_fd(wakeup)
        os.close(r)
        os.close(w)
        stop.set()
        worker.join()
    assert [d.read_bytes() for d in dests] == [b"new", b"new"] and not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler put back


def test_every_held_signal_is_delivered_when_one_handler_raises() -> None:
    """Ctrl-C then SIGTERM while signals are held: on release the SIGINT handler raises KeyboardInterrupt, which
    stopped the loop that re-raises them, and the SIGTERM was lost (a review): both are delivered now, the
    KeyboardInterrupt raised after."""
    import signal

    from dtop_export import atomic

    heard: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt), atomic.signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            assert heard == []  # held
    finally:
        signal.signal(signal.SIGTERM, before)
    assert heard == [signal.SIGTERM]


@pytest.mark.parametrize("hard_links", [True, False], ids=["links", "no-links"])
@pytest.mark.parametrize("failing", [1, 2, 3])
def test_several_files_stay_old_when_a_rename_fails_partway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int, hard_links: bool
) -> None:
    """atomic_paths (executorch --size 256,384): a rename that failed partway (EXDEV, permissions) left the files
    renamed before it new and the rest old (a review). Now every destination holds its old bytes again, one that
    was not there is not there, no temporary or backup file stays, and the error is raised; also where the file
    system has no hard links (the old files are moved aside instead)."""
    import errno

    from dtop_export import atomic

    dests = [tmp_path / "a.pte", tmp_path / "new.pte", tmp_path / "b.pte"]
    old = {dests[0]: b"old a", dests[2]: b"old b"}
    for d, data in old.items():
        d.write_bytes(data)
    replace, renames = os.replace, []

    def fails_on_one(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(src).endswith(".tmp"):
            renames.append(dst)
            if len(renames) == failing:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "replace", fails_on_one)
    if not hard_links:
        monkeypatch.setattr(atomic.os, "link", no_links)
    with pytest.raises(OSError, match="cross-device"), atomic.atomic_paths(dests) as temps:
        for t in temps:
            t.write_bytes(b"new")
    assert len(renames) == failing
    assert {d: d.read_bytes() for d in dests if d.exists()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pte", "b.pte"]
    monkeypatch.setattr(atomic.os, "replace", replace)  # and when every rename succeeds, no backup stays either
    with atomic.atomic_paths(dests) as temps:
        for t in temps:
            t.write_bytes(b"new")
    assert [d.read_bytes() for d in dests] == [b"new"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pte", "b.pte", "new.pte"]


def test_old_files_that_cannot_be_put_back_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a rename fails partway and putting an old file back fails too, it stayed under a hidden second name
    with nothing saying so (the last note): the one-line error names it, with the rename's own error."""
    import errno

    from dtop_export import atomic
    from dtop_export.errors import DToPError

    dests = [tmp_path / "a.pte", tmp_path / "b.pte"]
    for d in dests:
        d.write_bytes(b"old " + d.name.encode())
    replace = os.replace

    def fails(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("b.pte") or str(src).endswith(".old"):  # the second rename, then every put-back
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fails)
    with pytest.raises(DToPError) as e, atomic.atomic_paths(dests) as temps:
        for t in temps:
            t.write_bytes(b"new")
    (backup,) = [p for p in tmp_path.iterdir() if p.name.startswith(".a.pte.")]
    assert backup.read_bytes() == b"old a.pte" and dests[0].read_bytes() == b"new"
    assert str(e.value) == (
        f"[Errno 18] Invalid cross-device link; putting the old files back failed too: the old {dests[0]} is kept "
        f"as {backup.name} (rename it back by hand)"
    )
    assert isinstance(e.value.__cause__, OSError) and "\n" not in str(e.value)


def test_checkpoint_onnx_and_fp16_onnx_are_readable_by_others(
    tmp_path: Path, small_ckpt: Path, small_onnx: Path
) -> None:
    """The session's checkpoint and export were written under this process's umask (unchanged since)."""
    from dtop_export.fp16.convert import convert_file

    assert mode(small_ckpt) == new_file_mode()
    assert mode(small_onnx) == new_file_mode()
    with umask(0o022):
        convert_file(small_onnx, tmp_path / "small.fp16.onnx")
    assert mode(tmp_path / "small.fp16.onnx") == 0o644


def test_shards_and_manifest_follow_the_umask(tmp_path: Path) -> None:
    from dtop_export.corpus.shards import CorpusSettings, Shard, write_manifest, write_shard

    settings = CorpusSettings(
        model="m.onnx", model_sha256="0" * 64, descriptor_dim=4, preprocess={}, image_size=64, scales=[1.0],
        shard_size=2, source="src", n_items=2, listing_sha256="0" * 64,
    )  # fmt: skip
    descriptors = list(np.eye(2, 4, dtype=np.float32))
    shard = Shard(index=0, keys=[0, 1], ids=["a", "b"], paths=["a.jpg", "b.jpg"], descriptors=descriptors)
    with umask(0o022):
        path = write_shard(tmp_path, shard, settings)
        write_manifest(tmp_path, settings, "complete")
    assert mode(path) == 0o644
    assert mode(tmp_path / "manifest.json") == 0o644


def test_sample_data_folder_follows_the_umask(tmp_path: Path) -> None:
    """The embedded data set is built in a private temporary folder and renamed into place."""
    from dtop_export.retrieval.sample_data import build_sample_dataset

    with umask(0o022):
        folder = build_sample_dataset(tmp_path)
    assert mode(folder) == 0o755
    assert mode(folder / "gnd_sample.pkl") == 0o644
