"""Taking a request's upload in, within bounds: the body is read before the request takes a place in the model's
queue (a slow client holds an upload slot, ``--max-uploads``, never a model slot), within the request's deadline
(``--request-timeout``, counted from the request's arrival: past it while uploading, a JSON 408), and decoded on a
pool of a few threads (:func:`decode_threads`), each image within :func:`~dtop_export.serve.limits.decode_budget`.

What the ingress holds at most, then: (``--max-uploads`` + the model's capacity) request bodies of at most
``--max-upload-mb`` each, and :func:`decode_threads` images decoding at once of at most the decode budget each
(12 bytes a pixel of ``--max-pixels``, plus the file). A client that goes away while uploading is counted as 499
(client closed request), not as a server error. ray and starlette are imported inside the functions.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from dtop_export.serve.limits import Admission, Limits, RequestError, decode

if TYPE_CHECKING:
    import numpy as np

    from dtop_export.preprocess import PreprocessConfig

T = TypeVar("T")
MAX_DECODE_THREADS = 4  # decoding faster than the model embeds buys nothing; each thread may hold a decode budget
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads the answer


def decode_threads() -> int:
    """Images the ingress decodes at once by default (``--decode-threads 0``): its process's CPUs, at most
    :data:`MAX_DECODE_THREADS`, which feeds CPU replicas; GPU replicas may embed faster than 4 threads decode:
    raise ``--decode-threads`` there (each thread may hold one decode budget of memory)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DECODE_THREADS, cpus))


def left(deadline: float) -> float:
    """Seconds until ``deadline`` (``time.monotonic()`` time), never negative."""
    return max(0.0, deadline - time.monotonic())


def client_gone(e: BaseException) -> bool:
    """Whether reading the body failed because the client is gone: Starlette's ClientDisconnect, or Ray's
    TaskCancelledError (the proxy cancelled the request: its client left, or the proxy's own timeout passed)."""
    from starlette.requests import ClientDisconnect

    try:
        from ray.exceptions import TaskCancelledError
    except ImportError:  # the app's logic without Ray (tests)
        return isinstance(e, ClientDisconnect)
    return isinstance(e, (ClientDisconnect, TaskCancelledError))


class Intake:
    """The upload slots and the decoding pool of one ingress replica."""

    def __init__(
        self,
        limits: Limits,
        preprocess: PreprocessConfig,
        image_size: int,
        scales: tuple[float, ...],
        threads: int | None = None,
    ) -> None:
        self.limits, self.preprocess, self.image_size, self.scales = limits, preprocess, image_size, scales
        self.uploads = Admission(limits.max_uploads, what="receiving {n} uploads already (--max-uploads)")
        self.threads = threads or limits.decode_threads or decode_threads()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dtop-decode")

    async def receive(self, read: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``read()`` (the request's body), holding an upload slot, until ``deadline``: 408 past it, 499 when the
        client went away."""
        self.uploads.enter()
        try:
            return await asyncio.wait_for(read(), left(deadline))
        except asyncio.TimeoutError as e:
            raise RequestError(
                408,
                f"the upload did not arrive within {self.limits.request_timeout_s:g} s (--request-timeout): send it "
                "over a faster connection, or fewer or smaller images a request",
            ) from e
        except Exception as e:
            if client_gone(e):
                raise RequestError(CLIENT_CLOSED, f"the client went away during its upload ({type(e).__name__})") from e
            raise
        finally:
            self.uploads.leave()

    async def decode(self, images: list[tuple[str, bytes]], deadline: float) -> list[list[np.ndarray]]:
        """Each image's model inputs (one per scale), decoded on the pool; 504 at ``deadline`` (the images not yet
        started are dropped from the pool's queue)."""
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self.pool, decode, name, data, self.preprocess, self.image_size, self.scales, self.limits
            )
            for name, data in images
        ]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*jobs), left(deadline)))
        except asyncio.TimeoutError as e:
            raise RequestError(
                504, f"no answer within {self.limits.request_timeout_s:g} s (--request-timeout): retry later"
            ) from e
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
