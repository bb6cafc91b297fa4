"""A small Python client of ``dtop-export serve`` (the standard library and numpy only: usable where the server extras
are not installed). Every call is one HTTP request; an error answer raises :class:`ServiceError` with its status,
message and ``Retry-After``::

    from dtop_export.serve.client import ServiceClient

    client = ServiceClient("http://127.0.0.1:8000")
    desc = client.embed("a.jpg", "b.jpg")            # float32 [2, N], L2-normalised
    hits = client.search("a.jpg", k=5)               # [{"rank", "score", "id", "path", "key"}, ...]
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np

from dtop_export.errors import DToPError

Image = str | Path | bytes


class ServiceError(DToPError):
    """An error answer of the service: HTTP ``status``, its one-line ``message``, ``retry_after`` seconds (503)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def multipart(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a ``multipart/form-data`` request with one file part per image."""
    boundary = uuid.uuid4().hex
    parts = []
    for i, (name, data) in enumerate(images):
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; filename="{name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header: a number (the service's), or an HTTP date (RFC 9110; a proxy in front
    may send one) as seconds from now; None when absent or neither."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils
    import time

    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _named(image: Image, i: int) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return f"image{i}", image
    path = Path(image)
    return path.name, path.read_bytes()


class ServiceClient:
    """The service at ``url`` (``http://host:port``); ``timeout`` seconds per request."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise DToPError(f"service URL {url!r}: write http://HOST:PORT")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; (status, headers, body) whatever the status."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        """One request whose answer is JSON; an error status raises :class:`ServiceError`."""
        status, headers, data = self.request(method, path, body, content_type)
        try:
            doc = json.loads(data) if data else {}
        except json.JSONDecodeError:
            doc = None
        if status >= 400:
            wait = retry_after(headers.get("retry-after"))
            if isinstance(doc, dict) and doc.get("error"):
                raise ServiceError(status, str(doc["error"]), wait)
            if isinstance(doc, dict) and doc.get("reason"):  # /readyz's 503: not ready, and why
                raise ServiceError(status, str(doc["reason"]), wait)
            text = " ".join(data[:200].decode(errors="replace").split()) or "no message"
            plain = doc is None or not data  # not the service's JSON
            if plain and status in (429, 503):  # Ray's proxy past the service's backstop: plain text
                advice = f"retry after {wait:g} s" if wait is not None else "retry later"
                raise ServiceError(status, f"the service is over capacity (its proxy said: {text}): {advice}", wait)
            raise ServiceError(status, text if plain else str(doc), wait)
        if doc is None:
            raise ServiceError(status, f"the answer is not JSON: {data[:200].decode(errors='replace')!r}")
        return doc

    def _upload(self, images: list[Image]) -> tuple[bytes, str]:
        named = [_named(im, i) for i, im in enumerate(images)]
        if len(named) == 1:
            kind = mimetypes.guess_type(named[0][0])[0] or "application/octet-stream"
            return named[0][1], kind if kind.startswith("image/") else "application/octet-stream"
        return multipart(named)

    def embed_response(self, *images: Image, encoding: str = "base64") -> dict[str, Any]:
        """The whole answer of ``POST /v1/embed`` for ``images`` (paths or bytes)."""
        body, kind = self._upload(list(images))
        return self.call("POST", f"/v1/embed?{urlencode({'encoding': encoding})}", body, kind)

    def embed(self, *images: Image) -> np.ndarray:
        """Descriptors float32 [n, N] of ``images`` (paths or bytes), in order."""
        doc = self.embed_response(*images, encoding="base64")
        rows = [np.frombuffer(base64.b64decode(im["descriptor_b64"]), "<f4") for im in doc["images"]]
        return np.stack(rows).astype(np.float32)

    def search(
        self, image: Image | None = None, descriptor: np.ndarray | None = None, k: int = 10, nprobe: int | None = None
    ) -> list[dict[str, Any]]:
        """Top-``k`` corpus images of one image (path or bytes) or one descriptor [N]."""
        query = {"k": k} | ({"nprobe": nprobe} if nprobe is not None else {})
        if (image is None) == (descriptor is None):
            raise DToPError("search takes an image or a descriptor")
        if descriptor is not None:
            payload = {"descriptor_b64": base64.b64encode(np.asarray(descriptor, "<f4").tobytes()).decode()}
            body, kind = json.dumps(payload).encode(), "application/json"
        else:
            assert image is not None
            body, kind = self._upload([image])
        return self.call("POST", f"/v1/search?{urlencode(query)}", body, kind)["results"]

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: the deployment contract."""
        return self.call("GET", "/v1/model")

    def ready(self) -> bool:
        """``GET /readyz``: a warm replica answers."""
        return self.request("GET", "/readyz")[0] == 200

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self.request("GET", "/metrics")[2].decode()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a service started next; another process may take it first)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_service(
    args: list[str], log: Path, port: int, timeout_s: float = 150.0, env: dict[str, str] | None = None
) -> Any:
    """``dtop-export serve ARGS --port PORT`` as a subprocess (stdout and stderr to ``log``; ``env``: its
    environment, default this process's), returned once ``/readyz`` answers 200; a :class:`DToPError` with the
    log's tail when it exits or is not ready in time."""
    import subprocess
    import sys
    import time

    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtop_export", "serve", *args, "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    client = ServiceClient(f"http://127.0.0.1:{port}", timeout=10)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            state = f"exited with {proc.returncode}" if proc.returncode else f"not ready in {timeout_s:g} s"
            raise DToPError(f"dtop-export serve {state}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if client.ready():
                return proc
        except OSError:
            pass
        time.sleep(0.5)


def stop_service(proc: Any, timeout_s: float = 90.0) -> int:
    """SIGTERM (the graceful stop) and wait; SIGKILL past ``timeout_s``. The exit code."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
