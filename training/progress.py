"""Rich progress bars: a simple counter (descriptors, mining) and the training bar (loss, LR, images/s)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def track(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """``with track(n, "descriptors") as advance: ... advance(1)``; a no-op when disabled."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


class TrainBar:
    """One bar per epoch with loss, LR and images/s; silent when disabled (other ranks, ``progress: false``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._prog: Any = None
        self._task: Any = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.close()
        self._prog = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
        )
        self._prog.start()
        self._task = self._prog.add_task("train", total=total, completed=done, stats="")

    def update(self, loss: float, lr: float, ips: float) -> None:
        if self._prog is not None:
            self._prog.update(self._task, advance=1, stats=f"loss {loss:.4f}  lr {lr:.2e}  {ips:.1f} img/s")

    def close(self) -> None:
        if self._prog is not None:
            self._prog.stop()
            self._prog = None
