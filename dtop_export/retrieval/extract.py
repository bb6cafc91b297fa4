"""Descriptor extraction through any engine, the cirtorch way.

Each image is loaded and preprocessed once (:mod:`dtop_export.preprocess`: EXIF, RGB, longer side
``image_size * scale`` with sides rounded to the stride, mean/std) and the same tensor goes to every engine;
images of equal input shape are batched. Multi-scale: the L2-normalised descriptors of the scales are
averaged and normalised again. Queries are cropped to their bounding box first when boxes are given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

    from dtop_export.contract import Engine
    from dtop_export.preprocess import PreprocessConfig

MULTI_SCALES = (1.0, 1 / math.sqrt(2), math.sqrt(2))


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar (a no-op when disabled)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


def extract_many(
    engines: Sequence[Engine],
    images: Sequence[str | Path | Image.Image],
    preprocess: PreprocessConfig | None = None,
    scales: Sequence[float] = (1.0,),
    bboxes: Sequence[Sequence[float] | None] | None = None,
    progress: bool = True,
    image_size: int | None = None,
    batch_size: int = 1,
    errors: list[tuple[int, str]] | None = None,
    description: str = "extracting",
    load: Callable[[Any], Image.Image] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Descriptors [n, N] of ``images`` from every engine, each image preprocessed once and fed to all.

    ``preprocess`` defaults to the first engine's; ``image_size`` to ``preprocess.size``. Images of equal
    input shape are batched up to ``batch_size``. With ``errors`` (a list), unreadable images are recorded
    there as ``(index, message)`` and left out of the result; otherwise they raise :class:`DToPError`.
    ``load`` turns an item into a PIL image (default: :func:`~dtop_export.preprocess.load_image` for paths);
    ``advance(n)`` is called as images are done, i.e. once every scale of an image has been embedded (or it
    failed to load): the bar and a caller's own progress count descriptors, not images read.
    """
    from dtop_export.preprocess import load_image, prepare

    if not engines:
        raise ValueError("no engines given")
    if not scales or any(s <= 0 for s in scales):
        raise DToPError(f"scales must be positive numbers, got {list(scales)}")
    if batch_size < 1:
        raise DToPError(f"batch size must be >= 1, got {batch_size}")
    cfg = preprocess or engines[0].preprocess
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError("bboxes must be parallel to images")
    n = len(images)
    dims = [e.descriptor_dim for e in engines]
    acc = [np.zeros((n, d), dtype=np.float64) for d in dims]
    ok = np.ones(n, dtype=bool)
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    scales_left = np.full(n, len(scales), dtype=np.int64)  # per image: scales not embedded yet

    def done(count: int) -> None:
        if count:
            prog.advance(task, count)
            if advance:
                advance(count)

    def flush(key: tuple[int, ...]) -> None:
        items = buckets.pop(key, [])
        if not items:
            return
        batch = np.stack([t for _, t in items])
        idx = [i for i, _ in items]
        for a, e in zip(acc, engines):
            out = np.asarray(e.embed(batch), dtype=np.float32)
            if out.shape != (len(idx), a.shape[1]):
                raise DToPError(f"{e.label} returned {list(out.shape)} for a batch of {len(idx)}")
            if len(scales) == 1:
                a[idx] = out
            else:
                np.add.at(a, idx, out)  # not a[idx] += out: that adds once for an index listed twice
        np.subtract.at(scales_left, idx, 1)  # not scales_left[idx] -= 1: two scales of an image may share a batch
        done(len({i for i in idx if scales_left[i] == 0}))  # every image here was unfinished before this batch

    with progress_bar(progress) as prog:
        task = prog.add_task(description, total=n)
        for i, item in enumerate(images):
            try:
                img = load(item) if load else item if not isinstance(item, (str, Path)) else load_image(item)
                bbx = bboxes[i] if bboxes is not None else None
                tensors = [prepare(img, cfg, image_size, s, bbx) for s in scales]
            except DToPError as e:
                if errors is None:
                    raise
                errors.append((i, str(e)))
                ok[i] = False
                done(1)
                continue
            for t in tensors:
                key = t.shape
                buckets.setdefault(key, []).append((i, t))
                if len(buckets[key]) >= batch_size:
                    flush(key)
        for key in list(buckets):
            flush(key)
    results = []
    for a in acc:
        a = a[ok]
        if len(scales) > 1:
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        results.append(a.astype(np.float32))
    return results


def extract(
    engine: Engine,
    images: Sequence[str | Path | Image.Image],
    preprocess: PreprocessConfig | None = None,
    scales: Sequence[float] = (1.0,),
    bboxes: Sequence[Sequence[float] | None] | None = None,
    progress: bool = True,
    *,
    image_size: int | None = None,
    batch_size: int = 1,
    errors: list[tuple[int, str]] | None = None,
    description: str = "extracting",
    load: Callable[[Any], Image.Image] | None = None,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Descriptors [n, N] of image files or PIL images (multi-scale: mean of L2-normalised, normalised).

    ``bboxes[i]`` (x1, y1, x2, y2) crops image i first. See :func:`extract_many` for the other options.
    """
    return extract_many(
        [engine],
        images,
        preprocess,
        scales,
        bboxes,
        progress,
        image_size=image_size,
        batch_size=batch_size,
        errors=errors,
        description=description,
        load=load,
        advance=advance,
    )[0]


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.707,1.414"`` (or ``ms`` for cirtorch's 1, 1/√2, √2) -> a tuple of positive floats."""
    if text.strip().lower() in ("ms", "multi", "multiscale"):
        return MULTI_SCALES
    try:
        out = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        out = ()
    if not out or any(not (s > 0) or not math.isfinite(s) for s in out):
        raise DToPError(f"cannot read scales {text!r}: write positive numbers separated by commas, e.g. 1,0.707,1.414")
    return out
