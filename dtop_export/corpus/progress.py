"""The corpus job's progress: the driver's bar (images/s and ETA at the average rate since the start) and the
steady rate after start-up that its summary reports."""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def steady_rate(first: tuple[float, int], end: tuple[float, int]) -> float | None:
    """Images per second after the first result, from its (time, images done) and the job's end: the rate a
    longer job of the same kind approaches, start-up (listing, cluster, model load) excluded. None when
    nothing came after the first result."""
    if end[0] <= first[0] or end[1] <= first[1]:
        return None
    return (end[1] - first[1]) / (end[0] - first[0])


def average_rate(completed: float, elapsed: float | None) -> float | None:
    """Completed items per second since the start; None before the first item."""
    return completed / elapsed if completed and elapsed else None


def progress_bar(enabled: bool) -> Any:
    """The driver's bar: description, bar, done/total, images/s, elapsed and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Images per second since the job started: Ray delivers whole batches at once, and rich's windowed
        speed over a burst of same-instant updates reads hundreds of images per second."""

        def render(self, task: Any) -> Text:
            rate = average_rate(task.completed, task.elapsed)
            return Text(f"{rate:.2f} img/s" if rate else "- img/s")

    class EtaColumn(ProgressColumn):
        """Time left at the average rate (rich's estimate uses the windowed speed, see :class:`RateColumn`)."""

        def render(self, task: Any) -> Text:
            rate = average_rate(task.completed, task.elapsed)
            if task.finished:
                return Text("0:00:00")
            if not rate or task.total is None:
                return Text("-:--:--")
            return Text(str(timedelta(seconds=round((task.total - task.completed) / rate))))

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        EtaColumn(),
        disable=not enabled,
    )
