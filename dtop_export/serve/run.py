"""The driver of ``dtop-export serve``: check the options and the model, start (or join) the Ray cluster and Serve's
HTTP proxy, deploy the app (:func:`dtop_export.serve.app.build_app`), serve until SIGTERM/SIGINT, then shut down
gracefully (new requests refused, the ones inside answered). ray is imported inside the functions.
"""

import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError
from dtop_export.serve.app import APP_NAME, ServiceInfo, build_app
from dtop_export.serve.deployment import EngineSettings
from dtop_export.serve.limits import Limits

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec

SERVE_INSTALL = "pip install 'dtop-export[serve]'"  # Ray Serve and python-multipart (Starlette's form parser)


@dataclass
class ServeOptions:
    """``dtop-export serve``'s options (see the CLI's help)."""

    model: str
    index: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 4
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    precision: str | None = None
    threads: int | None = None
    gpus_per_replica: float = 0.0
    image_size: int | None = None
    scales: tuple[float, ...] = (1.0,)
    limits: Limits = field(default_factory=Limits)
    force: bool = False

    def __post_init__(self) -> None:
        from dtop_export.corpus.cluster import cluster_address

        self.address = cluster_address(self.address)  # `local`: a local cluster, as no address


def check_port_free(host: str, port: int) -> None:
    """Refuse, before starting anything, a port another process holds (Serve would retry its proxy forever)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise DToPError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e


def service_info(opts: ServeOptions) -> ServiceInfo:
    """The contract the app serves: MODEL's preprocessing and descriptor size (read without running it), its file
    and checkpoint identity, and the corpus's image size and scales when ``--index`` is given (refusing a model of
    another checkpoint than the corpus's unless ``--force``)."""
    from dtop_export.corpus.runtime import model_contract
    from dtop_export.corpus.shards import file_sha256
    from dtop_export.identity import check_model_for_corpus, checkpoint_of

    contract = model_contract(opts.model)
    size, scales, index = opts.image_size or contract.preprocess.size, opts.scales, None
    if opts.index is not None:
        from dtop_export.corpus.index import CorpusIndex

        idx = CorpusIndex(opts.index)
        corpus = idx.info["corpus"]
        check_model_for_corpus(opts.model, corpus, f"index {idx.path}", opts.force)
        if idx.dim != contract.descriptor_dim:
            raise DToPError(f"{opts.model} gives {contract.descriptor_dim}-d descriptors; the index holds {idx.dim}-d")
        if opts.image_size is not None and opts.image_size != int(corpus["image_size"]):
            raise DToPError(
                f"--image-size {opts.image_size} differs from the corpus's {corpus['image_size']}: leave it out"
            )
        size, scales, index = int(corpus["image_size"]), tuple(float(s) for s in corpus["scales"]), str(idx.path)
    from dtop_export.bench.spec import parse_spec

    path = parse_spec(opts.model).path
    return ServiceInfo(
        model=str(opts.model),
        model_sha256=file_sha256(path),
        checkpoint_sha256=checkpoint_of(opts.model) or "",
        descriptor_dim=contract.descriptor_dim,
        preprocess=contract.preprocess.to_dict(),
        image_size=int(size),
        scales=tuple(scales),
        index=index,
    )


def engine_settings(opts: ServeOptions, image_size: int, resolved: "EngineSpec | None" = None) -> EngineSettings:
    """How every replica opens MODEL: ``--precision auto`` resolved once, here (the file and options `bench
    --recommend` chose on this machine; ``resolved`` when the caller did it already), not by each replica from its
    own node's cache, so every replica runs the same file at the same precision and ``/v1/model`` names it."""
    from dtop_export.corpus.runtime import resolve_engine

    resolved = resolved or resolve_engine(opts.model, opts.precision)
    return EngineSettings(
        str(resolved.path), opts.threads or 1, None, opts.max_batch_size, opts.batch_wait_ms,
        warmup_size=image_size, options=dict(resolved.options),
    )  # fmt: skip


def parses_multipart() -> bool:
    """Whether Starlette can parse a multipart upload: its own test (``starlette.formparsers`` imports
    ``python_multipart``, or an old python-multipart's ``multipart.multipart``). A module merely named ``multipart``
    (another PyPI package of that name) passed a look-up by name, and every upload was a 500."""
    try:
        from starlette import formparsers
    except ImportError:
        return False
    return getattr(formparsers, "parse_options_header", None) is not None


def run_service(opts: ServeOptions, say: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Start the service and serve until SIGTERM/SIGINT (or ``stop``): a local Ray cluster locked to this machine
    unless ``--address``, Serve's HTTP proxy on ``host:port``, the app; then a graceful shutdown (in-flight
    requests finish, up to ``--request-timeout``)."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise DToPError(f"serve needs Ray Serve: {SERVE_INSTALL}") from e
    if not parses_multipart():  # Ray Serve without python-multipart
        raise DToPError(f"serve needs python-multipart for multipart uploads: {SERVE_INSTALL}")
    from dtop_export.bench.spec import parse_spec
    from dtop_export.corpus.cluster import connect
    from dtop_export.corpus.runtime import check_model_options, gpu_reason, resolve_engine

    _check_options(opts)
    why = gpu_reason(parse_spec(opts.model))
    if why and not opts.gpus_per_replica:
        raise DToPError(f"{opts.model} runs on a GPU ({why}): give --gpus-per-replica (Ray hides GPUs from replicas "
                        "that reserve none)")  # fmt: skip
    # bad options: one line, before any cluster; threads checked here on a local cluster, on its node by a replica
    resolved = resolve_engine(opts.model, opts.precision)  # once: what is checked is what every replica opens
    check_model_options(resolved, opts.threads, local_threads=opts.address is None)
    info = service_info(opts)
    if opts.address is None:
        check_port_free(opts.host, opts.port)
    settings = engine_settings(opts, info.image_size, resolved)
    info = replace(
        info,
        engine=settings.to_dict() | {"replicas": opts.replicas, "gpus_per_replica": opts.gpus_per_replica},
    )
    stop = stop or threading.Event()
    started = connect(opts.address)
    serve_was_running, deployed = True, False  # until known: a failure before then leaves a cluster's Serve alone
    _on_signals(stop)  # after Ray's start (its core worker installs handlers of its own), before Serve's
    try:
        _check_resources(opts, float(settings.threads or 1), ray.cluster_resources())
        if opts.host not in ("127.0.0.1", "localhost", "::1"):
            say(f"warning: listening on {opts.host}: anyone who can reach this machine can use the service "
                "(it has no authentication; put it behind a proxy or a firewall)")  # fmt: skip
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        quiet = {"log_level": "WARNING"}
        serve_was_running = _check_running_serve(opts)
        _start_proxy(opts, quiet)
        app = build_app(
            info, opts.limits, settings, opts.replicas, opts.min_replicas, opts.max_replicas,
            cpus_per_replica=float(settings.threads or 1), gpus_per_replica=opts.gpus_per_replica,
        )  # fmt: skip
        count = (
            f"{opts.min_replicas} replica(s), autoscaled up to {opts.max_replicas} (a replica per "
            f"{opts.max_batch_size} requests in flight)"
            if opts.replicas == "auto"
            else f"{opts.replicas} replica(s)"
        )
        say(f"starting {count} of {opts.model} ({info.image_size} px)")
        deployed = True  # from here on the app named APP_NAME is ours (also when serve.run fails halfway)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
        except RuntimeError as e:  # Serve's "Deploying application failed": a replica that could not start
            raise DToPError(f"the service could not start: {str(e).strip().splitlines()[0]} (the replicas' errors "
                            "are above)") from e  # fmt: skip
        say(f"serving on http://{_url_host(opts.host)}:{opts.port} (POST /v1/embed, /v1/search; GET /v1/model, "
            "/healthz, /readyz, /metrics); Ctrl-C or SIGTERM stops it")  # fmt: skip
        _wait(stop)
        say("stopping: finishing the requests in flight")
        _drain(serve.get_app_handle(APP_NAME), opts.limits.request_timeout_s)
    finally:
        try:
            if started and opts.address is None:  # our own local cluster: all of it goes
                serve.shutdown()
            else:  # a cluster we joined (or a caller's): our app goes, Serve too if we started it and it is empty
                _leave_serve(deployed, serve_was_running, say)
        finally:
            if started:
                ray.shutdown()
    say("stopped")


def _start_proxy(opts: ServeOptions, logging_config: dict[str, str]) -> None:
    """Serve's controller and HTTP proxy; one line when the proxy does not come up (Serve gives it 60 s: on an
    overloaded machine its worker may not even start)."""
    import ray
    from ray import serve

    try:
        serve.start(
            http_options={"host": opts.host, "port": opts.port, "request_timeout_s": opts.limits.request_timeout_s + 5},
            proxy_location="HeadOnly",
            logging_config=logging_config,
        )
    except (TimeoutError, ray.exceptions.RayActorError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        if getattr(e, "actor_init_failed", False):  # its constructor raised: the last line says what
            raise DToPError(f"Ray Serve's HTTP proxy failed to start: {lines[-1]}") from e
        reason = next((ln for ln in lines if "never ran" in ln), lines[0])
        raise DToPError(
            f"Ray Serve's HTTP proxy did not start ({type(e).__name__}: {reason}): is the machine overloaded? Retry "
            "when it has a free CPU"
        ) from e


def _leave_serve(deployed: bool, serve_was_running: bool, say: Callable[[str], None]) -> None:
    """Remove our application from a cluster we joined, and Serve when we started it and nothing else runs there;
    a cluster (or Serve controller) that is gone by now is a warning, not an error over the one that stopped us."""
    from ray import serve

    try:
        if deployed and serve.status().applications.get(APP_NAME) is not None:
            serve.delete(APP_NAME)
        if not serve_was_running and not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - cleanup of a cluster that may have failed under us
        say(f"warning: could not remove the {APP_NAME!r} application from the Ray cluster ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); remove it with `serve shutdown` or "
            f"`serve.delete({APP_NAME!r})`")  # fmt: skip


def _check_running_serve(opts: ServeOptions) -> bool:
    """Whether Serve already runs on the cluster; refuses, in one line, what would clash with it: an application of
    our name (another ``dtop-export serve``: Serve would replace it) or an HTTP proxy on another host/port than
    ``--host``/``--port`` (Serve keeps its proxy and ignores ours: the service would not be where we say)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    status = serve.status()
    if APP_NAME in status.applications:
        raise DToPError(
            f"this Ray cluster already serves an application named {APP_NAME!r} (another dtop-export serve): stop "
            "it first, or serve on another cluster"
        )
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return False
    http = client.http_config
    if (http.host, http.port) != (opts.host, opts.port):
        raise DToPError(
            f"Ray Serve already runs on this cluster with its HTTP proxy on {_url_host(http.host)}:{http.port} "
            f"(one per cluster): give --host {http.host} --port {http.port}"
        )
    return True


def _check_options(opts: ServeOptions) -> None:
    if opts.replicas != "auto" and (not isinstance(opts.replicas, int) or opts.replicas < 1):
        raise DToPError(f"--replicas must be >= 1 or auto, got {opts.replicas}")
    if opts.replicas == "auto" and not 1 <= opts.min_replicas <= opts.max_replicas:
        raise DToPError(
            f"--min/--max replicas must satisfy 1 <= min <= max, got {opts.min_replicas}, {opts.max_replicas}"
        )
    if opts.max_batch_size < 1 or not (math.isfinite(opts.batch_wait_ms) and opts.batch_wait_ms >= 0):
        raise DToPError(
            f"--max-batch-size must be >= 1 and --batch-wait-ms a finite number >= 0, got {opts.max_batch_size}, "
            f"{opts.batch_wait_ms}"
        )
    if not (math.isfinite(opts.gpus_per_replica) and opts.gpus_per_replica >= 0):
        raise DToPError(f"--gpus-per-replica must be a finite number >= 0, got {opts.gpus_per_replica}")
    if opts.threads is not None and opts.threads < 1:
        raise DToPError(f"--threads must be >= 1, got {opts.threads}")
    if not 0 < opts.port < 65536:
        raise DToPError(f"--port must be 1..65535, got {opts.port}")


def _drain(ingress: Any, timeout_s: float) -> None:
    """Refuse new requests and wait (up to ``timeout_s``) until the ones inside have been answered: Serve's own
    shutdown closes the proxy's connections at once, in-flight requests included."""
    deadline = time.monotonic() + timeout_s
    inside = ingress.drain.remote().result(timeout_s=10)
    while inside and time.monotonic() < deadline:
        time.sleep(0.1)
        inside = ingress.inflight.remote().result(timeout_s=10)
    time.sleep(0.5)  # the proxy sends the last answers on


def _check_resources(opts: ServeOptions, cpus_per_replica: float, cluster: dict[str, float]) -> None:
    """Refuse replicas the cluster can never place (Serve would wait for them forever)."""
    n = opts.min_replicas if opts.replicas == "auto" else int(opts.replicas)
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if n * cpus_per_replica > cpus + 1e-9:
        raise DToPError(
            f"{n} replica(s) x {cpus_per_replica:g} CPUs (--threads) need {n * cpus_per_replica:g} CPUs; the Ray "
            f"cluster has {cpus:g}: use fewer --replicas or --threads"
        )
    if n * opts.gpus_per_replica > gpus + 1e-9:
        raise DToPError(f"{n} replica(s) x {opts.gpus_per_replica:g} GPUs need more than the cluster's {gpus:g}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _on_signals(stop: threading.Event) -> None:
    """The first SIGTERM/SIGINT sets ``stop`` (a graceful shutdown follows, also when it comes while Serve is still
    starting: the proxy may already be answering); a second one interrupts at once."""

    def handler(*_: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def _wait(stop: threading.Event) -> None:
    """Block until ``stop`` is set (by a signal, see :func:`_on_signals`)."""
    while not stop.wait(0.5):
        pass
