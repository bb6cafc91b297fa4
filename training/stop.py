"""Stopping a run on a signal so that the state saved is one: Ctrl-C (SIGINT), SIGTERM (SLURM's preemption and time
limit, ``kill``, a container stop; torchrun forwards it to its workers) and SIGUSR1 (SLURM's ``--signal=USR1@90``:
"save and stop soon") all mean "stop after the current step, save the state, say how to ``--resume``".

In one process the signal raises :class:`StopRequested` at once (the loop saves the state of the last finished step),
except inside :meth:`GroupStop.deferred` (the optimiser step until the loop has recorded it, the epoch's checkpoints
and state), where it only sets a flag that the loop acts on when the section ends.

Under DDP torchrun passes the signal to each worker's process group (its DataLoader workers included), at about the
same time but not at the same point of the loop: a process that raised at once would leave the others waiting in a
collective, and no consistent state could be written. So there the first signal only sets a flag; after every
optimiser step the processes all-reduce it (with the step's loss sums, see :meth:`GroupStop.sync`) and all stop
after the first step at which any of them had it set, a process that got the signal a step later included. Rank 0's
validation is the exception (:meth:`GroupStop.raising`): a signal stops it at once and the group then agrees
(:meth:`GroupStop.agree`) to save the state of the epoch's last step. A second Ctrl-C stops at once, without saving
(a second SIGTERM or SIGUSR1 does not: SLURM's USR1 is followed by a TERM at the time limit). torchrun kills its
workers ``--shutdown_timeout`` (30 s) after it forwarded the signal: a step plus the state's write must fit in that.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# the signals that ask a run to stop and save its state (SIGUSR1: not on Windows)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class StopRequested(KeyboardInterrupt):
    """A stop signal, raised where the run stops at once (one process; rank 0's validation). ``signum``: which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class GroupStop:
    """While entered, :data:`STOP_SIGNALS` ask the run to stop (see the module's docstring). ``group``: under DDP.

    ``requested``: this process got a signal (``signum``: the first); ``agreed``: the run stops (under DDP: the last
    :meth:`sync` or :meth:`agree` found that some process had a signal).
    """

    def __init__(self, group: bool, announce: bool = True) -> None:
        self.group = group
        self.announce = announce
        self.requested = False
        self.signum: int = signal.SIGINT
        self._agreed = False
        self._defer = 0
        self._raise = False
        self._previous: dict[int, Any] = {}

    @property
    def agreed(self) -> bool:
        return self._agreed if self.group else self.requested

    def __enter__(self) -> GroupStop:
        if threading.current_thread() is threading.main_thread():
            # a signal ignored by whoever started the run (a shell script's `cmd &` ignores SIGINT) stays ignored, as
            # Python leaves it; one handled outside Python (getsignal: None) cannot be restored, so is left alone
            kept = (signal.SIG_IGN, None)
            self._previous = {
                s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS if signal.getsignal(s) not in kept
            }
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # the second Ctrl-C: stop now, without saving
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return  # SIGTERM after SLURM's USR1, or torchrun's TERM after a Ctrl-C: already stopping
        self.requested, self.signum = True, signum
        if self._raise or not (self.group or self._defer):
            raise StopRequested(signum)
        if self.announce:
            who = "every process stops" if self.group else "the run stops"
            log.warning("%s: %s after this step, and the training state is saved", signal_name(signum), who)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a first signal only sets the flag (in one process too): the loop acts on it after the section."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside (rank 0's validation), a first signal raises :class:`StopRequested` at once, under DDP too; a
        signal already received raises on entering."""
        if self.requested:
            raise StopRequested(self.signum)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def agree(self, device: Any) -> bool:
        """Whether any process got a signal (sets :attr:`agreed`); a collective under DDP, every process calls it."""
        if self.group:
            import torch
            import torch.distributed as dist

            t = torch.tensor([float(self.requested or self._agreed)], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self._agreed = t.item() > 0
        return self.agreed

    def sync(self, loss: float, parts: int, images: int, device: Any) -> tuple[float, int, int]:
        """This step's loss sum, loss count and image count summed over the group, and whether to stop (sets
        :attr:`agreed`). A collective: every process calls it after every optimiser step. One process: unchanged."""
        if not self.group:
            return loss, parts, images
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(self.requested), loss, parts, images], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        flag, loss, parts_sum, images_sum = t.tolist()
        self._agreed = flag > 0
        return loss, int(parts_sum), int(images_sum)


def ignore_stop_signals(worker_id: int, sigint: bool = True) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves the stop signals to the process it loads for (torchrun and
    SLURM signal the whole process group or job step; a worker that died of one would fail the loader before the
    run saved its state). ``sigint``: Ctrl-C too (under DDP; in one process a worker ends quietly on Ctrl-C). The
    loader still ends its workers through their queues, and a worker whose parent is gone exits on its own."""
    for s in STOP_SIGNALS:
        if s != signal.SIGINT or sigint:
            signal.signal(s, signal.SIG_IGN)
