"""The model side of the service: one engine per Ray Serve replica, requests batched by input shape.

:class:`Embedder` is the replica's class (wrapped by ``serve.deployment`` in :func:`embedder_deployment`). It opens
MODEL with :func:`dtop_export.corpus.runtime.open_model` (the engine opening ``embed`` uses: same file, options and
``--precision auto`` resolution) and warms it up in its constructor, so Serve routes nothing to it before it is
ready. Each request carries one preprocessed tensor [3, H, W]. Batching is Triton's dynamic batcher: when the engine
is free, the next batch takes every live request already waiting (at most ``--max-batch-size``; one whose caller
has gone takes no place), waiting up to ``--batch-wait-ms`` after its first one for more; only tensors of equal
shape share a forward pass, as in corpus jobs. (``serve.batch`` forms its batches as requests arrive, even while
the engine is busy, so under load it ran batches of 1-4 while a dozen requests waited: measured on r50-vitb16
here.) Every result says which forward pass it came from (replica, sequence number, size) and how long it waited,
for the app's metrics. If the batching task ever ends with an error, the requests it held or left queued fail with
it (they waited for their timeout) and the next request starts a new one. ray is imported inside the functions.

Health: Serve calls :meth:`Embedder.check_health` every ``health_check_period_s`` and replaces a replica that fails
it :data:`UNHEALTHY_AFTER` times in a row, or does not answer within ``health_check_timeout_s`` (an event loop that
no longer runs). It fails for a wedged replica only (:meth:`Embedder.wedged`): a forward pass running past
:func:`hang_after` (a multiple of ``--request-timeout``, at least a minute), or :data:`BATCHER_DEATHS` batching
tasks in a row that died with no forward pass answered between. A busy replica passes it however long its queue.

Readiness: each answer also names the replica's Ray actor, and :func:`local_status` reads a replica's state in its
own process (the app runs it through Ray's ``__ray_call__`` on that actor: a call Serve's request queue does not
count, so a saturated replica still answers it, and a dead one fails it at once; see
:mod:`dtop_export.serve.readiness`).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
import uuid
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# the replicas of this process by name (one per Serve replica process; several in tests), for local_status
_LOCAL: weakref.WeakValueDictionary[str, Embedder] = weakref.WeakValueDictionary()

# A forward pass running HANG_FACTOR x --request-timeout (at least HANG_FLOOR_S) hangs: Serve replaces its replica.
# /readyz already calls a pass past 1 x --request-timeout stuck (every request waiting for it has timed out) and
# pulls the replica from readiness; a restart costs more (the engine opened and warmed again: 6-22 s measured, more
# for a TensorRT plan) and ends a pass that might still finish, so it waits for a pass no load explains: the longest
# pass of a full batch measured here is ~6 s (r50-vitb16 INT8, 8 images), 5x under the default timeout of 30 s. The
# floor: --request-timeout is the clients' patience, not the engine's pass time; a 1 s timeout must not restart a
# replica whose first pass at a new shape is slow (an engine that compiles per shape, a GPU's lazy start).
HANG_FACTOR = 3.0
HANG_FLOOR_S = 60.0
BATCHER_DEATHS = 3  # batching tasks that died in a row, no pass answered between: every request gets 503
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0  # the check reads two fields: only an event loop that no longer runs exceeds it
UNHEALTHY_AFTER = 3  # Serve's consecutive failed checks before it replaces a replica (Ray 2.60, not an option)


@dataclass(frozen=True)
class EngineSettings:
    """How each replica opens and batches the model (the ``serve`` options of the same names)."""

    model: str
    threads: int | None = None
    precision: str | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    warmup_size: int = 256  # the square input of the warm-up passes (the service's image size)
    # the engine options the driver resolved (``--precision auto`` included): every replica opens ``model`` with
    # exactly these, whatever its node's own recommendation; None: MODEL's own (``file.onnx:openvino``) and precision
    options: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hang_after(request_timeout_s: float | None) -> float:
    """How long a forward pass runs before its replica counts as wedged (see :data:`HANG_FACTOR`); never without a
    request timeout."""
    if request_timeout_s is None or request_timeout_s <= 0:
        return float("inf")
    return max(HANG_FACTOR * request_timeout_s, HANG_FLOOR_S)


class Wedged(RuntimeError):
    """The replica's engine or batcher is wedged: raised by :meth:`Embedder.check_health` (Serve replaces it)."""


class BatcherStopped(RuntimeError):
    """The replica's batching task ended with an error: the requests it held fail with this (the app answers 503 +
    Retry-After: the next request starts a new batcher)."""


@dataclass
class Item:
    """One tensor to embed, when the app submitted it (``time.time()``, for the queue time) and its answer."""

    tensor: np.ndarray
    submitted: float
    answer: asyncio.Future[dict[str, Any]]
    queued: float = 0.0  # the replica's event-loop time when it arrived


class Embedder:
    """One engine in one replica (see the module's notes)."""

    def __init__(self, settings: EngineSettings, request_timeout_s: float | None = None) -> None:
        from dtop_export.corpus.runtime import node_threads, open_model

        self.settings = settings
        self.hang_s = hang_after(request_timeout_s)
        self._deaths, self._death = 0, ""  # batching tasks that died since a forward pass answered; the last why
        model: Any = settings.model
        if settings.options is not None:
            from dtop_export.bench.spec import EngineSpec

            model = EngineSpec(Path(settings.model), dict(settings.options))
        self.engine = open_model(model, node_threads(settings.threads), settings.precision)
        # the forward passes' names: a PID names no replica across nodes (each container counts its own PIDs)
        self._passes = uuid.uuid4().hex[:12]
        self.replica = replica_name(self._passes)
        self.actor = actor_address()  # (namespace, name) of this replica's Ray actor; None outside Serve
        self.batches = 0
        self._pass_started: float | None = None  # perf_counter() at the start of the running forward pass
        self.images = 0
        self._queue: asyncio.Queue[Item] | None = None
        self._worker: asyncio.Task[None] | None = None
        stride = self.engine.stride
        side = max(stride, settings.warmup_size // stride * stride)
        for b in sorted({1, settings.max_batch_size}):  # first passes compile/allocate: not on a user's request
            self.engine.embed(np.zeros((b, 3, side, side), np.float32))
        self.warm = True
        _LOCAL[self.replica] = self

    async def embed(self, tensor: np.ndarray, submitted: float) -> dict[str, Any]:
        """The descriptor of one preprocessed image [3, H, W], with its forward pass's size and the times."""
        arrived = time.time()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            # in a context of its own: created inside this request, the task would otherwise carry the request's
            # context variables (Serve's request context: its id, route...) for its whole life
            self._worker = contextvars.Context().run(
                asyncio.get_running_loop().create_task, self._serve_batches(self._queue)
            )
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        item = Item(np.asarray(tensor, np.float32), submitted, loop.create_future(), loop.time())
        self._queue.put_nowait(item)
        out = await item.answer  # cancelled with the request (its timeout): the batcher skips it
        return out | {"route_s": max(0.0, arrived - submitted)}

    async def _serve_batches(self, queue: asyncio.Queue[Item]) -> None:
        """The dynamic batcher: one batch at a time, formed when the engine is free (see the module's notes). Should
        it ever end with an error, every request it took or left in ``queue`` fails with it (none waits for its
        timeout), and the next request starts a new batcher."""
        held: list[Item] = []  # taken from the queue and not yet answered
        try:
            while True:
                batch = await self._next_batch(queue, held)
                try:
                    results = await self._run_batch(batch)
                except Exception as e:  # noqa: BLE001 - a failure outside the passes: every request of the batch
                    results = [e] * len(batch)
                for item, result in zip(batch, results):
                    if item.answer.done():  # cancelled while its pass ran
                        continue
                    if isinstance(result, BaseException):
                        item.answer.set_exception(result)
                    else:
                        item.answer.set_result(result)
                held.clear()
        except BaseException as e:
            self._deaths, self._death = self._deaths + 1, f"{type(e).__name__}: {e}"
            while not queue.empty():
                held.append(queue.get_nowait())
            failure = BatcherStopped(f"the replica's batcher stopped ({type(e).__name__}: {e}): retry")
            for item in held:
                if not item.answer.done():
                    item.answer.set_exception(failure)
            raise

    async def _next_batch(self, queue: asyncio.Queue[Item], held: list[Item]) -> list[Item]:
        """The next batch, of live requests only: at most ``max_batch_size``, the oldest waiting at most
        ``batch_wait_ms`` for company. A request cancelled while it waits (its caller gone, its timeout) is dropped
        as it is seen, before or while the batch forms: it takes no place in the batch nor in a forward pass. Each
        request taken from the queue is added to ``held`` too."""
        limit, wait_s = self.settings.max_batch_size, self.settings.batch_wait_ms / 1000.0
        loop = asyncio.get_running_loop()
        batch: list[Item] = []
        while True:
            batch = [item for item in batch if not item.answer.done()]
            if len(batch) >= limit:
                return batch
            if not queue.empty():
                batch.append(queue.get_nowait())
                held.append(batch[-1])
                continue
            if not batch:
                batch.append(await queue.get())
                held.append(batch[-1])
                continue
            left = batch[0].queued + wait_s - loop.time()  # the oldest live request waits at most --batch-wait-ms
            if left <= 0:
                return batch
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
                held.append(batch[-1])
            except asyncio.TimeoutError:
                continue  # the deadline has passed: the batch goes once those cancelled meanwhile are dropped

    async def _run_batch(self, items: list[Item]) -> list[dict[str, Any] | Exception]:
        """Each item's result, or the error of its own forward pass: each shape is a pass of its own, and one that
        fails (an input shape the engine refuses) fails only the requests in it."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.tensor.shape), []).append(i)
        out: list[dict[str, Any] | Exception] = [{} for _ in items]
        for shape_rows in groups.values():
            rows = [i for i in shape_rows if not items[i].answer.done()]  # cancelled during an earlier pass: dropped
            if not rows:
                continue
            start, t0 = time.time(), time.perf_counter()  # its wait includes the batch's passes before it
            self._pass_started = t0
            try:
                batch = np.stack([items[i].tensor for i in rows])
                desc = await asyncio.to_thread(self.engine.embed, batch)  # the loop keeps answering status calls
            except Exception as e:  # noqa: BLE001 - the requests of this pass get the engine's error
                for i in rows:
                    out[i] = e
                continue
            finally:
                self._pass_started = None
            infer_s = time.perf_counter() - t0
            self._deaths = 0
            self.batches += 1
            self.images += len(rows)
            for j, i in enumerate(rows):
                out[i] = {
                    "descriptor": np.asarray(desc[j], np.float32),
                    "queue_s": max(0.0, start - items[i].submitted),
                    "infer_s": infer_s,
                    "batch_size": len(rows),
                    "batch": f"{self._passes}:{self.batches}",
                    "replica": self.replica,
                    "actor": self.actor,
                }
        return out

    async def check_health(self) -> None:
        """Serve's health check: raises :class:`Wedged` (Serve replaces the replica) when :meth:`wedged` says why.
        A coroutine: it runs on the replica's event loop, so a loop that no longer runs fails it by its timeout."""
        why = self.wedged()
        if why:
            raise Wedged(why)

    def wedged(self) -> str | None:
        """Why this replica cannot recover by itself, or None: its forward pass has run past :attr:`hang_s` (an
        engine that hangs holds the only engine thread), or its last :data:`BATCHER_DEATHS` batching tasks died
        with no forward pass answered between (every request gets 503). One batcher that died is no reason: the
        next request starts another."""
        started = self._pass_started
        pass_s = 0.0 if started is None else time.perf_counter() - started
        if pass_s > self.hang_s:
            limit = f"{HANG_FACTOR:g} x --request-timeout, at least {HANG_FLOOR_S:g} s"
            return f"replica {self.replica}'s forward pass has run {pass_s:.0f} s, over {self.hang_s:g} s ({limit})"
        if self._deaths >= BATCHER_DEATHS:
            return (f"replica {self.replica}'s batching task died {self._deaths} times in a row with no forward "
                    f"pass answered between (last: {self._death})")  # fmt: skip
        return None

    async def status(self) -> dict[str, Any]:
        """:meth:`snapshot`, through Serve (a call it queues behind the embed calls)."""
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Whether this replica is warm (always, once constructed), its engine, names, process id, how long its
        forward pass has run (0 between passes), after how long a pass Serve replaces it, whether it is wedged (why its
        health check fails) and counters."""
        started = self._pass_started
        return {
            "warm": self.warm,
            "engine": self.engine.label,
            "descriptor_dim": int(self.engine.descriptor_dim),
            "replica": self.replica,
            "actor": self.actor,
            "pid": os.getpid(),  # on the replica's node
            "pass_s": 0.0 if started is None else round(time.perf_counter() - started, 6),
            "replaced_after_s": None if self.hang_s == float("inf") else self.hang_s,  # a pass this long: wedged
            "wedged": self.wedged(),  # why Serve is replacing it (its health check fails), or None
            "batches": self.batches,
            "images": self.images,
        }


def local_status(_actor: object, replica: str) -> dict[str, Any] | None:
    """The :meth:`Embedder.snapshot` of ``replica`` if it lives in this process, else None. Run in the replica's
    process by Ray's ``actor.__ray_call__.remote(local_status, replica)`` (``_actor``: the actor instance Ray
    passes, Serve's, unused): it reads this module's own record of the replica, no Serve internals."""
    embedder = _LOCAL.get(replica)
    return None if embedder is None else embedder.snapshot()


def actor_address() -> tuple[str, str] | None:
    """(namespace, name) of this Serve replica's Ray actor (``ray.get_actor`` finds it by them), or None outside a
    Serve replica (asked only inside one, where Ray runs: ``ray.get_runtime_context()`` would start Ray)."""
    try:
        from ray import serve

        serve.get_replica_context()
        import ray

        if not ray.is_initialized():  # a replica context without Ray (tests)
            return None
        name = ray.get_runtime_context().get_actor_name()
        if not name:
            return None
        # Serve names its replicas' actors in a namespace of its own, not the worker's (runtime_context.namespace)
        spaces = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
        return (str(spaces[0]) if spaces else "serve", str(name))
    except Exception:  # noqa: BLE001 - not in a replica (RayServeException)
        return None


def replica_name(token: str) -> str:
    """The name of this replica in answers and ``/readyz``: Serve's replica id (as in ``serve status`` and Serve's
    logs), or ``token`` outside a Serve replica. A PID, the name before, is no name: replicas on two nodes (each
    container counts its own PIDs) can share one."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (RayServeException), or a Serve without replica ids
        return token


def combine_scales(descriptors: list[np.ndarray]) -> np.ndarray:
    """One image's descriptor from its per-scale ones: the float64 sum, L2-normalised (as ``extract`` and corpus
    jobs combine scales); a single scale is returned as is."""
    if len(descriptors) == 1:
        return np.asarray(descriptors[0], np.float32)
    total = np.sum([np.asarray(d, np.float64) for d in descriptors], axis=0)
    return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)


def embedder_deployment(settings: EngineSettings, options: dict[str, Any], request_timeout_s: float | None) -> Any:
    """The Serve deployment of :class:`Embedder` with ``options`` (:func:`embedder_options`), each replica told
    ``request_timeout_s`` (``--request-timeout``: when its engine counts as hung, :func:`hang_after`)."""
    from ray import serve

    return serve.deployment(**options)(Embedder).bind(settings, request_timeout_s)


def embedder_options(
    settings: EngineSettings,
    replicas: int | str,
    min_replicas: int,
    max_replicas: int,
    max_queue: int,
    cpus_per_replica: float,
    gpus_per_replica: float,
) -> dict[str, Any]:
    """The model deployment's Serve options: ``replicas`` fixed, or ``"auto"`` (autoscaling between
    ``min_replicas`` and ``max_replicas`` on ongoing requests); at most ``max_queue`` calls (one per image and
    scale) waiting in front of the replicas (past it Serve raises BackPressureError: the app answers 503 +
    Retry-After); a replica that dies or is wedged (:meth:`Embedder.check_health`, every 2 s) is replaced; on
    shutdown each replica finishes its requests first."""
    ongoing = 2 * settings.max_batch_size  # one batch running, the next one filling
    options: dict[str, Any] = {
        "name": "embedder",
        "max_ongoing_requests": ongoing,
        "max_queued_requests": max_queue,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": 30.0,
        "max_constructor_retry_count": 2,  # an engine that cannot open fails the start, not after 20 tries
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    }
    if replicas == "auto":
        options["autoscaling_config"] = autoscaling_config(settings.max_batch_size, min_replicas, max_replicas)
    else:
        options["num_replicas"] = int(replicas)
    return options


def autoscaling_config(max_batch_size: int, min_replicas: int, max_replicas: int) -> Any:
    """Serve's autoscaler for ``--replicas auto``: a replica per ``max_batch_size`` requests in flight, added 2 s
    after the load passes that, removed after 60 s below it.

    Serve's defaults average the load over 30 s and send it to the controller every 10 s: a second replica came
    15-27 s into a load here. We average over 5 s and send it every second (a few bytes per handle per second):
    it comes ~5 s in, plus the replica's start-up. ``metrics_interval_s`` is deprecated in Ray 2.60 (to become an
    environment variable, nothing replaces it yet): given while Ray still has it, its warning silenced."""
    import warnings

    from ray.serve.config import AutoscalingConfig

    fields: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": max_batch_size,
        "look_back_period_s": 5.0,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": 60.0,
    }
    if "metrics_interval_s" in AutoscalingConfig.model_fields:
        fields["metrics_interval_s"] = 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*metrics_interval_s", category=DeprecationWarning)
        return AutoscalingConfig(**fields)
