"""The HTTP side of the service: routes, the bounded queue, errors as JSON, Prometheus metrics, and the driver that
starts it all (:func:`dtop_export.serve.run.run_service`).

Routes (FastAPI in a Ray Serve ingress deployment; see the README's "Serving")::

    POST /v1/embed    image(s) -> descriptor(s)        raw image body, or multipart with up to --max-images files
    POST /v1/search   image or descriptor -> top-k     ?k=10&nprobe=..., needs --index
    GET  /v1/model    the deployment contract (model, checkpoint, preprocessing, batching, limits, index)
    GET  /healthz     live (the app answers)           GET /readyz  a warm replica is alive (see readiness.py)
    GET  /metrics     Prometheus text

The app decodes and preprocesses uploads (:mod:`dtop_export.serve.limits`, the one decoding path) and sends each
image's tensors to the model deployment (:mod:`dtop_export.serve.deployment`); scales are combined as ``embed``
combines them. A request's body is read before it takes a place in the model's queue, under a count of its own
(:mod:`dtop_export.serve.intake`); ``--request-timeout`` counts from the request's arrival. Errors are
``{"error": "...", "status": N}``: 4xx for bad requests, 408 for an upload not received in time, 503 +
Retry-After when the queue is full or a replica died under the request, 504 past ``--request-timeout``; a client
that went away is counted as 499. ray, fastapi and prometheus_client are imported inside the functions.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``request: Request``, a
# name local to :func:`build_app`) at run time.
import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.serve.deployment import BatcherStopped, EngineSettings, combine_scales
from dtop_export.serve.intake import CLIENT_CLOSED, Intake, left
from dtop_export.serve.limits import (
    RETRY_AFTER_S,
    Admission,
    Limits,
    RequestError,
    bounded_int,
    check_length,
    read_images,
)
from dtop_export.serve.metrics import Metrics
from dtop_export.serve.readiness import Replicas, check

APP_NAME = "dtop"
API_VERSION = "v1"
ENCODINGS = ("json", "base64")


@dataclass(frozen=True)
class ServiceInfo:
    """What the app knows about the model without running it (read by the driver, shown by ``GET /v1/model``)."""

    model: str
    model_sha256: str
    checkpoint_sha256: str
    descriptor_dim: int
    preprocess: dict[str, Any]
    image_size: int
    scales: tuple[float, ...] = (1.0,)
    index: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


def replica_error(e: BaseException) -> str:
    """The first line of what a model replica raised, with its type. A RayTaskError's own text starts with Ray's task
    header in terminal colours (``ray::ServeReplica...() (pid=.., ip=..)``), not the error: its ``cause`` is."""
    cause = getattr(e, "cause", None) or e
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else 'no message'}"


def error_response(e: RequestError) -> Any:
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return _json(e.payload(), e.status, headers)


async def all_or_none(calls: list[Any], timeout_s: float) -> list[Any]:
    """The answers of a request's model calls (Serve responses), in order; when one fails, time runs out or the
    request is cancelled (its client gone), the others are cancelled before the error goes on: none keeps a place
    in the model's queue or batch for an answer no one reads."""
    try:
        return await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
    except BaseException:
        for c in calls:
            c.cancel()
        raise


class Service:
    """The routes' work, given the model deployment's handle (plain Python: the ingress class wraps it)."""

    def __init__(
        self, info: ServiceInfo, limits: Limits, embedder: Any, capacity: int, decode_threads: int | None = None
    ) -> None:
        from dtop_export.preprocess import PreprocessConfig

        self.info, self.limits, self.embedder = info, limits, embedder
        self.preprocess = PreprocessConfig.from_dict(info.preprocess)
        self.admission = Admission(capacity)
        self.intake = Intake(limits, self.preprocess, info.image_size, info.scales, decode_threads)
        self.metrics = Metrics()
        self.draining = False  # set on shutdown: new requests get 503, the ones inside finish
        self.replicas = Replicas()  # the model replicas heard from, asked directly by /readyz
        self.routed_timeout_s = 2.0  # /readyz's status call through Serve (to a replica not heard from yet)
        self.index = None
        if info.index is not None:
            from dtop_export.corpus.index import CorpusIndex

            self.index = CorpusIndex(info.index)

    # plumbing -----------------------------------------------------------------------------------------------

    async def observe(self, route: str, handler: Callable[[], Any], admit: bool = False) -> Any:
        """Run ``handler`` (a coroutine function returning a response), turning :class:`RequestError` into its JSON
        response and anything else into a 500; count and time it. ``admit``: refuse the request at the door while
        shutting down or while the model's queue is full (before its upload is read)."""
        t0 = time.perf_counter()
        try:
            if admit:
                if self.draining:
                    raise RequestError(503, "the service is shutting down: retry on another instance", 1.0)
                self.admission.check()
            response = await handler()
        except RequestError as e:
            response = error_response(e)
        except asyncio.CancelledError:  # Serve cancelled the request (its client left): no answer goes out
            self._count(route, CLIENT_CLOSED, t0)
            raise
        except Exception as e:  # noqa: BLE001 - the service answers every request, in JSON
            import logging

            logging.getLogger("dtop_export.serve").exception("request failed")
            response = _json({"error": f"internal error: {type(e).__name__}: {e}", "status": 500}, 500)
        self._count(route, response.status_code, t0)
        return response

    def _count(self, route: str, status: int, t0: float) -> None:
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    @property
    def inside(self) -> int:
        """Requests inside the service: uploading, or uploaded and in the model's queue."""
        return self.admission.inside + self.intake.uploads.inside

    async def _receive(self, read: Callable[[], Any], deadline: float) -> Any:
        """The body, read by ``read`` under an upload slot until ``deadline`` (:meth:`Intake.receive`)."""
        self.metrics.uploads.set(self.intake.uploads.inside + 1)
        try:
            return await self.intake.receive(read, deadline)
        finally:
            self.metrics.uploads.set(self.intake.uploads.inside)

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """A place in the model's queue (503 when full), for an uploaded request."""
        self.admission.enter()
        self.metrics.inflight.set(self.admission.inside)
        try:
            yield
        finally:
            self.admission.leave()
            self.metrics.inflight.set(self.admission.inside)

    async def _images(self, request: Any) -> list[tuple[str, bytes]]:
        check_length(request.headers.get("content-length"), self.limits)
        return await read_images(request.headers.get("content-type"), request.headers, request.stream(), self.limits)

    async def _embed_images(
        self, images: list[tuple[str, bytes]], deadline: float
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Decode, preprocess and embed ``images`` (all scales in parallel) by ``deadline``; their descriptors and
        the timing."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        t0 = time.perf_counter()
        tensors = await self.intake.decode(images, deadline)
        decode_s = time.perf_counter() - t0
        calls = [self.embedder.embed.remote(t, time.time()) for per_image in tensors for t in per_image]
        try:
            results = await all_or_none(calls, left(deadline))
        except asyncio.TimeoutError as e:
            raise RequestError(
                504, f"no answer within {self.limits.request_timeout_s:g} s (--request-timeout): retry later"
            ) from e
        except BackPressureError as e:
            raise RequestError(
                503, f"the model's queue is full ({self.limits.max_queue} waiting, --max-queue): retry later", 1.0
            ) from e
        except (RayActorError, DeploymentUnavailableError) as e:
            raise RequestError(503, f"a model replica failed under the request ({type(e).__name__}): retry", 1.0) from e
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), BatcherStopped):  # the next request gets a new batcher
                raise RequestError(503, f"the model replica failed under the request: {replica_error(e)}", 1.0) from e
            raise RequestError(500, f"the model replica could not embed the image: {replica_error(e)}") from e
        descriptors, k = [], 0
        for per_image in tensors:
            descriptors.append(combine_scales([results[k + i]["descriptor"] for i in range(len(per_image))]))
            k += len(per_image)
        for r in results:
            self.replicas.heard(r["replica"], r.get("actor"))
            self.metrics.queue.observe(r["queue_s"])
            self.metrics.forward_pass(r["batch"], r["batch_size"])
        self.metrics.images.inc(len(images))
        timing = {
            "decode_ms": round(decode_s * 1000, 3),
            "queue_ms": round(max(r["queue_s"] for r in results) * 1000, 3),
            "route_ms": round(max(r["route_s"] for r in results) * 1000, 3),
            "infer_ms": round(max(r["infer_s"] for r in results) * 1000, 3),
            "batch_sizes": [r["batch_size"] for r in results],
            "replicas": sorted({r["replica"] for r in results}),
        }
        return descriptors, timing

    def _identity(self) -> dict[str, Any]:
        return {
            "model": Path(self.info.model).name,
            "model_sha256": self.info.model_sha256,
            "checkpoint_sha256": self.info.checkpoint_sha256,
            "dim": self.info.descriptor_dim,
        }

    # routes -------------------------------------------------------------------------------------------------

    async def embed(self, request: Any) -> Any:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.limits.request_timeout_s
        encoding = request.query_params.get("encoding", "json")
        if encoding not in ENCODINGS:
            raise RequestError(422, f"encoding={encoding!r}: choose {' or '.join(ENCODINGS)}")
        images = await self._receive(lambda: self._images(request), deadline)
        async with self._admitted():
            descriptors, timing = await self._embed_images(images, deadline)
        out = []
        for (name, _), d in zip(images, descriptors):
            if encoding == "json":
                out.append({"name": name, "descriptor": d.tolist()})
            else:
                out.append({"name": name, "descriptor_b64": base64.b64encode(d.astype("<f4").tobytes()).decode()})
        timing["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return _json({**self._identity(), "encoding": encoding, "images": out, "timing": timing})

    async def search(self, request: Any) -> Any:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.limits.request_timeout_s
        if self.index is None:
            raise RequestError(
                404, "this service has no index: start it with `dtop-export serve MODEL --index X.faiss`"
            )
        k = bounded_int("k", request.query_params.get("k"), 10, 1, self.limits.max_k)
        nprobe_text = request.query_params.get("nprobe")
        nprobe = None
        if nprobe_text is not None:
            if self.index.info["type"] != "ivfpq":
                raise RequestError(422, "nprobe applies to an IVF-PQ index only; this one is exact (flat)")
            nlist = int(self.index.info["params"]["nlist"])
            nprobe = bounded_int("nprobe", nprobe_text, nlist, 1, nlist)
        timing: dict[str, Any] = {}
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await self._receive(lambda: self._body(request), deadline)
            query, name, images = self._descriptor(body), "descriptor", None
        else:
            images = await self._receive(lambda: self._images(request), deadline)
            if len(images) != 1:
                raise RequestError(413, f"search takes one image per request, got {len(images)}")
            name = images[0][0]
        async with self._admitted():
            if images is not None:
                descriptors, timing = await self._embed_images(images, deadline)
                query = descriptors[0]
            t1 = time.perf_counter()
            hits = (await asyncio.to_thread(self.index.search, query[None, :], k, nprobe))[0]
        timing["search_ms"] = round((time.perf_counter() - t1) * 1000, 3)
        timing["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return _json(
            {
                **self._identity(),
                "query": name,
                "k": k,
                "results": [{"rank": h.rank, "score": h.score, "id": h.id, "path": h.path, "key": h.key} for h in hits],
                "timing": timing,
            }
        )

    async def _body(self, request: Any) -> bytes:
        from dtop_export.serve.limits import capped

        check_length(request.headers.get("content-length"), self.limits)
        return b"".join([c async for c in capped(request.stream(), self.limits)])

    def _descriptor(self, body: bytes) -> np.ndarray:
        """A query descriptor sent as JSON: ``{"descriptor": [floats]}`` or ``{"descriptor_b64": "..."}``
        (float32 little-endian, as ``/v1/embed?encoding=base64`` returns it)."""
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the JSON body does not parse: {e}") from e
        except (ValueError, RecursionError) as e:  # Python's own limits, a 500 before
            raise RequestError(
                400, "the JSON body does not parse: it holds an integer of over 4300 digits or arrays nested too deep"
            ) from e
        try:
            if isinstance(doc, dict) and "descriptor_b64" in doc:
                q = np.frombuffer(base64.b64decode(doc["descriptor_b64"], validate=True), "<f4")
            elif isinstance(doc, dict) and "descriptor" in doc:
                q = np.asarray(doc["descriptor"], np.float32)
            else:
                raise RequestError(400, 'send {"descriptor": [...]} or {"descriptor_b64": "..."}')
        except (ValueError, TypeError, OverflowError) as e:  # OverflowError: an integer past float's range
            raise RequestError(400, f"the descriptor is not a list of numbers / base64 float32: {e}") from e
        if q.ndim != 1 or q.shape[0] != self.info.descriptor_dim or not np.all(np.isfinite(q)):
            raise RequestError(
                422, f"the descriptor must hold {self.info.descriptor_dim} finite numbers, got shape {list(q.shape)}"
            )
        return q

    async def model(self) -> Any:
        """The contract; the server's files by name only (their folders say nothing a client needs)."""
        payload = {**self._identity(), "api": API_VERSION, **self.info.to_dict(), "limits": self.limits.to_dict()}
        payload["model"] = Path(self.info.model).name
        if "model" in payload["engine"]:
            payload["engine"] = {**payload["engine"], "model": Path(str(payload["engine"]["model"])).name}
        if self.index is not None:
            payload["index"] = {"path": self.index.path.name, **{k: self.index.info[k] for k in ("type", "ntotal")}}
        return _json(payload)

    async def ready(self) -> Any:
        """200 when a warm model replica is alive, however busy; 503 otherwise and while shutting down
        (:func:`dtop_export.serve.readiness.check`)."""
        if self.draining:
            return _json({"ready": False, "reason": "shutting down"}, 503)
        doc = await check(self.replicas, self.embedder, self.routed_timeout_s, self.limits.request_timeout_s)
        self.metrics.ready.set(1 if doc["ready"] else 0)
        return _json(doc, 200 if doc["ready"] else 503, None if doc["ready"] else {"Retry-After": "1"})


def ingress_options(limits: Limits, capacity: int) -> dict[str, Any]:
    """The ingress deployment's Serve options. The app's admission (``--max-uploads`` uploads, ``capacity``
    requests) answers first, in JSON; Serve's own bound behind it (64 more at once, 64 queued) is a backstop: past
    it Ray's proxy refuses a request
    itself, a plain-text 503 with Ray's message (Ray 2.60 lets a deployment set that answer's status and
    Retry-After, not its body), given the app's Retry-After. The client reads either as a ServiceError."""
    return {
        "name": "ingress",
        "max_ongoing_requests": capacity + limits.max_uploads + 64,
        "max_queued_requests": 64,
        "backpressure_config": {"retry_after_s": RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": 0},
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": limits.request_timeout_s + 5,
        "health_check_period_s": 2.0,
    }


def build_app(
    info: ServiceInfo,
    limits: Limits,
    settings: EngineSettings,
    replicas: int | str = 1,
    min_replicas: int = 1,
    max_replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
) -> Any:
    """The Serve application: the ingress (this module's routes) bound to the model deployment."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from ray import serve
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    from dtop_export.serve.deployment import embedder_deployment, embedder_options

    api = FastAPI(title="dtop-export serve", version=API_VERSION, docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:  # 404/405 in the service's JSON shape
        return _json({"error": f"{exc.detail}: {request.method} {request.url.path}", "status": exc.status_code},
                     exc.status_code)  # fmt: skip

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _json({"error": str(exc), "status": 422}, 422)

    capacity = limits.max_queue + 2 * settings.max_batch_size * (max_replicas if replicas == "auto" else int(replicas))
    # Serve's own queue bound counts requests still being assigned to a replica (a burst of 3 on idle replicas can
    # exceed a queue of 2): the app's admission is the bound users set; Serve's is a backstop behind it. Serve counts
    # model calls, one per image and scale: an admitted request makes up to max_images x scales of them.
    calls = capacity * limits.max_images * len(info.scales)
    options = embedder_options(settings, replicas, min_replicas, max_replicas, calls, cpus_per_replica,
                               gpus_per_replica)  # fmt: skip
    model = embedder_deployment(settings, options, limits.request_timeout_s)

    @serve.deployment(**ingress_options(limits, capacity))
    @serve.ingress(api)
    class Ingress:
        def __init__(self, embedder: Any) -> None:
            self.service = Service(info, limits, embedder, capacity)

        @api.post(f"/{API_VERSION}/embed")
        async def embed(self, request: Request) -> Any:
            return await self.service.observe("embed", lambda: self.service.embed(request), admit=True)

        @api.post(f"/{API_VERSION}/search")
        async def search(self, request: Request) -> Any:
            return await self.service.observe("search", lambda: self.service.search(request), admit=True)

        @api.get(f"/{API_VERSION}/model")
        async def model(self) -> Any:
            return await self.service.observe("model", self.service.model)

        @api.get("/healthz")
        async def healthz(self) -> Any:
            return _json({"live": True})

        @api.get("/readyz")
        async def readyz(self) -> Any:
            return await self.service.observe("readyz", self.service.ready)

        @api.get("/metrics")
        async def metrics(self) -> Any:
            body, kind = self.service.metrics.render()
            return Response(body, media_type=kind)

        async def drain(self) -> int:
            """Stop admitting requests (the driver's graceful shutdown); the number still inside."""
            self.service.draining = True
            return self.service.inside

        async def inflight(self) -> int:
            return self.service.inside

    return Ingress.bind(model)
