"""Shape-aware scheduling of a corpus job: read the image headers first, then decode and batch images of one model
input shape together, so that camera photos form full batches instead of fragments.

* :func:`predicted_shapes`: per image, the model input shape [(H, W) per scale] from its header
  (:func:`~dtop_export.preprocess.image_size` with ``header_only``: EXIF-upright, nothing decoded); None where the
  header does not tell (a URI, a file the header reader refuses: it is decoded like any other, its real shape
  decides its batch).
* :func:`plan`: the order of work. Images go in *windows* of whole shards, in shard order; within a window they
  are sorted by predicted shape, then key. Shards complete window by window (every shard of a window before any
  shard of the next), within a window in any order (a shard is complete when its last image is: shard 1 may come
  before shard 0), and a killed job resumes per shard; the plan is a pure function of the listing and the headers,
  so it is the same on every run.
* :class:`Batcher`: what the runners feed with decoded rows in plan order. Rows of one *actual* shape are stacked
  into batches of ``batch_size``; a shape's last partial batch goes out as soon as the plan moves past that
  shape, and rows whose header misled the plan wait for the window's end. Every row lands in exactly one batch.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.corpus.pool import DaemonThreadPool, leave, on_cuda

if TYPE_CHECKING:
    from dtop_export.corpus.source import CorpusItem
    from dtop_export.preprocess import PreprocessConfig

Shapes = tuple[tuple[int, int], ...]  # model input (H, W) per scale
MIN_WINDOW_BATCHES = 16  # a window holds at least this many batches' worth of images (fewer fragments)


def predicted_shapes(path: str, cfg: PreprocessConfig, image_size: int, scales: Sequence[float]) -> Shapes | None:
    """The model input (H, W) of ``path`` at each scale, from its header; None when the header does not say."""
    from dtop_export.corpus.source import is_uri
    from dtop_export.errors import DToPError
    from dtop_export.preprocess import image_size as header_size
    from dtop_export.preprocess import model_size

    if is_uri(path):  # reading a remote header costs a request of its own; the decode will tell
        return None
    try:  # a FIFO, socket or device: reading its header would block the scan and eat bytes the decode needs
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    wh = header_size(path, header_only=True)
    if wh is None:
        return None
    try:
        return tuple(model_size(*wh, cfg, image_size, s)[::-1] for s in scales)
    except DToPError:
        return None


def frequent_shapes(shapes: Iterable[Shapes | None], limit: int) -> list[tuple[int, int]]:
    """The (H, W) that most images have (every scale counted), most frequent first (ties: smaller first), at most
    ``limit``: what an engine is warmed up at."""
    from collections import Counter

    counts = Counter(hw for sh in shapes if sh for hw in sh)
    return [hw for hw, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def shards_per_window(shard_size: int, batch_size: int, n_scales: int = 1) -> int:
    """Whole shards per window, enough for at least :data:`MIN_WINDOW_BATCHES` batches of rows."""
    images = MIN_WINDOW_BATCHES * max(1, batch_size) / max(1, n_scales)
    return max(1, -(-int(images) // max(1, shard_size)))


def windows(items: Sequence[CorpusItem], shard_size: int, per_window: int) -> Iterator[list[CorpusItem]]:
    """``items`` (in key order) cut at every ``per_window``-th shard boundary."""
    for _, group in itertools.groupby(items, key=lambda it: it.key // shard_size // per_window):
        yield list(group)


def plan(window: Sequence[CorpusItem], shapes: Sequence[Shapes | None]) -> list[tuple[CorpusItem, Shapes | None]]:
    """The decode order of one window: predicted shape first (unknown shapes last), then key."""
    order = sorted(range(len(window)), key=lambda i: (shapes[i] is None, shapes[i] or (), window[i].key))
    return [(window[i], shapes[i]) for i in order]


@dataclass
class Batch:
    """Rows of one shape: ``rows`` as (key, scale index), ``pixels`` uint8 [B, H, W, 3] (numpy, or a torch tensor
    when decoded on a GPU)."""

    rows: list[tuple[int, int]]
    pixels: Any


@dataclass
class Batcher:
    """Stacks decoded rows (key, scale, pixels [H, W, 3]) into :class:`Batch` es of one shape (see the module)."""

    batch_size: int
    stack: Callable[[list[Any]], Any] | None = None  # default: numpy.stack
    buckets: dict[tuple[int, ...], list[tuple[int, int, Any]]] = field(default_factory=dict)
    batches: int = 0
    rows: int = 0

    def add(self, key: int, scale: int, pixels: Any) -> Iterator[Batch]:
        """Add one row; yields the batch it completes, if any."""
        shape = tuple(pixels.shape)
        bucket = self.buckets.setdefault(shape, [])
        bucket.append((key, scale, pixels))
        if len(bucket) >= self.batch_size:
            yield self._emit(shape)

    def close_shapes(self, shapes: Iterable[tuple[int, ...]]) -> Iterator[Batch]:
        """The partial batches of ``shapes`` ([H, W, 3] each): the plan has no more rows predicted for them."""
        for shape in shapes:
            if self.buckets.get(shape):
                yield self._emit(shape)

    def flush(self) -> Iterator[Batch]:
        """Every partial batch left, in the order their shapes first appeared (the window's end)."""
        for shape in list(self.buckets):
            if self.buckets[shape]:
                yield self._emit(shape)
        self.buckets.clear()

    def _emit(self, shape: tuple[int, ...]) -> Batch:
        import numpy as np

        rows = self.buckets.pop(shape)
        self.batches += 1
        self.rows += len(rows)
        stack = self.stack or np.stack
        return Batch([(k, s) for k, s, _ in rows], stack([p for _, _, p in rows]))


def scan(
    items: Sequence[CorpusItem], cfg: PreprocessConfig, image_size: int, scales: Sequence[float], workers: int
) -> list[Shapes | None]:
    """:func:`predicted_shapes` of every item, read by ``workers`` daemon threads (headers: file opens and a few KB);
    interrupted (Ctrl-C), the scan does not wait for a read that never returns (a hung network mount)."""
    from functools import partial

    fn = partial(predicted_shapes, cfg=cfg, image_size=image_size, scales=tuple(scales))
    pool = DaemonThreadPool(max(1, workers), name="dtop-scan")
    try:
        shapes = list(pool.map(fn, [it.path for it in items]))
    except BaseException:
        leave(pool)
        raise
    pool.shutdown(wait=True)
    return shapes


def ordered(
    items: Sequence[CorpusItem], shapes: Sequence[Shapes | None], shard_size: int, per_window: int
) -> list[tuple[CorpusItem, Shapes | None]]:
    """Every item once, window after window (:func:`windows`), each window in :func:`plan` order."""
    where = {it.key: i for i, it in enumerate(items)}
    out: list[tuple[CorpusItem, Shapes | None]] = []
    for window in windows(items, shard_size, per_window):
        out += plan(window, [shapes[where[it.key]] for it in window])
    return out


# Batch sizes on a GPU --------------------------------------------------------------------------------------------
# cuDNN's autotuner (``cudnn.benchmark``, on in the PyTorch CUDA engine) times every convolution algorithm at each
# new input shape, batch size included: ~2 s per shape for the r50-vitb16 stem on an H200. A shape's partial batches
# come in any size, and a Ray actor's calls cut shape groups anywhere, so left alone every odd size paid it (a Ray
# job at 512 px measured 34 img/s busy vs 595 in-process, benchmarks/results/gpu-h200/feed/corpus.json). Padded to
# a multiple of a quarter batch, a shape has at most four batch sizes, and a padded batch wastes < a quarter batch.
BATCH_BUCKETS = 4


def padded_size(n: int, batch_size: int) -> int:
    """The batch size ``n`` images are padded to on a GPU: the next multiple of a quarter batch, never over
    ``batch_size`` (a TensorRT profile's largest batch) nor under ``n``."""
    step = max(1, -(-int(batch_size) // BATCH_BUCKETS))
    return max(n, min(-(-n // step) * step, int(batch_size)))


def pad_batch(pixels: Any, batch_size: int) -> Any:
    """``pixels`` [N, H, W, 3] (numpy or torch) with its last image repeated up to :func:`padded_size` rows; the
    caller keeps the first N results."""
    n = len(pixels)
    extra = padded_size(n, batch_size) - n
    if not extra:
        return pixels
    if isinstance(pixels, np.ndarray):
        return np.concatenate([pixels, np.repeat(pixels[-1:], extra, axis=0)])
    import torch

    return torch.cat([pixels, pixels[-1:].expand(extra, *pixels.shape[1:])])


def needs_warmup(engine: Any) -> bool:
    """An engine whose first call at a shape costs more than the next ones by design: on a GPU (CUDA init, cuDNN's
    per-shape autotuning) or compiled (a graph per shape). An eager CPU engine is not warmed up: that would only
    spend the cores the decoding needs."""
    return on_cuda(engine) or bool(engine.describe().get("compile"))


def warm_up(engine: Any, shapes: list[tuple[int, int]], batch_size: int) -> float:
    """Run ``engine`` once per (H, W) of ``shapes`` at ``batch_size`` on black pixels; returns the seconds."""
    t0 = time.perf_counter()
    for h, w in shapes:
        engine.embed_pixels(np.zeros((batch_size, h, w, 3), np.uint8))
    return time.perf_counter() - t0
