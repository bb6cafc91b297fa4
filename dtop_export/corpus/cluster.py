"""The Ray cluster a command runs on: an existing one (``--address``) or a local one started for the command, locked
down to this machine. Shared by ``embed --ray`` and ``serve``; ray is imported inside the functions.

A local cluster (Ray 2.60, measured with psutil, see ``tests/test_serve.py``):

* **node IP 127.0.0.1, every listener on loopback.** ``ray.init(_node_ip_address="127.0.0.1")`` and
  ``ray start --node-ip-address=127.0.0.1`` do not give that: Ray replaces a loopback node IP by the machine's
  address (``resolve_ip_for_localhost``), and its C++ servers then bind ``::`` (gcs_server, raylet, every worker),
  the dashboard agent's metrics exporter ``0.0.0.0`` and the runtime-env agent the machine's address. Ray keeps a
  node on loopback only in its single-machine mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the default on macOS
  and Windows): then every process gets ``--node-ip-address=127.0.0.1`` and every listener binds 127.0.0.1.
  Upstream moved the C++ servers from ``0.0.0.0`` to the node IP in 2026 (ray-project/ray#59852); that mode is
  what makes the node IP loopback in the first place.
* **token authentication on**: Ray's default for a new local cluster (it sets ``RAY_AUTH_MODE=token`` and makes
  a token in ``~/.ray/auth_token``); an inherited ``RAY_AUTH_MODE`` other than ``token`` is dropped so that it
  cannot turn it off, and the connection is checked after start. A gRPC call without the token is refused.
* **no dashboard** (``include_dashboard=False``: no HTTP server on 8265) and no usage-stats reporting.

What stays open (on 127.0.0.1 only; other local users can reach it, see the README's "Serving" for the firewall
advice): the gRPC ports of gcs_server, raylet (node manager, object manager) and every worker (token-protected),
the dashboard agent's gRPC/HTTP ports and the Prometheus exporters of the metrics agent, autoscaler monitor (44217)
and dashboard head (44227), and the runtime-env agent's HTTP port. Ray has no option to turn those off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.logs import DropMessages

# Environment of a local cluster (set for ray.init and inherited by every Ray process it starts).
LOCAL_CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: node IP 127.0.0.1, loopback listeners
    "RAY_USAGE_STATS_ENABLED": "0",
}

# The local cluster a command starts lives as long as the command: Ray's notice that it enabled token
# authentication (secure, the default) and how to opt out is not for our users; its notice that authentication is
# *disabled* still shows. Ray Data's hint to turn its progress bars back on: the driver draws its own bar.
_NOTICES = {
    "ray._private.authentication.authentication_token_setup": DropMessages("Token authentication is enabled"),
    "ray.data._internal.progress": DropMessages("Progress bars disabled"),
}


# Lines Ray's processes print that the driver relays and that are not for our users: Serve's controller tasks
# retried after serve.shutdown() killed it (every stop) and its note that the ingress, which does not autoscale,
# has no autoscaling state (every start and stop with --replicas auto).
WORKER_NOISE = (
    ("Task ServeController.", "killed by `ray.kill`"),
    ("Cannot deregister autoscaling state for deployment",),
)


def quiet_notices() -> None:
    """Drop Ray's notices that are not for our users (idempotent)."""
    for name, notice in _NOTICES.items():
        logger = logging.getLogger(name)
        if notice not in logger.filters:
            logger.addFilter(notice)


def quiet_worker_lines() -> None:
    """Drop the :data:`WORKER_NOISE` lines from what the driver prints of its workers' output and of the errors
    the cluster publishes (idempotent). Both go through Ray's internal ``print_worker_logs``, wrapped here; when it
    is not where it was, every line passes."""
    try:
        from ray._private import worker
    except ImportError:
        return
    show = getattr(worker, "print_worker_logs", None)
    if show is None or getattr(show, "drops_noise", False):
        return

    def print_worker_logs(data: dict[str, Any], print_file: Any, ignore_prefix: bool = False) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(all(p in ln for p in n) for n in WORKER_NOISE)]
        if lines or not data.get("lines"):
            show({**data, "lines": lines}, print_file, ignore_prefix)

    print_worker_logs.drops_noise = True  # type: ignore[attr-defined]
    worker.print_worker_logs = print_worker_logs


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """:data:`LOCAL_CLUSTER_ENV` in ``os.environ`` (kept: the processes Ray starts later inherit it) and Ray's
    module constant that the variable sets at import, for a ray imported before the variable was set."""
    from ray._private import ray_constants

    os.environ.update(LOCAL_CLUSTER_ENV)
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def cluster_address(address: str | None) -> str | None:
    """``address`` as :func:`connect` takes it: None for a local cluster (no address, or ``local``, Ray's own name
    for one), else unchanged."""
    return None if address is None or address.strip() == "local" else address


def connect(address: str | None, **init_options: Any) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local one locked to this machine (see the module's
    notes) when ``address`` is None or ``local``; True when this call started the connection (the caller shuts it
    down). ``init_options`` go to ``ray.init`` (e.g. ``num_cpus``)."""
    import ray

    address = cluster_address(address)
    if ray.is_initialized():
        return False
    quiet_notices()
    quiet_worker_lines()
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "configure_logging": True}
    options.update(init_options)
    with _keeping_sigterm():
        _init(ray, address, options)
    return True


def _init(ray: Any, address: str | None, options: dict[str, Any]) -> None:
    try:
        if address is None:
            with _single_machine_mode():
                if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
                    del os.environ["RAY_AUTH_MODE"]  # unset: Ray turns token authentication on for a new cluster
                ray.init(_node_ip_address="127.0.0.1", **options)
            if not token_auth_enabled():
                ray.shutdown()
                raise DToPError("the local Ray cluster started without token authentication: unset RAY_AUTH_MODE")
        else:
            gcs = gcs_address(address)  # auto: found once (Ray looks through this machine's processes)
            check_reachable(address, gcs)
            # A cluster on loopback (`ray start --node-ip-address 127.0.0.1` in single-machine mode): without that
            # mode this driver would look for its GCS at the machine's address (Ray's resolve_ip_for_localhost)
            # and retry for minutes.
            loopback = gcs is not None and gcs[0] in LOOPBACK
            with _single_machine_mode() if loopback else contextlib.nullcontext():
                ray.init(address=address, **options)
    except Exception as e:
        problem, why = _token_problem(e)
        if problem == "missing":
            raise DToPError(
                f"token authentication is on (RAY_AUTH_MODE=token) but this machine has no token for the Ray cluster "
                f"at {address} ({why}): give the cluster's token as RAY_AUTH_TOKEN, or in ~/.ray/auth_token (or the "
                "file RAY_AUTH_TOKEN_PATH names)"
            ) from e
        if problem == "refused":
            raise DToPError(
                f"the Ray cluster at {address} refused this connection's authentication token: when it uses token "
                "authentication (Ray's default), set RAY_AUTH_MODE=token and give the cluster's token "
                "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token); Ray enables it on its own only for --address auto"
            ) from e
        if isinstance(e, ConnectionError):
            raise DToPError(f"cannot reach the Ray cluster at {address}: {e}; start one with `ray start --head`") from e
        raise


@contextlib.contextmanager
def _keeping_sigterm() -> Iterator[None]:
    """``ray.init`` installs a SIGTERM handler of its own (``sys.exit(signum)``), replacing the CLI's, which stops a
    command as Ctrl-C does (its temporary files removed, exit 143): put back the handler that was there (main
    thread only; ``serve`` installs its own after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as e:  # SIGTERM while ray.init starts a node: its handler's sys.exit(15), not the CLI's
        from dtop_export.errors import raise_interrupted

        if e.code == signal.SIGTERM and before is raise_interrupted:
            raise_interrupted(signal.SIGTERM, None)  # Interrupted: the cleanup, its line, exit 143
        raise
    finally:
        if before is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, before)


def _token_problem(error: BaseException) -> tuple[str | None, str]:
    """Why ``ray.init`` failed, as far as tokens go: ``("refused", "")`` when the cluster refused ours (its gRPC
    InvalidAuthToken, which Ray quotes as text in the RuntimeError it raises from its AuthenticationError),
    ``("missing", Ray's reason)`` when this side has none to send (Ray's AuthenticationError before any call),
    else ``(None, "")``."""
    import ray.exceptions

    from dtop_export.errors import find_cause

    kind = getattr(ray.exceptions, "AuthenticationError", None)  # Ray >= 2.52
    found = find_cause(error, kind) if kind is not None else None
    if "InvalidAuthToken" in f"{getattr(found, 'message', '')} {error.__cause__ or ''}":
        return "refused", ""
    if found is not None:
        return "missing", str(getattr(found, "message", "") or type(found).__name__).rstrip(".")
    return None, ""


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def gcs_address(address: str) -> tuple[str, int] | None:
    """The GCS host and port that ``address`` names (``auto`` as ``ray.init`` finds it: ``$RAY_ADDRESS``, else the
    cluster ``ray start`` last made on this machine, else any running here; a :class:`ConnectionError` when there
    is none); None for addresses Ray resolves itself (``ray://`` clients, ``local``)."""
    if "://" in address or address == "local":
        return None
    found = address
    if address == "auto":  # ray.init reads $RAY_ADDRESS only then: an explicit address wins
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment(address, None)
    host, _, port = str(found).rpartition(":")
    if not host or not port.isdigit():
        return None  # malformed: ray.init says what is wrong
    return host.strip("[]"), int(port)


def check_reachable(address: str, gcs: tuple[str, int] | None, timeout: float = 5.0) -> None:
    """Refuse, in one line, an ``--address`` (``HOST:PORT``, ``ray://HOST:PORT``, or ``auto``: the cluster
    :func:`gcs_address` found, ``gcs``) where nothing accepts a connection within ``timeout`` seconds: ``ray.init``
    would retry for minutes, printing a warning every few seconds."""
    import socket

    target = f"{gcs[0]}:{gcs[1]}" if address == "auto" and gcs else address
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit() or not host:
        raise DToPError(f"--address {address}: give HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379), ray://HOST:PORT "
                        "or auto")  # fmt: skip
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        where = address if target == address else f"{address} ({target})"
        raise DToPError(
            f"cannot reach the Ray cluster at {where} ({e.strerror or e}): start one there with `ray start --head`, "
            "or fix --address"
        ) from e


def token_auth_enabled() -> bool:
    """Whether this process's Ray connection uses token authentication."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())
