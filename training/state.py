"""The resumable training state (``train_state.pt``): its format, reading it back, what may change on resume,
and the RNG streams a bit-exact continuation needs. Under DDP, the process's place in the group."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from dtop_export.errors import DToPError

STATE_FORMAT = "dtop-export/train-state"
STATE_VERSION = 1
# config keys that may change when resuming (they do not change what is computed)
RESUMABLE_CHANGES = {"epochs", "progress", "log_every", "data.workers", "save_state_every", "threads", "out_dir"}


# what a run writes in its folder besides its SETUP_FILES (see training/loop.py, run_logs.py)
RUN_FILES = ("train_state.pt", "last.pt", "best.pt", "final.pt", "log.csv", "epochs.csv", "tb")
# what a run writes in its folder as it reads its data: removed again when the start is refused (undo_setup)
SETUP_FILES = ("config.yaml", "image_sizes.tsv", "skipped_images.tsv")


def previous_run(folder: str | Path) -> list[Path]:
    """The checkpoints, state and logs of a training run already in ``folder`` (``epoch-NNN.pt`` included)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [folder / n for n in RUN_FILES if (folder / n).exists()] + sorted(folder.glob("epoch-[0-9]*.pt"))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that a killed run (``kill -9``, power loss) left mid-write in ``folder``:
    ``.<name>.<random>.tmp`` of the files a run writes (``dtop_export.atomic.atomic_path``), a state's or
    checkpoint's size each. Returns what was removed."""
    folder = Path(folder)
    names = (*RUN_FILES, *SETUP_FILES, "epoch-[0-9]*.pt")
    stale = sorted({p for n in names for p in folder.glob(f".{n}.*.tmp") if p.is_file() and not p.is_symlink()})
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def setup_files(folder: str | Path) -> set[str]:
    """Which of :data:`SETUP_FILES` ``folder`` holds (before a run: those it must not remove when refused)."""
    return {n for n in SETUP_FILES if (Path(folder) / n).exists()}


def undo_setup(folder: str | Path, before: set[str]) -> None:
    """After a refused start in a folder that holds no run: remove the :data:`SETUP_FILES` the start wrote (those not
    in ``before``), so that the folder is as it was."""
    folder = Path(folder)
    if folder.is_dir() and not previous_run(folder):
        for n in set(SETUP_FILES) - before:
            (folder / n).unlink(missing_ok=True)


def clear_run(folder: str | Path) -> None:
    """Remove what :func:`previous_run` finds, so that a run started again from scratch (``train --force``) does not
    append to the old logs or leave the old ``best.pt`` / ``epoch-NNN.pt`` beside its own; and the old
    ``skipped_images.tsv``, which the new run writes only when it skips a file (the size cache stays: it checks each
    file's bytes and mtime)."""
    import shutil

    (Path(folder) / "skipped_images.tsv").unlink(missing_ok=True)
    for p in previous_run(folder):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def interrupted_run(folder: str | Path, config: dict[str, Any], may_change: set[str]) -> tuple[int, int] | None:
    """The (0-based epoch, step) at which ``folder``'s ``train_state.pt`` was saved when it is the state of a run of
    ``config`` (the keys in ``may_change`` aside), which a caller that retrains the same thing (the demo) continues
    instead of starting over; None when there is none (or it is unreadable, or of another config)."""
    state_file = Path(folder) / "train_state.pt"
    if not state_file.is_file():
        return None
    try:
        state = read_state(state_file, mmap=True)
    except DToPError:
        return None
    if [k for k in config_changes(state["config"], config) if k not in may_change]:
        return None
    return int(state["epoch"]), int(state["step"])


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def config_changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (``overrides`` compared whole)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and not prefix.endswith("overrides."):
            keys += config_changes(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def read_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a ``train_state.pt`` (a folder means its ``train_state.pt``); weights_only, validated. ``mmap``: the
    tensors are mapped, not read (for a look at the config or counts: a full preset's state is ~1.4 GB)."""
    path = Path(path)
    if path.is_dir():
        path = path / "train_state.pt"
    if not path.is_file():
        raise DToPError(f"no training state at {path}: resume from a run folder that holds train_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user error
        raise DToPError(f"cannot read training state {path}: {e.__class__.__name__}; it is truncated or not one") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DToPError(f"{path} is not a dtop-export training state")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise DToPError(f"{path} was written by a newer dtop-export: upgrade to resume it")
    state["_path"] = str(path)
    return state


def refuse_world_change(state: dict[str, Any], world: int) -> None:
    """Refuse to resume a state written by another number of processes (every process has its own RNG streams and
    data shard), before any model or data is loaded. The count is ``world_size`` (older states: one RNG entry per
    process)."""
    ran = int(state.get("world_size") or len(state["rng"]))
    if ran != world:
        how = "in one process (no torchrun)" if ran == 1 else f"with torchrun, {ran} processes in all"
        raise DToPError(f"cannot resume: the run used {ran} process(es), this one has {world}; resume it {how}")


def set_fingerprint(ts: Any) -> dict[str, Any]:
    """What the run's batches, classes and schedule follow in a :class:`~dtop_export.training.datasets.TrainSet`: its
    image and class counts and a sha256 of every (path under the root, label, size) line, in order."""
    import hashlib

    root = str(ts.root).rstrip("/") + "/"
    digest = hashlib.sha256()
    for path, label, (w, h) in zip(ts.paths, ts.labels, ts.sizes):
        digest.update(f"{path.removeprefix(root)}\t{label}\t{w}x{h}\n".encode("utf-8", "surrogateescape"))
    return {"images": len(ts.paths), "classes": int(ts.num_classes), "sha256": digest.hexdigest()}


def refuse_changed_set(state: dict[str, Any], now: dict[str, Any], folder: str | Path) -> None:
    """Refuse to resume on a training set other than the one the state was saved with (files added, removed or
    relabelled, sizes changed): the epochs' batches, the classifier's classes and the schedule's length would follow
    the new set without a word. States written before the fingerprint existed carry none: nothing to compare."""
    saved = state.get("data")
    if saved is None or saved == now:
        return
    counts = f"{saved['images']} -> {now['images']} images, {saved['classes']} -> {now['classes']} classes"
    raise DToPError(
        f"cannot resume: the training set changed since the state was saved ({counts}; files added, removed, "
        f"relabelled or resized under data.root): restore it as it was, or start a new run from this run's weights "
        f"(`dtop-export train ... --init {Path(folder) / 'last.pt'}`)"
    )


def rng_state(device: Any) -> dict[str, Any]:
    """The torch, Python (and CUDA) RNG streams of this process."""
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: Any) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"], device)
