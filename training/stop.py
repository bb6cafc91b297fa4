"""Ctrl-C under DDP: every process of the group stops after the same optimiser step, so that the state saved is one.

torchrun passes the SIGINT it gets to each worker's process group (its DataLoader workers included), at about the
same time but not at the same point of the loop: a process that raised ``KeyboardInterrupt`` at once would leave
the others waiting in a collective, and no consistent state could be written. So under DDP the first Ctrl-C only
sets a flag; after every optimiser step the processes all-reduce it (with the step's loss sums, see
:meth:`GroupStop.sync`) and all stop after the first step at which any of them had it set, a process that got the
signal a step later included. A second Ctrl-C stops at once, without saving. torchrun kills its workers
``--shutdown_timeout`` (30 s) after it forwarded the signal: a step plus the state's write must fit in that.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class GroupStop:
    """While entered (and ``enabled``: under DDP), Ctrl-C asks the group to stop instead of raising.

    ``requested``: this process got Ctrl-C; ``agreed``: the last :meth:`sync` found that some process had.
    """

    def __init__(self, enabled: bool, announce: bool = True) -> None:
        self.enabled = enabled
        self.announce = announce
        self.requested = False
        self.agreed = False
        self._previous: Any = None

    def __enter__(self) -> GroupStop:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            log.warning("Ctrl-C: every process stops after this step, and the training state is saved")

    def sync(self, loss: float, parts: int, images: int, device: Any) -> tuple[float, int, int]:
        """This step's loss sum, loss count and image count summed over the group, and whether to stop (sets
        :attr:`agreed`). A collective: every process calls it after every optimiser step. Disabled: unchanged."""
        if not self.enabled:
            return loss, parts, images
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(self.requested), loss, parts, images], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        flag, loss, parts_sum, images_sum = t.tolist()
        self.agreed = flag > 0
        return loss, int(parts_sum), int(images_sum)


def ignore_sigint(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves Ctrl-C to the process it loads for (torchrun signals the
    whole process group; a worker that died of it would fail the loader before the group agreed to stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
