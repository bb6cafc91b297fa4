"""Taking a request's upload in, within bounds: the body is read before the request takes a place in the model's
queue (a slow client holds an upload slot, ``--max-uploads``, never a model slot), within the request's deadline
(``--request-timeout``, counted from the request's arrival: past it while uploading, a JSON 408), and decoded on a
pool of a few threads (``--decode-threads``, :data:`DECODE_THREADS` by default), each image within
:func:`~dtop_export.serve.limits.decode_budget`.

What the ingress holds at most, then: (``--max-uploads`` + the model's capacity) request bodies of at most
``--max-upload-mb`` each, and ``--decode-threads`` images decoding at once of at most the decode budget each
(12 bytes a pixel of ``--max-pixels``, plus the file). A client that goes away while uploading is counted as 499
(client closed request), not as a server error. ray and starlette are imported inside the functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from dtop_export.serve.limits import Admission, Limits, RequestError, decode

if TYPE_CHECKING:
    import numpy as np

    from dtop_export.preprocess import PreprocessConfig

T = TypeVar("T")
# Images the ingress decodes at once by default (``--decode-threads 0``), whatever its CPUs: on 2 cores, 2 threads
# served 3-6% fewer images/s than 4 or 6 (benchmarks/results/cpu-amx/serve_decode_threads/: a decode waits
# for its request's other work, so more threads than cores keep the cores busy), and 4 bound the memory to 4 decode
# budgets. GPU replicas may embed faster than 4 threads decode: raise --decode-threads there.
DECODE_THREADS = 4
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads the answer


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
        self.threads = threads or limits.decode_threads or DECODE_THREADS
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
