"""The in-process corpus runner: images decoded on every core while the engine runs, in shape-grouped batches.

::

    producer thread  windows of shards -> header scan (pool) -> plan (schedule.plan) -> decode + EXIF + resize
                     (pool, at most ``ahead`` images in flight) -> Batcher (uint8 [B, H, W, 3] of one shape) -> queue
    this thread      queue -> engine.embed_pixels_stream (normalised by the engine) -> ShardAssembler

The pool is threads (Pillow decodes and resizes with the GIL released) or processes (no GIL at all, the pixels
pickled back); ``auto`` (:func:`~.pool.resolve_pool`) picks processes for a CUDA engine, threads otherwise. The queue
holds ``prefetch`` ready batches, so the next batch is ready when the engine asks for it. What ran concurrently
is counted (:class:`FeedStats`): decode tasks running at once, and decode tasks that finished while the engine held
a batch. On a GPU, batches are padded to a multiple of a quarter batch (:func:`~.schedule.pad_batch`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.corpus.gpu_decode import Encoded, inspect_jpeg
from dtop_export.corpus.pool import POOL_KINDS, decode_pool, default_workers, leave, on_cuda, resolve_pool, timed
from dtop_export.corpus.schedule import (
    Batch,
    Batcher,
    frequent_shapes,
    plan,
    predicted_shapes,
    shards_per_window,
    windows,
)
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

    from dtop_export.bench.spec import EngineSpec
    from dtop_export.contract import Engine
    from dtop_export.corpus.embed import CorpusJob, ShardAssembler
    from dtop_export.corpus.gpu_decode import DeviceJpegDecoder
    from dtop_export.corpus.runtime import ActorStats
    from dtop_export.corpus.source import CorpusItem
    from dtop_export.preprocess import DecodeBudget, PreprocessConfig

WARMUP_SHAPES = 8  # an engine that needs it is warmed up at the most frequent input shapes of the header scan


def decode_item(
    path: str, preprocess: dict[str, Any], image_size: int, scales: tuple[float, ...], decode: dict[str, int] | None
) -> list[np.ndarray]:
    """One image's model inputs before normalisation, uint8 [H, W, 3] per scale: decode, EXIF, RGB and resize
    through :mod:`~dtop_export.preprocess` (a top-level function, so that a process pool can run it)."""
    from dtop_export.corpus.source import load_item
    from dtop_export.preprocess import DecodeBudget, PreprocessConfig, prepare_pixels

    cfg = PreprocessConfig.from_dict(preprocess)
    img = load_item(path, DecodeBudget(**decode) if decode else None)
    return [prepare_pixels(img, cfg, image_size, s) for s in scales]


def decode_or_inspect(
    path: str, preprocess: dict[str, Any], image_size: int, scales: tuple[float, ...], decode: dict[str, int] | None
) -> list[np.ndarray] | Encoded:
    """With ``--gpu-decode``: a JPEG the device can decode as :class:`~dtop_export.corpus.gpu_decode.Encoded`
    (header, budget and EXIF read here), any other file decoded here (:func:`decode_item`)."""
    from dtop_export.preprocess import DecodeBudget

    encoded = inspect_jpeg(path, DecodeBudget(**decode) if decode else None)
    return encoded if encoded is not None else decode_item(path, preprocess, image_size, scales, decode)


@dataclass
class Failure:
    """An image that could not be read: its key and the reason."""

    key: int
    error: str


@dataclass
class FeedStats:
    """What the feeder did and what ran concurrently (counted, not timed)."""

    workers: int
    pool: str
    images: int = 0
    batches: int = 0
    rows: int = 0
    max_decoding: int = 0  # decode tasks running at the same time, at most
    overlapped: int = 0  # decode tasks that finished while the engine held a batch
    scan_s: float = 0.0  # header scans, summed over workers
    decode_s: float = 0.0  # decoding + preprocessing, summed over workers
    wait_s: float = 0.0  # time the engine's thread waited for a batch
    warmup_s: float = 0.0
    warmup_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Tracker:
    """Thread-safe counts of decode tasks running and of the engine holding a batch."""

    def __init__(self, stats: FeedStats) -> None:
        self.stats, self.lock = stats, threading.Lock()
        self.decoding = 0
        self.engine_batches = 0  # batches handed to the engine whose descriptors have not come back

    def decode_started(self) -> None:
        with self.lock:
            self.decoding += 1
            self.stats.max_decoding = max(self.stats.max_decoding, self.decoding)

    def decode_finished(self, seconds: float) -> None:
        with self.lock:
            self.decoding -= 1
            self.stats.decode_s += seconds
            self.stats.overlapped += self.engine_batches > 0

    def engine(self, batches: int) -> None:
        """``+1``: a batch went to the engine; ``-1``: its descriptors came back."""
        with self.lock:
            self.engine_batches += batches


_DONE, _NOTHING = object(), object()


class Feeder:
    """Decoded, shape-grouped batches of ``items`` (see the module), as :class:`~dtop_export.corpus.schedule.Batch`
    es and :class:`Failure` s, in a deterministic order. Iterate once; ``close()`` stops the producer.

    ``load``: path -> PIL image instead of :func:`~dtop_export.corpus.source.load_item` (thread pool only; tests).
    ``ahead``: images decoded ahead of the batcher (default: 4 per worker, at least one batch). ``gpu``: decode
    JPEGs with this :class:`~dtop_export.corpus.gpu_decode.DeviceJpegDecoder` (the workers read headers only).
    """

    def __init__(
        self,
        items: list[CorpusItem],
        cfg: PreprocessConfig,
        image_size: int,
        scales: tuple[float, ...],
        batch_size: int,
        shard_size: int,
        workers: int | None = None,
        pool: str = "thread",
        budget: DecodeBudget | None = None,
        load: Callable[[str], Image.Image] | None = None,
        ahead: int | None = None,
        prefetch: int = 2,
        gpu: DeviceJpegDecoder | None = None,
    ) -> None:
        if pool not in POOL_KINDS:
            raise DToPError(f"unknown decode pool {pool!r}: choose {' or '.join(POOL_KINDS)}")
        if load is not None and pool != "thread":
            raise DToPError("a custom image loader runs in a thread pool only")
        self.items, self.cfg, self.image_size, self.scales = items, cfg, image_size, tuple(scales)
        self.batch_size, self.shard_size = batch_size, shard_size
        self.workers = max(1, int(workers or default_workers()))
        self.pool_kind, self.budget, self.load, self.gpu = pool, budget, load, gpu
        self.ahead = max(int(ahead or 4 * self.workers), batch_size)
        self.stats = FeedStats(self.workers, pool)
        self.tracker = Tracker(self.stats)
        self.out: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self.first_shapes: list[tuple[int, int]] | None = None
        self.planned = threading.Event()  # set once the first window is planned (first_shapes known)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.executor: Any = None

    # the producer -----------------------------------------------------------------------------------------------

    def _budget(self) -> dict[str, int] | None:
        return asdict(self.budget) if self.budget is not None else None

    def _decode_fn(self) -> Callable[[str], Any]:
        if self.load is not None:
            from dtop_export.preprocess import prepare_pixels

            return lambda p: [prepare_pixels(self.load(p), self.cfg, self.image_size, s) for s in self.scales]
        fn = decode_or_inspect if self.gpu is not None else decode_item
        return partial(fn, preprocess=self.cfg.to_dict(), image_size=self.image_size, scales=self.scales,
                       decode=self._budget())  # fmt: skip

    def _submit(self, fn: Callable[[str], Any], path: str) -> Any:
        """A decode task; the tracker counts it running (thread pool) and finished."""
        if self.pool_kind == "thread":

            def task() -> tuple[Any, float]:
                self.tracker.decode_started()
                t0 = time.perf_counter()
                try:
                    return fn(path), time.perf_counter() - t0
                finally:
                    self.tracker.decode_finished(time.perf_counter() - t0)

            return self.executor.submit(task)
        fut = self.executor.submit(timed, fn, path)
        self.tracker.decode_started()  # counted from submission: the process's own start is not visible here
        fut.add_done_callback(
            lambda f: self.tracker.decode_finished(0.0 if f.cancelled() or f.exception() else f.result()[1])
        )
        return fut

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.out.put(item, timeout=0.1)
                return

    def _produce(self) -> None:
        try:
            self._windows()
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
        finally:
            self.planned.set()

    def _windows(self) -> None:
        decode = self._decode_fn()
        scan = partial(predicted_shapes, cfg=self.cfg, image_size=self.image_size, scales=self.scales)
        per_window = shards_per_window(self.shard_size, self.batch_size, len(self.scales))
        batcher = Batcher(self.batch_size, stack=self._stack if self.gpu is not None else None)
        for window in windows(self.items, self.shard_size, per_window):
            if self.stop.is_set():
                return
            t0 = time.perf_counter()
            shapes = list(self.executor.map(scan, [it.path for it in window], chunksize=16))
            self.stats.scan_s += time.perf_counter() - t0
            order = plan(window, shapes)
            if self.first_shapes is None:
                self.first_shapes = frequent_shapes(shapes, WARMUP_SHAPES)
                self.planned.set()
            if not self._window(order, decode, batcher):
                return
        self.stats.batches, self.stats.rows = batcher.batches, batcher.rows

    def _window(self, order: list[tuple[CorpusItem, Any]], decode: Callable[[str], Any], batcher: Batcher) -> bool:
        """Decode one planned window into ``batcher`` and out; False when stopped."""
        left = Counter(sh for _, sh in order if sh)
        on_device: list[tuple[CorpusItem, Any, Any]] = []  # JPEGs for the device decoder, in plan order

        def emit(item: CorpusItem, predicted: Any, rows: list[Any]) -> None:
            self.stats.images += 1
            for scale, pixels in enumerate(rows):
                for batch in batcher.add(item.key, scale, pixels):
                    self._put(batch)
            if predicted:
                left[predicted] -= 1
                if left[predicted] == 0:  # the plan has no more images of this shape in the window
                    for batch in batcher.close_shapes((h, w, 3) for h, w in predicted):
                        self._put(batch)

        def decode_on_device() -> None:
            for (item, predicted, _), rows in zip(on_device, self.gpu.decode([e for _, _, e in on_device])):
                emit(item, predicted, rows if rows is not None else self._on_cpu(item))
            on_device.clear()

        futures: deque[tuple[CorpusItem, Any, Any]] = deque()
        nxt = 0
        while nxt < len(order) or futures:
            while nxt < len(order) and len(futures) < self.ahead and not self.stop.is_set():
                item, predicted = order[nxt]
                futures.append((item, predicted, self._submit(decode, item.path)))
                nxt += 1
            if self.stop.is_set():
                return False
            item, predicted, fut = futures.popleft()
            try:
                rows, _ = fut.result()
            except DToPError as e:
                self._put(Failure(item.key, str(e)))
                rows = []
            if isinstance(rows, Encoded):  # decoded on the device in groups of one predicted shape
                if on_device and (on_device[-1][1] != predicted or len(on_device) >= self.batch_size):
                    decode_on_device()
                on_device.append((item, predicted, rows))
                continue
            if on_device:
                decode_on_device()
            emit(item, predicted, rows)
        if on_device:
            decode_on_device()
        for batch in batcher.flush():
            self._put(batch)
        return True

    def _on_cpu(self, item: CorpusItem) -> list[Any]:
        """A JPEG the device decoder refused, decoded on the CPU (here, rarely)."""
        try:
            rows = decode_item(item.path, self.cfg.to_dict(), self.image_size, self.scales, self._budget())
        except DToPError as e:
            self._put(Failure(item.key, str(e)))
            return []
        return rows

    def _stack(self, arrays: list[Any]) -> Any:
        """A batch on the device decoder's device (rows the CPU decoded are copied there)."""
        import torch

        dev = self.gpu.device
        return torch.stack([a if isinstance(a, torch.Tensor) else torch.tensor(a, device=dev) for a in arrays])

    # the consumer -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool and the producer (the first iteration does, if not called before)."""
        if self.thread is not None:
            return
        self.executor = decode_pool(self.pool_kind, self.workers)
        self.thread = threading.Thread(target=self._produce, name="dtop-feeder", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[Batch | Failure]:
        self.start()
        finished = False
        try:
            while True:
                t0 = time.perf_counter()
                item = _NOTHING
                while item is _NOTHING:  # a timed wait: a Ctrl-C that lands just before it blocks is still seen
                    with contextlib.suppress(queue.Empty):
                        item = self.out.get(timeout=0.25)
                self.stats.wait_s += time.perf_counter() - t0
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close(wait=finished)

    def close(self, wait: bool = True) -> None:
        """Stop the pool, then the producer (which may wait on it); ``wait=False`` (Ctrl-C, an error): decodes in
        flight are left (:func:`~.pool.leave`)."""
        self.stop.set()
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True) if wait else leave(executor)
            if self.thread is not None:
                self.thread.join(timeout=None if wait else 1.0)


def run_local(
    job: CorpusJob,
    spec: EngineSpec,
    assembler: ShardAssembler,
    advance: Callable[[int], None],
    feed: dict[str, Any] | None = None,
    startup: dict[str, float] | None = None,
) -> list[ActorStats]:
    """Embed the assembler's pending items in this process (see the module) with the engine ``spec`` names (the
    job's MODEL as :func:`~dtop_export.corpus.runtime.resolve_engine` resolved it); ``feed`` receives the
    :class:`FeedStats` as a dict, ``startup`` the fixed costs (model load, header scan, warm-up) in seconds."""
    from dtop_export.corpus.runtime import ActorStats, open_model

    stats = ActorStats("local")
    todo = assembler.items()
    if not todo:
        return [stats]
    t0 = time.perf_counter()
    with open_model(spec, job.threads, shared_cores=True) as engine:
        if startup is not None:
            startup["model_load_s"] = time.perf_counter() - t0
        size = int(job.image_size or engine.preprocess.size)
        gpu = None
        if job.gpu_decode:
            from dtop_export.corpus.gpu_decode import DeviceJpegDecoder

            gpu = DeviceJpegDecoder(engine.preprocess, size, job.scales, str(engine.device))
        feeder = Feeder(
            todo, engine.preprocess, size, tuple(job.scales), job.batch_size, job.shard_size, workers=job.workers,
            pool=resolve_pool(job.decode_pool, engine, gpu is not None), budget=job.decode, gpu=gpu,
        )  # fmt: skip
        embed_batches(engine, feeder, assembler, advance, stats, job.batch_size)
    if feed is not None:
        feed.update(feeder.stats.to_dict())
    if startup is not None:
        startup["warmup_s"] = feeder.stats.warmup_s
    return [stats]


def embed_batches(
    engine: Engine,
    feeder: Feeder,
    assembler: ShardAssembler,
    advance: Callable[[int], None],
    stats: ActorStats,
    batch_size: int,
) -> None:
    """Drive ``engine`` with ``feeder``'s batches, the results into ``assembler`` (``stats``: images, busy time)."""
    from dtop_export.corpus.schedule import needs_warmup, pad_batch, padded_size, warm_up

    rows: deque[list[tuple[int, int]]] = deque()
    tracker = feeder.tracker
    pad = on_cuda(engine)

    def pixels() -> Iterator[Any]:
        for item in feeder:
            if isinstance(item, Failure):
                advance(assembler.fail(item.key, item.error))
                continue
            rows.append(item.rows)
            tracker.engine(+1)
            yield pad_batch(item.pixels, batch_size) if pad else item.pixels

    feeder.start()
    try:  # Ctrl-C or an error anywhere, warm-up included: the feed leaves its decodes in flight
        if needs_warmup(engine):  # while the producer scans and decodes the first window
            feeder.planned.wait()
            shapes = feeder.first_shapes or []
            feeder.stats.warmup_s = warm_up(engine, shapes, batch_size)
            feeder.stats.warmup_shapes = [list(hw) for hw in shapes]
        t0 = time.perf_counter()
        for desc in engine.embed_pixels_stream(pixels()):
            tracker.engine(-1)
            batch = rows.popleft()
            if len(desc) != (padded_size(len(batch), batch_size) if pad else len(batch)):
                raise DToPError(f"{engine.label} returned {len(desc)} descriptors for a batch of {len(batch)}")
            for (key, scale), d in zip(batch, desc):
                done = assembler.add(key, scale, d)
                stats.images += done
                advance(done)
    except BaseException:
        feeder.close(wait=False)
        raise
    stats.busy_s += time.perf_counter() - t0 - feeder.stats.wait_s
