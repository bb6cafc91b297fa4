"""Decode pools that an interrupted job can walk away from.

``concurrent.futures.ThreadPoolExecutor`` joins its workers when the interpreter exits, and a process pool waits
for its workers' results: one decode blocked in a read that never returns (a FIFO without a writer, a hung network
mount) then keeps a job that was told to stop (Ctrl-C, an engine error) from exiting. :class:`DaemonThreadPool`
runs the same tasks on daemon threads, and :func:`leave` stops either kind of pool without waiting for what runs
(process workers are terminated).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtop_export.contract import Engine

POOL_KINDS = ("thread", "process")  # what --decode-pool names besides auto


class DaemonThreadPool:
    """``workers`` daemon threads running submitted tasks in order: ``submit``, ``map`` and ``shutdown`` as
    :class:`concurrent.futures.ThreadPoolExecutor` has them (``map`` submits every task at once; ``chunksize`` is
    accepted for the process pool's signature and ignored)."""

    def __init__(self, workers: int, name: str = "pool") -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._tasks = queue.SimpleQueue()
        self._closed, self._lock = False, threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fut, fn, args = task
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - the future carries it to whoever waits on it
                    fut.set_exception(e)
            del task, fut, fn, args  # not kept while waiting: a decoded image is megabytes

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:  # never queued behind the workers' stop marks
            if self._closed:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._tasks.put((fut, fn, args))
        return fut

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        futures = [self.submit(fn, item) for item in items]
        return (f.result() for f in futures)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking tasks; ``cancel_futures``: drop the queued ones; ``wait``: join the workers (a worker
        blocked for good blocks this too: :func:`leave` does not wait)."""
        with self._lock:
            self._closed = True
            while cancel_futures:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
            for _ in self._threads:
                self._tasks.put(None)
        if wait:
            for t in self._threads:
                t.join()


def on_cuda(engine: Any) -> bool:
    """Whether ``engine`` runs on a CUDA device: a corpus job then warms it up (:func:`~.schedule.needs_warmup`),
    pads its batches (:func:`~.schedule.pad_batch`: cuDNN autotunes per shape; on a CPU padding would only cost
    compute) and decodes in processes (:func:`resolve_pool`)."""
    return str(engine.device).startswith("cuda")


def resolve_pool(pool: str, engine: Engine, gpu_decode: bool = False) -> str:
    """``auto``: processes when the engine runs on a GPU and the CPU decodes (16 decode threads fed an H200 42 img/s
    end to end at 512 px, 16 processes 204: the GIL, benchmarks/README "Feeding the GPU"); threads on a CPU, whose
    engine shares the cores (no pickling), and for ``--gpu-decode`` (the CPU only reads headers)."""
    if pool != "auto":
        return pool
    return "process" if on_cuda(engine) and not gpu_decode else "thread"


def default_workers() -> int:
    """Decode workers by default: every core this process may run on."""
    from dtop_export.host import usable_cpus

    return usable_cpus()


def timed(fn: Callable[[str], Any], path: str) -> tuple[Any, float]:
    """``fn(path)`` and the seconds it took (a process pool's task: the parent cannot time it)."""
    t0 = time.perf_counter()
    return fn(path), time.perf_counter() - t0


def decode_pool(kind: str, workers: int) -> Any:
    """A pool of ``workers``: ``thread``, a :class:`DaemonThreadPool`; ``process``, a ``ProcessPoolExecutor`` whose
    workers start from a forkserver (no copy of the parent's threads, CUDA context or engine)."""
    if kind == "thread":
        return DaemonThreadPool(workers, name="dtop-decode")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


def leave(executor: Any) -> None:
    """Shut ``executor`` down without waiting: queued tasks are cancelled, running ones abandoned (daemon threads)
    or their worker processes terminated (a process pool would otherwise wait for them at exit)."""
    terminate = getattr(executor, "terminate_workers", None)  # ProcessPoolExecutor, Python >= 3.14
    if callable(terminate):
        terminate()
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())  # before shutdown() drops them
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
