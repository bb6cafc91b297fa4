"""Embed a corpus into shards: the job description, the shard assembler both runners feed, and the in-process runner.

``embed_corpus(job)`` lists SOURCE (:mod:`~dtop_export.corpus.source`), works out which shards are still to
write (:func:`~dtop_export.corpus.shards.prepare_folder`), then runs either in this process (the default,
:mod:`~dtop_export.corpus.feed`: decoding on every core while the engine runs) or on a Ray cluster
(:mod:`~dtop_export.corpus.ray_pipeline`); both batch images of one input shape together
(:mod:`~dtop_export.corpus.schedule`). Both runners hand every (image, scale) descriptor or read error to one
:class:`ShardAssembler`, which combines scales exactly as :func:`~dtop_export.retrieval.extract.extract` does,
ignores duplicates (a retried Ray task may deliver an image twice) and writes a shard the moment all of its
images are accounted for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.corpus.pool import POOL_KINDS
from dtop_export.corpus.progress import progress_bar, steady_rate
from dtop_export.corpus.runtime import (
    ActorStats,
    ModelContract,
    check_gpu_decode,
    check_model_options,
    check_placement,
    model_contract,
    resolve_engine,
)
from dtop_export.corpus.shards import CorpusSettings, Shard, corpus_error, write_shard
from dtop_export.errors import DToPError, Interrupted, find_cause
from dtop_export.preprocess import DecodeBudget

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.corpus.source import CorpusItem

DEFAULT_SHARD_SIZE = 1000


@dataclass
class CorpusJob:
    """``dtop-export embed MODEL SOURCE -o OUT_DIR``: what to embed, how, and where (see the CLI's help)."""

    model: str
    source: str
    output: Path
    batch_size: int = 1
    scales: tuple[float, ...] = (1.0,)
    image_size: int | None = None
    threads: int | None = None
    precision: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False
    progress: bool = True
    use_ray: bool = False
    address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    decode: DecodeBudget = field(default_factory=DecodeBudget)  # what decoding one image may cost
    workers: int | None = None  # in-process decode workers (default: every core)
    decode_pool: str = "auto"  # in-process decode workers: thread, process, auto (processes for a CUDA engine)
    gpu_decode: bool = False  # decode JPEGs on the engine's CUDA device (torchvision.io.decode_jpeg)
    retry_skipped: bool = False  # embed again the images complete shards skipped (over the budget, read errors)

    def __post_init__(self) -> None:
        from dtop_export.corpus.cluster import cluster_address

        self.address = cluster_address(self.address)  # `local`: a local cluster, as no address


@dataclass
class CorpusSummary:
    """What a corpus job did: images found / embedded / skipped (in all shards, and the files left out of the listing),
    how many were skipped for what (:func:`~dtop_export.corpus.shards.skip_reason`), images processed and shards
    written by this run, shards reused from earlier runs, wall time, per-actor rates."""

    mode: str
    images: int
    processed: int
    embedded: int
    skipped: int
    shards_written: int
    shards_reused: int
    wall_s: float
    duplicates: int = 0
    actors: list[ActorStats] = field(default_factory=list)
    first_result_s: float | None = None  # start-up: from the start to the first result (model load, cluster)
    steady_images_per_s: float | None = None  # the images after the first result over the time after it
    startup: dict[str, float] = field(default_factory=dict)  # the fixed costs: listing, model load, warm-up...
    feed: dict[str, Any] = field(default_factory=dict)  # the decode pool's work and what ran concurrently
    skip_reasons: dict[str, int] = field(default_factory=dict)  # {"over --max-pixels": 2, "unreadable": 1, ...}

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 3)
        if self.steady_images_per_s is not None:
            d["steady_images_per_s"] = round(self.steady_images_per_s, 3)
        for a, s in zip(d["actors"], self.actors):
            a["images_per_s"] = round(s.images_per_s, 3)
        return d


@dataclass
class _Pending:
    item: CorpusItem
    total: np.ndarray | None = None
    scales_seen: set[int] = field(default_factory=set)


class ShardAssembler:
    """Collects per-(image, scale) results of the pending shards and writes each shard once it is complete.

    ``add(key, scale, descriptor)`` and ``fail(key, error)`` return the number of images that became complete
    (0 or 1); repeated deliveries of the same (key, scale) are counted in ``duplicates`` and ignored. ``retry``:
    complete shards to write again with their skipped images embedded anew (``shards_with_skipped``).
    """

    def __init__(
        self,
        folder: Path,
        settings: CorpusSettings,
        items: list[CorpusItem],
        pending: list[int],
        on_shard: Callable[[int], None] | None = None,
        retry: dict[int, Shard] | None = None,
    ) -> None:
        self.folder, self.settings, self.on_shard = folder, settings, on_shard
        self.n_scales = len(settings.scales)
        self.shard_of: dict[int, int] = {}
        self.open: dict[int, Shard] = {}
        self.remaining: dict[int, int] = {}
        self.work: dict[int, _Pending] = {}
        for k, shard in [(k, Shard(k)) for k in pending] + sorted((retry or {}).items()):
            keys = settings.shard_keys(k) if k in pending else [int(s["key"]) for s in shard.skipped]
            shard.skipped = []
            self.open[k] = shard
            self.remaining[k] = len(keys)
            for key in keys:
                self.shard_of[key] = k
                self.work[key] = _Pending(items[key])
        self.embedded = self.skipped = self.duplicates = self.written = 0

    def items(self) -> list[CorpusItem]:
        """The items still to embed, in key order."""
        return [self.work[k].item for k in sorted(self.work)]

    def add(self, key: int, scale: int, descriptor: np.ndarray) -> int:
        """One scale's descriptor of image ``key``; the image is complete once every scale arrived (multi-scale:
        the float64 sum of the unit descriptors, normalised, as :func:`~dtop_export.retrieval.extract.extract`)."""
        p = self.work.get(key)
        if p is None or scale in p.scales_seen:
            self.duplicates += 1
            return 0
        p.scales_seen.add(scale)
        d = np.asarray(descriptor, np.float32)
        if self.n_scales == 1:
            return self._store(key, d)
        p.total = d.astype(np.float64) + (p.total if p.total is not None else 0.0)
        if len(p.scales_seen) < self.n_scales:
            return 0
        return self._store(key, (p.total / max(float(np.linalg.norm(p.total)), 1e-12)).astype(np.float32))

    def _store(self, key: int, descriptor: np.ndarray) -> int:
        item = self.work[key].item
        shard = self.open[self.shard_of[key]]
        shard.keys.append(key)
        shard.ids.append(item.id)
        shard.paths.append(item.path)
        shard.descriptors.append(descriptor)
        self.embedded += 1
        return self._finish(key)

    def fail(self, key: int, error: str) -> int:
        p = self.work.get(key)
        if p is None:
            self.duplicates += 1
            return 0
        record = {"key": key, "id": p.item.id, "path": p.item.path, "error": corpus_error(error)}
        self.open[self.shard_of[key]].skipped.append(record)
        self.skipped += 1
        return self._finish(key)

    def _finish(self, key: int) -> int:
        del self.work[key]
        k = self.shard_of.pop(key)
        self.remaining[k] -= 1
        if self.remaining[k] == 0:
            write_shard(self.folder, self.open.pop(k), self.settings)
            self.written += 1
            if self.on_shard:
                self.on_shard(k)
        return 1

    @property
    def complete(self) -> bool:
        return not self.work


def job_settings(job: CorpusJob, items: list[CorpusItem], contract: ModelContract, engine: str) -> CorpusSettings:
    """The :class:`CorpusSettings` fingerprint of ``job`` over ``items``; ``engine`` from :func:`engine_key`."""
    from dtop_export.bench.spec import parse_spec
    from dtop_export.corpus.shards import file_sha256
    from dtop_export.corpus.source import listing_sha256
    from dtop_export.identity import checkpoint_of

    return CorpusSettings(
        model=job.model,
        model_sha256=file_sha256(parse_spec(job.model).path),
        descriptor_dim=contract.descriptor_dim,
        preprocess=contract.preprocess.to_dict(),
        image_size=int(job.image_size or contract.preprocess.size),
        scales=[float(s) for s in job.scales],
        shard_size=job.shard_size,
        source=job.source,
        n_items=len(items),
        listing_sha256=listing_sha256(items),
        engine=engine,
        checkpoint_sha256=checkpoint_of(job.model) or "",
        gpu_decode=job.gpu_decode,
    )


def engine_key(engine: EngineSpec) -> str:
    """``file.onnx:runtime=openvino,precision=bf16``: what runs (:func:`resolve_engine`), without the thread count."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(engine.options.items()) if k != "threads")
    return engine.path.name + (f":{opts}" if opts else "")


def check_job(job: CorpusJob) -> None:
    """Refuse, before anything is listed, opened or written, numbers a job cannot run with (the CLI checks them while
    it parses; this is the library's own check)."""
    for name, value, low in (
        ("--batch-size", job.batch_size, 1), ("--shard-size", job.shard_size, 1), ("--threads", job.threads, 1),
        ("--image-size", job.image_size, 1), ("--actors", job.actors, 1), ("--gpus-per-actor", job.gpus_per_actor, 0),
    ):  # fmt: skip
        if value is not None and not value >= low:
            raise DToPError(f"{name} must be >= {low}, got {value:g}")
    if job.cpus_per_actor is not None and not job.cpus_per_actor > 0:
        raise DToPError(f"--cpus-per-actor must be > 0, got {job.cpus_per_actor:g}")
    if job.output.exists() and not job.output.is_dir():
        raise DToPError(f"{job.output} exists and is not a folder: choose another -o")
    if job.workers is not None and not job.workers >= 1:
        raise DToPError(f"--workers must be >= 1, got {job.workers}")
    if job.decode_pool not in ("auto", *POOL_KINDS):
        raise DToPError(f"--decode-pool must be auto, {' or '.join(POOL_KINDS)}, got {job.decode_pool!r}")
    if job.gpu_decode:
        check_gpu_decode(job.model, job.use_ray)


def embed_corpus(job: CorpusJob, log: Callable[[str], None] | None = None) -> CorpusSummary:
    """Run ``job``: list SOURCE, reuse complete shards, embed the rest (in-process or on Ray), write the manifest.

    Everything that can refuse the job (options, source, model, memory, the Ray cluster's resources) is checked
    before the output folder is touched; then the folder is locked for this job (:mod:`~dtop_export.corpus.lock`).
    Returns the summary; the manifest (``OUT_DIR/manifest.json``) holds it too, with every skipped image.
    """
    from dtop_export.corpus.source import list_source
    from dtop_export.memory import check_image_size

    check_job(job)
    if job.use_ray:  # first: what to install comes before what to give a job that could not run anyway
        from dtop_export.corpus.ray_pipeline import require_ray_data

        require_ray_data()
    # MODEL's options (--precision auto included) resolved once, here: bad options fail before any output, and the
    # in-process engine or every Ray actor opens what the settings record
    resolved = resolve_engine(job.model, job.precision)
    check_placement(job.model, job.use_ray, job.gpus_per_actor)
    check_model_options(resolved, job.threads, local_threads=not job.use_ray)
    t0 = time.perf_counter()
    left_out: list[str] = []
    items = list_source(job.source, left_out)
    startup = {"listing_s": time.perf_counter() - t0}
    if left_out:
        from dtop_export.corpus.source import shown_name

        (log or (lambda _: None))(f"warning: left out {len(left_out)} file(s) whose names are not UTF-8 (first: "
                                  f"{shown_name(left_out[0])}): rename them to embed them")  # fmt: skip
    contract = model_contract(job.model)
    settings = job_settings(job, items, contract, engine_key(resolved))
    job.image_size = settings.image_size
    ray_plan = None
    if not job.use_ray:  # a Ray job's memory is its nodes': plan_ray checks it against theirs
        check_image_size(settings.image_size, job.scales, job.batch_size, contract.preprocess.stride)
    else:
        from dtop_export.corpus.ray_pipeline import plan_ray

        t1 = time.perf_counter()
        ray_plan = plan_ray(job, contract, resolved)
        startup["cluster_s"] = time.perf_counter() - t1  # started (or joined) and checked against the job
    try:
        from dtop_export.corpus.lock import folder_lock

        job.output.mkdir(parents=True, exist_ok=True)
        with folder_lock(job.output, "embed job"):
            try:
                run = (t0, startup, left_out, resolved)
                return _run_job(job, items, contract, settings, ray_plan, run, log or (lambda _: None))
            except BaseException as e:  # Ctrl-C, also as the cause of another error (a C extension loading)
                from dtop_export.corpus.shards import shard_is_complete

                cause = find_cause(e, KeyboardInterrupt)
                if cause is None:
                    raise

                n = settings.n_shards()
                done = sum(shard_is_complete(job.output, k, settings) for k in range(n))
                raise Interrupted(
                    f"{done} of {n} shard(s) are complete in {job.output} (each shard is written whole); run the same "
                    "command again to embed the rest",
                    getattr(cause, "exit_code", 130) - 128,  # SIGTERM's Interrupted: exit code 143
                ) from e
    finally:
        if ray_plan is not None:
            ray_plan.close()


def _run_job(
    job: CorpusJob,
    items: list[CorpusItem],
    contract: ModelContract,
    settings: CorpusSettings,
    ray_plan: Any,
    run: tuple[float, dict[str, float], list[str], EngineSpec],
    say: Callable[[str], None],
) -> CorpusSummary:
    from collections import Counter

    from dtop_export.corpus.shards import (
        collect_skipped,
        prepare_folder,
        shards_with_skipped,
        skip_reason,
        write_manifest,
    )
    from dtop_export.corpus.source import shown_name

    t0, startup, left_out, engine = run
    feed: dict[str, Any] = {}
    pending = prepare_folder(job.output, settings, job.force)
    n_shards = settings.n_shards()
    done = sorted(set(range(n_shards)) - set(pending))
    retry = shards_with_skipped(job.output, settings, done) if job.retry_skipped else {}
    say(
        f"{len(items)} images in {n_shards} shard(s) of {job.shard_size}: "
        + (f"{n_shards - len(pending)} already complete, " if len(pending) < n_shards else "")
        + (f"{len(retry)} with skipped images to retry, " if retry else "")
        + f"{len(pending)} to write"
    )
    write_manifest(job.output, settings, "running")
    assembler = ShardAssembler(job.output, settings, items, pending, retry=retry)
    n_todo = len(assembler.work)
    with progress_bar(job.progress and n_todo > 0) as bar:
        task = bar.add_task("embedding" + (" (ray)" if job.use_ray else ""), total=n_todo)

        first: list[tuple[float, int]] = []  # (time, images done) at the first result

        def advance(n: int) -> None:
            if n:
                bar.advance(task, n)
                if not first:
                    first.append((time.perf_counter(), n))

        if n_todo == 0:
            stats: list[ActorStats] = []
        elif ray_plan is not None:
            from dtop_export.corpus.ray_pipeline import run_ray

            stats = run_ray(job, contract, assembler, advance, say, ray_plan, startup)
        else:
            from dtop_export.corpus.feed import run_local

            stats = run_local(job, engine, assembler, advance, feed, startup)
    end = time.perf_counter()
    if not assembler.complete:
        raise DToPError(f"{len(assembler.work)} image(s) were never returned by the pipeline: re-run the command")
    skipped = collect_skipped(job.output, range(n_shards))
    reasons = Counter([skip_reason(s["error"]) for s in skipped] + ["file name not UTF-8"] * len(left_out))
    summary = CorpusSummary(
        mode="ray" if job.use_ray else "local",
        images=len(items) + len(left_out),
        processed=n_todo,
        embedded=len(items) - len(skipped),
        skipped=len(skipped) + len(left_out),
        shards_written=assembler.written,
        shards_reused=n_shards - len(pending) - len(retry),
        wall_s=end - t0,
        duplicates=assembler.duplicates,
        actors=stats,
        first_result_s=first[0][0] - t0 if first else None,
        steady_images_per_s=steady_rate(first[0], (end, n_todo)) if first else None,
        startup={k: round(v, 4) for k, v in startup.items()},
        feed=feed,
        skip_reasons=dict(reasons.most_common()),
    )
    write_manifest(
        job.output,
        settings,
        "complete",
        {
            "counts": {"images": summary.images, "embedded": summary.embedded, "skipped": summary.skipped},
            "shards": n_shards,
            "last_run": summary.to_dict(),
            "skipped": skipped,
            "left_out": [{"path": shown_name(p), "error": "file name not UTF-8"} for p in left_out],
        },
    )
    return summary
