"""Is a folder of shards (or an ``.npy`` of descriptors) what it claims to be? Checked before ``index`` and
``evaluate --distractors`` use it, so that a deleted, foreign, damaged or unfinished shard, or descriptors of another
image size, type or norm, are refused in one line instead of silently changing the results.

:func:`verify_folder` checks a shard folder against its manifest (finished; every shard it lists present, readable,
written under its settings and complete; no other shard; the row count) and :func:`check_rows` one shard's rows
as they are read (keys in the shard's range and unique, the manifest's model hash, float32 of the manifest's
dimension, finite, unit norm). :func:`open_distractors` does both for ``evaluate --distractors`` and compares the
descriptors' settings with the evaluation's. Where ``force`` is given, what can still be used is used with a
warning; what cannot (an unreadable shard, duplicate keys, NaN, another dimension) is always refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.corpus.shards import (
    SHARD_GLOB,
    CorpusSettings,
    read_manifest,
    read_shard,
    require_shard_folder,
    shard_info,
    shard_name,
)
from dtop_export.errors import DToPError

NORM_TOLERANCE = 1e-3  # |‖x‖ - 1| a unit descriptor may have (float32 rounding is ~1e-7)
CHUNK_BYTES = 32 << 20  # float32 descriptors checked at a time (a memory-mapped .npy is read chunk by chunk)


@dataclass
class Verified:
    """A checked shard folder: its manifest's settings, shard files in key order, their row counts, and what
    ``force`` let through."""

    folder: Path
    settings: CorpusSettings
    files: list[Path]
    rows: list[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(self.rows)


class _Verdict:
    """Collects refusals: raised at once, or kept as warnings under ``force``."""

    def __init__(self, force: bool, fix: str) -> None:
        self.force, self.fix, self.warnings = force, fix, []

    def refuse(self, message: str, fix: str | None = None) -> None:
        if not self.force:
            raise DToPError(f"{message}: {fix or self.fix}, or pass --force to use it as it is")
        self.warnings.append(message)


def settings_of(manifest: dict[str, Any], folder: Path) -> CorpusSettings:
    """The :class:`CorpusSettings` a manifest records."""
    try:
        return CorpusSettings(**manifest["settings"])
    except (KeyError, TypeError) as e:
        raise DToPError(f"{folder}/manifest.json holds no valid settings ({e}): re-run `dtop-export embed`") from e


def verify_folder(folder: str | Path, force: bool = False) -> Verified:
    """Check shard folder ``folder`` against its manifest (see the module docstring); a one-line
    :class:`DToPError` saying what is wrong and what to do, or the :class:`Verified` folder."""
    folder = require_shard_folder(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DToPError(f"{folder} has no manifest.json: it is not a folder written by `dtop-export embed -o {folder}`")
    settings = settings_of(manifest, folder)
    verdict = _Verdict(force, f"run the `dtop-export embed ... -o {folder}` that wrote it again (it redoes what is "
                              "missing or damaged)")  # fmt: skip
    if manifest.get("status") != "complete":
        verdict.refuse(f"{folder} is unfinished (its manifest says {manifest.get('status')!r})")
    expected = {shard_name(k): k for k in range(settings.n_shards())}
    present = {p.name for p in folder.glob(SHARD_GLOB)}
    foreign = sorted(present - set(expected))
    if foreign:
        verdict.refuse(
            f"{folder} holds {len(foreign)} shard file(s) its manifest does not list ({foreign[0]}, ...)",
            "move them out (they belong to another job)",
        )
    missing = sorted(set(expected) - present)
    if missing:
        verdict.refuse(f"{len(missing)} of the {len(expected)} shards of {folder} are missing ({missing[0]}, ...)")
    files, rows = [], []
    for name in sorted(present & set(expected)):
        path, k = folder / name, expected[name]
        info = shard_info(path)
        if info is None:
            raise DToPError(
                f"{path} is damaged or not a shard: run the `dtop-export embed ... -o {folder}` that wrote it again "
                "(it redoes damaged shards)"
            )
        if info.get("fingerprint") != settings.fingerprint() or info.get("shard") != k:
            verdict.refuse(f"{path} was written by another job than the manifest's", "replace it: move it out and "
                           "run the embed job again")  # fmt: skip
        elif int(info["num_rows"]) + len(info.get("skipped", [])) != len(settings.shard_keys(k)):
            verdict.refuse(f"{path} accounts for {int(info['num_rows']) + len(info.get('skipped', []))} of its "
                           f"{len(settings.shard_keys(k))} images")  # fmt: skip
        files.append(path)
        rows.append(int(info["num_rows"]))
    embedded = (manifest.get("counts") or {}).get("embedded")
    if not missing and not foreign and embedded is not None and int(embedded) != sum(rows):
        verdict.refuse(f"{folder} holds {sum(rows)} descriptors; its manifest counts {embedded}")
    if not files:
        raise DToPError(f"{folder} holds no readable shard: run `dtop-export embed MODEL SOURCE -o {folder}`")
    return Verified(folder, settings, files, rows, verdict.warnings)


def check_descriptors(
    desc: np.ndarray,
    where: str,
    dim: int | None = None,
    force: bool = False,
    advance: Callable[[int], None] | None = None,
    dim_of: str = "the model gives",
) -> list[str]:
    """Refuse descriptors that are not float32 [n, dim] (``dim`` if given; ``dim_of`` says whose it is), not finite
    or (unless ``force``, then a warning is returned) not of unit L2 norm. ``desc`` may be memory-mapped: it is read
    in chunks (``advance(rows)`` after each)."""
    if desc.ndim != 2:
        raise DToPError(f"{where} should hold descriptors [n, N], got shape {list(desc.shape)}")
    if desc.dtype != np.float32:
        raise DToPError(f"{where} holds {desc.dtype} values: descriptors are float32 (as `dtop-export embed` writes)")
    if dim is not None and desc.shape[1] != dim:
        raise DToPError(f"{where} holds {desc.shape[1]}-d descriptors; {dim_of} {dim}-d ones")
    worst = 0.0
    rows = max(1, CHUNK_BYTES // (4 * max(desc.shape[1], 1)))
    for start in range(0, desc.shape[0], rows):
        # float32 as stored: the squared norm sums 256-1536 values (error ~1e-6, the tolerance 1e-3); float64 copies
        # of 64k-row chunks held ~1.7 GB at a time for R1M's 1536-d distractors
        chunk = np.asarray(desc[start : start + rows])
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise DToPError(f"{where} holds non-finite values (NaN or inf; first in row {bad}): re-embed it")
        if len(chunk):
            norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
            worst = max(worst, float(np.abs(norms - 1.0).max()))
        if advance is not None:
            advance(len(chunk))
    if worst > NORM_TOLERANCE:
        message = f"{where} holds descriptors that are not L2-normalised (|norm - 1| up to {worst:.3g})"
        if not force:
            raise DToPError(f"{message}: normalise them, or pass --force to use them as they are")
        return [message]
    return []


def check_rows(
    shard: dict[str, Any], path: Path, settings: CorpusSettings, force: bool = False, dim_of: str = "its manifest says"
) -> list[str]:
    """Refuse a shard's rows (as :func:`~dtop_export.corpus.shards.read_shard` returns them, ``model_sha256``
    included when read) that do not belong to its place in the folder (see the module docstring)."""
    k = int(path.stem.split("-")[-1])
    keys = np.asarray(shard["key"])
    span = settings.shard_keys(k)
    if len(keys) and (keys.min() < span.start or keys.max() >= span.stop or len(np.unique(keys)) != len(keys)):
        raise DToPError(f"{path} holds keys outside its range {span.start}..{span.stop - 1} or twice: re-embed it")
    hashes = set(shard.get("model_sha256", []))
    if hashes - {settings.model_sha256}:
        raise DToPError(f"{path} holds rows of another model file ({sorted(hashes)[0][:12]}): re-embed it")
    return check_descriptors(shard["descriptor"], str(path), settings.descriptor_dim, force, dim_of=dim_of)


def _compare(verdict: _Verdict, where: str, recorded: dict[str, Any], image_size: int | None,
             scales: Sequence[float] | None) -> None:  # fmt: skip
    if image_size is not None and recorded.get("image_size") is not None and int(recorded["image_size"]) != image_size:
        verdict.refuse(f"{where} was embedded at image size {recorded['image_size']}; this evaluation runs at "
                       f"{image_size}")  # fmt: skip
    theirs = recorded.get("scales")
    same = theirs is None or scales is None or [round(float(s), 6) for s in theirs] == [round(s, 6) for s in scales]
    if not same:
        verdict.refuse(f"{where} was embedded at scales {','.join(f'{float(s):g}' for s in theirs)}; this evaluation "
                       f"uses {','.join(f'{s:g}' for s in scales)}")  # fmt: skip


def distractor_path(path: str | Path) -> Path:
    """``path`` as a Path when it can hold distractors (a shard folder, an ``.npy``), else one :class:`DToPError` line
    (a faiss index holds no descriptors; numpy's own refusal of it suggested unpickling it)."""
    path = Path(path)
    if not path.exists():
        raise DToPError(f"distractor file {path} not found")
    if not path.is_dir() and path.suffix.lower() != ".npy":
        raise DToPError(
            f"--distractors {path}: give an .npy (`dtop-export embed MODEL IMAGES -o X.npy`) or a shard folder "
            "(`embed ... -o DIR`), not an index or another file"
        )
    return path


def open_distractors(
    path: str | Path,
    dim: int | None = None,
    image_size: int | None = None,
    scales: Sequence[float] | None = None,
    force: bool = False,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> tuple[Any, list[str]]:
    """Distractor descriptors from an ``.npy`` (memory-mapped) or a shard folder (read shard by shard), checked
    (see the module docstring) and compared with the evaluation's ``dim``, ``image_size`` and ``scales``; returns
    (an [M, N] array-like, the warnings ``force`` let through). ``progress(total_rows)`` is called once the rows
    are counted, before they are read, and returns the ``advance(rows)`` the reading calls (a progress bar)."""
    from dtop_export.corpus.shards import ShardedDescriptors

    path = distractor_path(path)
    verdict = _Verdict(force, "embed the distractors with this model and settings")
    if path.is_dir():
        v = verify_folder(path, force)
        _compare(verdict, str(path), {"image_size": v.settings.image_size, "scales": v.settings.scales},
                 image_size, scales)  # fmt: skip
        if dim is not None and v.settings.descriptor_dim != dim:
            raise DToPError(f"{path} holds {v.settings.descriptor_dim}-d descriptors; the model gives {dim}-d ones")
        warnings = v.warnings + verdict.warnings
        advance = progress(v.n_rows) if progress is not None else None
        for f, rows in zip(v.files, v.rows):
            shard = read_shard(f, ("key", "descriptor", "model_sha256"))
            warnings += check_rows(shard, f, v.settings, force, dim_of="the model gives")
            if advance is not None:
                advance(rows)
        return ShardedDescriptors(path, v.files), warnings
    try:
        d = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        try:  # numpy takes any other file for a pickle, and suggests unpickling it
            reason = e if path.open("rb").read(6) == b"\x93NUMPY" else "not a NumPy .npy array file"
        except OSError:
            reason = e
        raise DToPError(f"cannot read distractor descriptors {path}: {reason}") from e
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        import json

        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise DToPError(f"cannot read {sidecar} ({e}): fix or remove it") from e
        _compare(verdict, str(path), recorded if isinstance(recorded, dict) else {}, image_size, scales)
    elif image_size is not None:
        verdict.warnings.append(f"{path} has no {sidecar.name} sidecar: its image size and scales are not checked")
    advance = progress(len(d)) if progress is not None and d.ndim else None
    return d, verdict.warnings + check_descriptors(d, str(path), dim, force, advance)


def _verdict_of(check: Any) -> str:
    try:
        warnings = check()
    except DToPError as e:
        return f"FAIL: {e}"
    return "ok" + (f" ({'; '.join(warnings)})" if warnings else "")


def describe_folder(folder: Path) -> dict[str, Any]:
    """``info`` of a shard folder: its manifest's status, counts and settings, the shards, and the check."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise DToPError(f"{folder} is a folder without manifest.json: give a shard folder of `dtop-export embed -o`")
    s = settings_of(manifest, folder)
    return {
        "kind": "shard folder (dtop-export embed -o)",
        "status": manifest.get("status"),
        "toolkit_version": manifest.get("toolkit_version"),
        "counts": manifest.get("counts", {}),
        "shards": f"{len(list(folder.glob(SHARD_GLOB)))} present, {s.n_shards()} expected ({s.shard_size} images each)",
        "settings": {
            "model": s.model,
            "model_sha256": s.model_sha256,
            "engine": s.engine,
            "descriptor_dim": s.descriptor_dim,
            "image_size": s.image_size,
            "scales": s.scales,
            "source": s.source,
            "images listed": s.n_items,
        },  # fmt: skip
        "check": _verdict_of(lambda: verify_folder(folder).warnings),
    }


def describe_npy(path: Path) -> dict[str, Any]:
    """``info`` of an ``.npy`` of descriptors: shape, type, its ``.json`` sidecar's settings, and the check."""
    import json

    try:
        d = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DToPError(f"cannot read {path}: {e}") from e
    report: dict[str, Any] = {"kind": "descriptor matrix (.npy)", "shape": list(d.shape), "dtype": str(d.dtype)}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            side = {}
        keys = ("model", "descriptor_dim", "image_size", "scales")
        report["sidecar"] = {k: side.get(k) for k in keys} | {"images": len(side.get("images", []))}
    else:
        report["sidecar"] = f"none ({sidecar.name} not found)"
    report["check"] = _verdict_of(lambda: check_descriptors(d, str(path)))
    return report
