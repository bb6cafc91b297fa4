"""The Ray Data runner of ``dtop-export embed --ray``: read + decode + preprocess in CPU tasks, inference in a pool
of stateful actors (one engine each), results streamed back to the driver's :class:`ShardAssembler`.

Pipeline (streaming, order preserved so shards complete window by window: see corpus.schedule)::

    header scan (driver)   ->  items ordered by model input shape within windows of shards (corpus.schedule)
    from_items(key, path)  ->  map_batches(preprocess_rows)           CPU tasks: bytes -> RGB -> uint8 pixels per scale
                           ->  map_batches(EmbedActor, concurrency=N)  actors: equal shapes batched ->
                                                                      engine.embed_pixels_stream (normalised there)
                           ->  iter_batches() in the driver            -> ShardAssembler -> shard-NNNNN.parquet

The rows carry uint8 pixels (a quarter of float32's bytes through the object store); a read task holds whole
batches of one shape where the plan allows; an actor loads its engine once and, on a GPU or compiled, warms it up
at the shapes of the header scan while the first blocks decode.

A killed actor is restarted and its task retried by Ray (``max_restarts=-1``, ``max_task_retries=-1``); a
result delivered twice is dropped by the assembler, so every image lands in exactly one shard row. Local paths
must be readable on every node (a shared file system) or be ``pyarrow.fs`` URIs; the shards are written by the
driver. ray is imported inside these functions.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.corpus.embed import CorpusJob, ShardAssembler
    from dtop_export.corpus.runtime import ActorStats, ModelContract

ROWS_PER_READ_TASK = 16  # images per read/decode task (fewer when the job is small, see run_ray)
GPU_CALL_BATCHES = 4  # engine batches per call of a GPU actor: its CUDA stream overlaps them, and Ray's per-call cost
# logical CPUs a read/decode task asks for, and the CPUs kept free for them when actors are sized by default
READ_TASK_CPUS = 0.5
READ_RESERVE_CPUS = 1.0


def tensor_bytes(image_size: int, scales: list[float]) -> int:
    """Bytes of one image's float32 input tensors at its largest shape, summed over ``scales`` (what the actor
    normalises; the rows carry a quarter of it, uint8)."""
    return sum(3 * 4 * round(image_size * s) ** 2 for s in scales)


def read_task_memory(rows: int, image_size: int, scales: list[float], decode_mb: int) -> int:
    """Memory a read/decode task reserves: the worker (~160 MiB), the decode budget (``--max-decode-mb``: the
    buffers of the one image it decodes at a time may reach it; the budget refuses a file that would need more)
    and 2.5x its block's tensors (the resized images and Ray Data's copy of the output block; a 16-row block at
    1024 px of camera photos peaked at 546 MiB on a GPU node). A remote argument the actors lack, which also keeps
    Ray Data from fusing decoding into the actors (fused, an actor would decode and infer in turn)."""
    return (160 + decode_mb) * 2**20 + int(2.5 * rows * tensor_bytes(image_size, scales))


def read_block_rows(rows: int, image_size: int, scales: list[float], node_memory: float, decode_mb: int) -> int:
    """``rows`` per read task, halved until a task's reservation fits in half of ``node_memory`` (the largest
    node's ``memory`` resource, :func:`largest_node_memory`: a task runs on one node, and Ray would otherwise
    wait for memory that never frees up, silently) -- or in all of it, when the part rows cannot shrink (worker
    and decode budget) already fills half; refuses sizes where not even one image fits."""
    if node_memory <= 0:  # a cluster that reports no memory resource: nothing to fit
        return rows
    room = node_memory / 2 if read_task_memory(1, image_size, scales, decode_mb) <= node_memory / 2 else node_memory
    while rows > 1 and read_task_memory(rows, image_size, scales, decode_mb) > room:
        rows //= 2
    need = read_task_memory(rows, image_size, scales, decode_mb)
    if need > node_memory:
        raise DToPError(
            f"one {image_size} px image at scales {scales} needs {need / 2**30:.1f} GiB to decode (with "
            f"--max-decode-mb {decode_mb}); the largest Ray node offers {node_memory / 2**30:.1f} GiB of task memory: "
            "use a smaller --image-size or --max-decode-mb, or a larger node"
        )
    return rows


def largest_node_memory(nodes: list[dict[str, Any]]) -> float:
    """The largest ``memory`` resource of the alive nodes in ``ray.nodes()`` (``ray.cluster_resources()``
    sums them: two 8 GiB nodes report 16 GiB, which no single task can have)."""
    return max((float(n.get("Resources", {}).get("memory", 0)) for n in nodes if n.get("Alive", True)), default=0.0)


def preprocess_rows(
    batch: dict[str, np.ndarray],
    preprocess: dict[str, Any],
    image_size: int,
    scales: list[float],
    decode: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Rows (key, path) -> rows (key, scale, pixels uint8 [H, W, 3], error): one row per scale of a readable image,
    one row with scale -1 and the reason for an unreadable one. The same decode as the in-process path
    (:func:`~dtop_export.corpus.feed.decode_item`); ``decode``: the fields of the
    :class:`~dtop_export.preprocess.DecodeBudget` (default: its defaults)."""
    from dtop_export.corpus.feed import decode_item

    keys: list[int] = []
    scale_ids: list[int] = []
    pixels: list[np.ndarray] = []
    errors: list[str] = []
    for key, path in zip(batch["key"], batch["path"]):
        try:
            out = decode_item(str(path), preprocess, image_size, tuple(scales), decode)
        except DToPError as e:
            keys.append(int(key))
            scale_ids.append(-1)
            pixels.append(np.zeros((0, 0, 3), np.uint8))
            errors.append(str(e))
            continue
        for i, t in enumerate(out):
            keys.append(int(key))
            scale_ids.append(i)
            pixels.append(t)
            errors.append("")
    ragged = np.empty(len(pixels), dtype=object)
    for i, t in enumerate(pixels):
        ragged[i] = t
    return {
        "key": np.asarray(keys, np.int64),
        "scale": np.asarray(scale_ids, np.int32),
        "tensor": ragged,
        "error": np.asarray(errors, dtype=object),
    }


OPEN_FAILED = -2  # the scale of rows an actor returns when it could not open its engine


class EmbedActor:
    """One engine in one Ray actor: rows of equal tensor shape are stacked into batches of ``batch_size``.

    An engine that cannot be opened (no GPU visible, a runtime missing on this node, a bad option) is reported
    with the actor's first rows (scale :data:`OPEN_FAILED`, the reason as their error) for the driver to stop
    the job in one line (the actor's traceback rides along, for ``--debug``): raised here, the actor dies in
    its creation task and Ray prints its traceback several times over on the driver's console."""

    def __init__(
        self,
        model: str | EngineSpec,
        threads: int | None,
        batch_size: int,
        descriptor_dim: int = 0,
        warmup_shapes: list[tuple[int, int]] | None = None,
    ) -> None:
        import ray

        from dtop_export.corpus.runtime import node_threads, open_model
        from dtop_export.corpus.schedule import needs_warmup, warm_up

        actor = ray.get_runtime_context().get_actor_id() or "driver"
        self.name = f"actor {actor[:8]} pid {os.getpid()}"
        self.batch_size = batch_size
        self.descriptor_dim = descriptor_dim
        self.open_error = ""
        t0 = time.perf_counter()
        try:
            # read tasks share the node; threads fitted to it (the driver counted Ray's logical CPUs); MODEL as the
            # driver resolved it (--precision auto: the driver's choice, not this node's)
            self.engine = open_model(model, node_threads(threads), shared_cores=True)
            self.load_s = time.perf_counter() - t0
            self.warmup_s = warm_up(self.engine, warmup_shapes or [], batch_size) if needs_warmup(self.engine) else 0.0
            self.reported = False
        except Exception as e:  # noqa: BLE001 - any failure to open is the job's error, reported by the driver
            import traceback

            self.engine = None
            reason = str(e) if isinstance(e, DToPError) else f"{type(e).__name__}: {e}"
            where = f"{self.name} on {ray.util.get_node_ip_address()}"
            self.open_error = f"{where}: {reason}\n{traceback.format_exc()}"  # line 1 is the message

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dtop_export.corpus.pool import on_cuda
        from dtop_export.corpus.schedule import pad_batch

        n = len(batch["key"])
        if self.engine is None:
            return {
                "key": np.asarray(batch["key"], np.int64),
                "scale": np.full(n, OPEN_FAILED, np.int32),
                "error": np.asarray([self.open_error] * n, dtype=object),
                "descriptor": np.zeros((n, self.descriptor_dim), np.float32),
                "actor": np.asarray([self.name] * n, dtype=object),
                "busy_s": np.zeros(n),
                "startup_s": np.zeros(n),
            }
        desc = np.zeros((n, self.engine.descriptor_dim), np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            if batch["scale"][i] >= 0:
                groups.setdefault(tuple(np.shape(batch["tensor"][i])), []).append(i)
        b = self.batch_size
        chunks = [rows[i : i + b] for rows in groups.values() for i in range(0, len(rows), b)]
        t0 = time.perf_counter()
        pad = on_cuda(self.engine)  # a call cuts shape groups anywhere: on a GPU, bounded batch sizes
        stacked = (np.stack([np.asarray(batch["tensor"][i], np.uint8) for i in c]) for c in chunks)
        stacked = (pad_batch(x, b) if pad else x for x in stacked)
        for chunk, out in zip(chunks, self.engine.embed_pixels_stream(stacked)):
            desc[chunk] = out[: len(chunk)]
        busy = time.perf_counter() - t0
        startup = np.zeros(n)
        if not self.reported and n:  # the actor's load and warm-up, once
            startup[0], self.reported = self.load_s + self.warmup_s, True
        return {
            "key": np.asarray(batch["key"], np.int64),
            "scale": np.asarray(batch["scale"], np.int32),
            "error": np.asarray(batch["error"], dtype=object),
            "descriptor": desc,
            "actor": np.asarray([self.name] * n, dtype=object),
            "busy_s": np.full(n, busy / max(n, 1)),
            "startup_s": startup,
        }


def actor_resources(job: CorpusJob, cluster_cpus: float, cluster_gpus: float) -> tuple[float, int | None]:
    """(logical CPUs per actor, engine threads per actor) for ``job`` on a cluster with these resources.

    By default the actors share the CPUs left after :data:`READ_RESERVE_CPUS` for reading and decoding, so the
    pipeline cannot deadlock (actors holding every CPU starve the read tasks forever). Refuses requests the
    cluster can never satisfy, which Ray would otherwise wait on silently.
    """
    if job.actors < 1:
        raise DToPError(f"--actors must be >= 1, got {job.actors}")
    if job.gpus_per_actor < 0:
        raise DToPError(f"--gpus-per-actor must be >= 0, got {job.gpus_per_actor}")
    if job.gpus_per_actor and job.actors * job.gpus_per_actor > cluster_gpus + 1e-9:
        raise DToPError(
            f"{job.actors} actor(s) x {job.gpus_per_actor:g} GPU need {job.actors * job.gpus_per_actor:g} GPUs; the "
            f"Ray cluster has {cluster_gpus:g}: use fewer --actors or a smaller --gpus-per-actor"
        )
    if job.cpus_per_actor is not None:
        cpus = float(job.cpus_per_actor)
        if cpus <= 0:
            raise DToPError(f"--cpus-per-actor must be > 0, got {cpus:g}")
    elif job.gpus_per_actor:
        cpus = min(1.0, max(0.25, (cluster_cpus - READ_RESERVE_CPUS) / job.actors))
    else:
        free = cluster_cpus - READ_RESERVE_CPUS if cluster_cpus > READ_RESERVE_CPUS else cluster_cpus / 2
        cpus = max(0.25, free / job.actors)
        if job.threads:
            cpus = min(cpus, float(job.threads))
    if job.actors * cpus + READ_TASK_CPUS > cluster_cpus + 1e-9:
        raise DToPError(
            f"{job.actors} actor(s) x {cpus:g} CPUs leave less than {READ_TASK_CPUS:g} CPU for reading images on a "
            f"Ray cluster of {cluster_cpus:g} CPUs: use fewer --actors or a smaller --cpus-per-actor"
        )
    threads = job.threads or max(1, math.floor(cpus + 1e-9))
    return cpus, threads


def actor_remote_args(job: CorpusJob, cpus: float) -> dict[str, float]:
    """Ray resources of one embedding actor. A GPU actor gets Ray Data's own default of 1 CPU by leaving
    ``num_cpus`` out: Ray warns that giving both is experimental; it is given only when it is not 1 CPU."""
    if not job.gpus_per_actor:
        return {"num_cpus": cpus}
    if cpus == 1.0 and job.cpus_per_actor is None:
        return {"num_gpus": job.gpus_per_actor}
    return {"num_cpus": cpus, "num_gpus": job.gpus_per_actor}


@dataclass
class RayPlan:
    """A Ray job checked against its cluster before anything is written: the connection (and whether this job
    started it), the actors' CPUs and threads, the model input's longer side and scales, the rows per read
    task, and the engine every actor opens (:func:`~dtop_export.corpus.runtime.resolve_engine`, on the driver)."""

    engine: EngineSpec
    started: bool
    resources: dict[str, float]
    cpus: float
    threads: int | None
    image_size: int
    scales: list[float]
    rows_per_block: int

    def close(self) -> None:
        """Shut down the local cluster this job started (a joined cluster is left running)."""
        if self.started:
            import ray

            ray.shutdown()


def require_ray_data() -> None:
    """One line when Ray Data cannot be imported (the [serve] extra installs Ray without its dependencies: pandas)."""
    try:
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DToPError("--ray needs Ray Data: pip install 'dtop-export[ray]'") from e


def plan_ray(job: CorpusJob, contract: ModelContract, engine: EngineSpec) -> RayPlan:
    """Connect to (or start) the cluster and check the job against it: Ray installed, the address reachable, the
    actors' CPUs and GPUs available, one image's memory within a node's. Nothing is written; on a refusal a local
    cluster this call started is shut down again."""
    require_ray_data()
    import ray

    from dtop_export.corpus.cluster import connect
    from dtop_export.memory import check_image_size

    started = connect(job.address)
    try:
        res = {k: float(v) for k, v in ray.cluster_resources().items()}
        cpus, threads = actor_resources(job, res.get("CPU", 0.0), res.get("GPU", 0.0))
        size, scales = int(job.image_size or contract.preprocess.size), [float(s) for s in job.scales]
        node_memory = largest_node_memory(ray.nodes())
        if node_memory > 0:
            check_image_size(size, scales, job.batch_size, contract.preprocess.stride, available=int(node_memory))
        rows = read_block_rows(ROWS_PER_READ_TASK, size, scales, node_memory, job.decode.max_decode_mb)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return RayPlan(engine, started, res, cpus, threads, size, scales, rows)


def run_ray(
    job: CorpusJob,
    contract: ModelContract,
    assembler: ShardAssembler,
    advance: Callable[[int], None],
    say: Callable[[str], None],
    plan: RayPlan,
    startup: dict[str, float] | None = None,
) -> list[ActorStats]:
    """Embed the assembler's pending items on the cluster of ``plan`` (:func:`plan_ray`); returns the per-actor
    statistics."""
    import ray
    import ray.data

    from dtop_export.corpus.runtime import ActorStats

    res, cpus, threads, size, scales = plan.resources, plan.cpus, plan.threads, plan.image_size, plan.scales
    say(
        f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; {job.actors} actor(s) x {cpus:g} CPU"
        + (f" + {job.gpus_per_actor:g} GPU" if job.gpus_per_actor else "")
        + (f", {threads} thread(s) each" if threads else "")
        + f"; decode tasks of up to {plan.rows_per_block} image(s) reserve "
        f"{read_task_memory(plan.rows_per_block, size, scales, job.decode.max_decode_mb) / 2**30:.1f}"
        " GiB each (--max-decode-mb counts)"
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from dtop_export.corpus.feed import WARMUP_SHAPES
    from dtop_export.corpus.pool import default_workers
    from dtop_export.corpus.schedule import frequent_shapes, ordered, scan, shards_per_window

    todo = assembler.items()
    t0 = time.perf_counter()  # the header scan, in the driver: rows go out ordered by model input shape
    shapes = scan(todo, contract.preprocess, size, scales, default_workers())
    work = ordered(todo, shapes, job.shard_size, shards_per_window(job.shard_size, job.batch_size, len(scales)))
    if startup is not None:
        startup["header_scan_s"] = time.perf_counter() - t0
    rows = [{"key": it.key, "path": it.path} for it, _ in work]
    warmup = frequent_shapes(shapes, WARMUP_SHAPES)
    # an actor task takes whole blocks: small blocks for small jobs, so that every actor gets work
    per_block = max(1, min(plan.rows_per_block, len(rows) // (4 * job.actors)))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_block))
    ds = ds.map_batches(
        preprocess_rows,
        fn_kwargs={
            "preprocess": contract.preprocess.to_dict(),
            "image_size": size,
            "scales": scales,
            "decode": asdict(job.decode),
        },
        batch_size=None,
        batch_format="numpy",
        num_cpus=READ_TASK_CPUS,
        memory=read_task_memory(per_block, size, scales, job.decode.max_decode_mb),
    )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model": plan.engine,
            "threads": threads,
            "batch_size": job.batch_size,
            "descriptor_dim": contract.descriptor_dim,
            "warmup_shapes": warmup,
        },
        batch_size=job.batch_size * len(job.scales) * (GPU_CALL_BATCHES if job.gpus_per_actor else 1),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.actors),  # Ray Data's actor defaults: restart and retry forever
        **actor_remote_args(job, cpus),
    )
    stats: dict[str, ActorStats] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(out["key"])):
            key, scale = int(out["key"][i]), int(out["scale"][i])
            st = stats.setdefault(str(out["actor"][i]), ActorStats(str(out["actor"][i])))
            st.busy_s += float(out["busy_s"][i])
            st.startup_s += float(out["startup_s"][i])
            if scale == OPEN_FAILED:
                message, _, actor_traceback = str(out["error"][i]).partition("\n")
                error = DToPError(f"a Ray actor could not open {job.model}: {message}")
                if sys.version_info >= (3, 11):  # shown under --debug
                    error.add_note(f"the actor's traceback:\n{actor_traceback}")
                raise error
            if scale < 0:
                advance(assembler.fail(key, str(out["error"][i])))
                continue
            st.images += scale == 0  # the actor's work, retried deliveries included
            advance(assembler.add(key, scale, out["descriptor"][i]))
    return sorted(stats.values(), key=lambda s: s.name)
