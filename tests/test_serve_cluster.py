"""``dtop-export serve --address``: the service on a Ray cluster it joins, next to another Serve application, with
autoscaling replicas. One cluster for the module, started as a user would keep one on a single machine
(``ray start --head --block --node-ip-address 127.0.0.1`` in Ray's single-machine mode, token authentication with
a token of its own, not the user's ``~/.ray``), stopped at the end (SIGTERM to the blocking ``ray start`` stops
every process it started).

Fast checks of the same code (no cluster): a cluster that does not answer, a token it refuses, the relay of
Ray's noise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dtop_export.serve.client import ServiceClient, free_port, start_service, stop_service

CLUSTER_START_S = 120
SCALE_UP_BOUND_S = 120  # a hang detector: the second replica served 6-9 s in here (5 s average + 2 s delay + start)

# A Serve application of someone else's on the same cluster: its proxy is the one our service must share.
OTHER_APP = """
import sys
import ray
from ray import serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    async def __call__(self, request):
        return "other"

ray.init(address=sys.argv[1], logging_level="ERROR")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])}, proxy_location="HeadOnly")
serve.run(Other.bind(), name="other", route_prefix="/other")
"""


def user_env(token: Path, **extra: str) -> dict[str, str]:
    """A user's shell: none of the variables a local cluster of this test session left in ``os.environ`` (the
    driver must find a loopback cluster on its own), token authentication asked for, with the token in ``token``."""
    drop = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), **extra}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dtop_export", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the cluster's GCS did not listen in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, Path]]:
    """The GCS address of a blocking ``ray start --head`` on loopback (2 CPUs, token auth) and its token file."""
    import secrets

    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    log = temp / "ray-start.log"
    ray = Path(sys.executable).with_name("ray")
    args = [
        str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            # stopped without the 30 s drain Ray gives a node's Serve proxies on SIGTERM (nothing to drain here)
            env=user_env(token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
            start_new_session=True,  # its process group: every process it started, for the SIGKILL fallback
        )
    try:
        wait_for_port(port, proc, log, CLUSTER_START_S)
        yield f"127.0.0.1:{port}", token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def test_joins_a_loopback_cluster_shares_its_proxy_autoscales_and_leaves_the_other_app(
    cluster: tuple[str, Path], small_onnx: Path, tmp_path: Path
) -> None:
    """On a cluster that already serves another app: a --port other than its proxy's is refused in one line; on
    the proxy's port the service answers next to the other app; under load (4 clients, --max-batch-size 1) a
    second replica starts and answers with the same descriptor; a second service of ours is refused (Serve would
    replace the first); after SIGTERM the other app still answers (Serve was not shut down under it)."""
    from dtop_export.retrieval.sample_data import skimage_data_dir

    cluster, token = cluster
    env = user_env(token)
    http = free_port()
    r = subprocess.run(
        [sys.executable, "-c", OTHER_APP, cluster, str(http)],
        capture_output=True, text=True, timeout=180, env=user_env(token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    other = f"http://127.0.0.1:{http}/other"
    assert urllib.request.urlopen(other, timeout=30).read() == b"other"

    common = [str(small_onnx), "--address", cluster, "--image-size", "128", "--threads", "1"]
    r = cli("serve", *common, "--port", str(free_port()), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: Ray Serve already runs on this cluster with its HTTP proxy on 127.0.0.1:{http} (one per cluster): "
        f"give --host 127.0.0.1 --port {http}"
    )

    log = tmp_path / "serve.log"
    auto = ["--replicas", "auto", "--min", "1", "--max", "2", "--max-batch-size", "1", "--batch-wait-ms", "0"]
    proc = start_service([*common, *auto], log, http, 180, env=env)
    try:
        url = f"http://127.0.0.1:{http}"
        assert json.loads(ServiceClient(url).request("GET", "/v1/model")[2])["engine"]["replicas"] == "auto"
        body = (skimage_data_dir() / "coffee.png").read_bytes()
        seen: dict[str, list[np.ndarray]] = {}
        errors: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            client = ServiceClient(url, timeout=60)
            while not stop.is_set():
                try:
                    status, _, data = client.request("POST", "/v1/embed", body, "image/png")
                    if status != 200:
                        errors.append(f"{status} {data[:200]!r}")
                        stop.wait(0.2)
                        continue
                    doc = json.loads(data)
                    (replica,) = doc["timing"]["replicas"]
                    seen.setdefault(replica, []).append(np.asarray(doc["images"][0]["descriptor"], np.float32))
                except Exception as e:  # noqa: BLE001 - a failed request fails the test now, not after the bound
                    errors.append(repr(e))
                    stop.set()
                if len(seen) >= 2:
                    stop.set()

        workers = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
        t0 = time.monotonic()
        [w.start() for w in workers]
        try:
            r = cli("serve", *common, "--port", str(http), env=env)  # a second service of ours, while the load runs
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert "already serves an application named 'dtop'" in r.stderr.strip().splitlines()[-1]
            stop.wait(max(0.0, SCALE_UP_BOUND_S - (time.monotonic() - t0)))
        finally:
            stop.set()
            [w.join(60) for w in workers]
        scaled = time.monotonic() - t0
        assert not errors, errors[:3]  # scaling up drops no request
        assert len(seen) == 2, (f"no second replica in {SCALE_UP_BOUND_S} s", log.read_text()[-3000:])
        ref = next(iter(seen.values()))[0]
        for got in (d for ds in seen.values() for d in ds):
            assert np.abs(got - ref).max() <= 1e-6  # every replica, every batch: the same descriptor

        assert ServiceClient(url).request("GET", "/readyz")[0] == 200  # the refused one left ours alone
    finally:
        code = stop_service(proc, 60)
    assert code == 0, log.read_text()[-3000:]
    assert urllib.request.urlopen(other, timeout=30).read() == b"other"
    with pytest.raises(OSError):  # ours is gone from the shared proxy (404), the other app stays
        urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=30)
    out = log.read_text()
    assert "autoscaled up to 2" in out and "stopped" in out
    assert "killed by `ray.kill`" not in out and "Cannot deregister" not in out  # Ray's noise, dropped
    print(f"second replica answered {scaled:.1f} s into the load; {sum(map(len, seen.values()))} requests")


# fast checks, no cluster ---------------------------------------------------------------------------------------


def test_a_cluster_that_does_not_answer_is_one_line(small_onnx: Path, tmp_path: Path) -> None:
    """--address naming a port nobody listens on: exit 2, one line naming the GCS address, at once (Ray's own
    connect retries for minutes); nothing written."""
    from dtop_export.retrieval.sample_data import skimage_data_dir

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(skimage_data_dir() / "coffee.png", photos)
    out = tmp_path / "shards"
    with socket.socket() as closed:  # bound, not listening: nobody else gets the port, connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        for command in (["serve", str(small_onnx)], ["embed", str(small_onnx), str(photos), "-o", str(out), "--ray"]):
            r = cli(*command, "--address", f"127.0.0.1:{port}", timeout=60)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert r.stderr.strip().splitlines()[-1] == (
                f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused): start one there with "
                "`ray start --head`, or fix --address"
            )
    assert not out.exists()


def test_token_auth_without_a_token_here_is_one_line(small_onnx: Path, tmp_path: Path) -> None:
    """RAY_AUTH_MODE=token on a machine with no token (an empty HOME, no RAY_AUTH_TOKEN): one line that says where
    the token goes, not Ray's AuthenticationError traceback."""
    with socket.socket() as listening:  # something answers at the address, as a cluster's GCS would
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        env = user_env(tmp_path / "no-token", HOME=str(tmp_path))
        r = cli("serve", str(small_onnx), "--address", address, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: token authentication is on (RAY_AUTH_MODE=token) but this machine has no token for the Ray "
        f"cluster at {address} (RAY_AUTH_TOKEN_PATH is set but file cannot be opened or is empty: "
        f"{tmp_path / 'no-token'}): give the cluster's token"
    ), line


def test_gcs_address_and_token_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import AuthenticationError

    from dtop_export.corpus.cluster import _token_problem, gcs_address

    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # read for auto only, as ray.init does
    assert gcs_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert gcs_address("auto") == ("10.9.9.9", 6379)
    assert gcs_address("[::1]:6380") == ("::1", 6380)
    assert gcs_address("ray://head:10001") is None and gcs_address("local") is None
    try:
        try:
            raise AuthenticationError("InvalidAuthToken: Authentication token is missing or incorrect")
        except AuthenticationError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from e
    except ConnectionError as e:
        assert _token_problem(e) == ("refused", "")
    why = "Token authentication is enabled but no authentication token was found"
    assert _token_problem(AuthenticationError(why)) == ("missing", why)
    assert _token_problem(ConnectionError("Could not find any running Ray instance.")) == (None, "")


def test_ray_noise_is_dropped_from_the_relay(capsys: pytest.CaptureFixture[str]) -> None:
    """Serve's killed-controller retries and its autoscaling note are dropped from what the driver relays; other
    lines of the same batch, and other batches, are printed as Ray prints them."""
    from ray._private import worker

    from dtop_export.corpus.cluster import quiet_worker_lines

    quiet_worker_lines()
    quiet_worker_lines()  # idempotent: wraps once
    noise = [
        "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will be "
        "retried. Error: The actor is dead because it was killed by `ray.kill`.",
        "WARNING controller 1 -- Cannot deregister autoscaling state for deployment Deployment(name='ingress')",
    ]
    worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": [*noise, "a line to keep"]}, False)
    worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": ["another one"]}, False)
    worker.stdout_deduplicator.flush()
    out = capsys.readouterr().out
    assert "a line to keep" in out and "another one" in out
    assert "ray.kill" not in out and "deregister" not in out
