"""What happens while TensorRT builds: progress, Ctrl-C, and the reading of a failed build.

``builder.build_serialized_network`` runs for seconds (TensorRT-RTX, no GPU) to many minutes (TensorRT tuning a
large model on the GPU) inside C++. Python runs only in TensorRT's callbacks there, and a ``KeyboardInterrupt``
raised in one of them is caught by TensorRT ("Exception caught in log()") and the build goes on: Ctrl-C was
lost and the plan written anyway. :class:`BuildWatch` turns Ctrl-C into a flag for the time of the build and
hands TensorRT an ``IProgressMonitor`` (TensorRT 10.0+, TensorRT-RTX) that reports each optimizer phase and
answers "stop" at the next step once the flag is set; the builder then raises
:class:`~dtop_export.errors.Interrupted` before it writes anything more.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class BuildWatch:
    """Ctrl-C noted (not raised) and optimizer phases reported while TensorRT builds; see the module notes."""

    def __init__(self) -> None:
        self.interrupted = False
        self.report: Callable[[str], None] | None = None  # hears "Timing tactics (2/3)"

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.interrupted = True

    @contextlib.contextmanager
    def deferring_ctrl_c(self) -> Iterator[BuildWatch]:
        """While inside: SIGINT sets :attr:`interrupted` instead of raising (only on the main thread, and only
        where Python's own Ctrl-C handler is installed: a caller with its own keeps it)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            yield self
            return
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _say(self, text: str) -> None:
        if self.report is not None:
            with contextlib.suppress(Exception):  # an exception in a TensorRT callback is swallowed by TensorRT
                self.report(text)

    def monitor(self, trt: Any, logger: Any) -> Any:
        """A ``trt.IProgressMonitor`` for ``config.progress_monitor`` (keep it alive for the build), or None where
        the module has none (TensorRT < 10). ``logger`` (:func:`~.install.make_logger`'s) keeps TensorRT's
        "BuildCanceled" error to itself once Ctrl-C stopped the build."""
        logger.stopping = lambda: self.interrupted
        base = getattr(trt, "IProgressMonitor", None)
        if base is None:
            return None
        watch = self

        class _Monitor(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.steps: dict[str, int] = {}

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                self.steps[phase_name] = int(num_steps)
                watch._say(phase_name + (f" (1/{num_steps})" if num_steps > 1 else ""))

            def step_complete(self, phase_name: str, step: int) -> bool:
                n = self.steps.get(phase_name, 0)
                if not watch.interrupted and step + 1 < n:
                    watch._say(f"{phase_name} ({step + 2}/{n})")
                return not watch.interrupted  # False: TensorRT stops the build (BuildCanceled)

            def phase_finish(self, phase_name: str) -> None:
                self.steps.pop(phase_name, None)

        return _Monitor()


def build_failure_hint(error: str, workspace_gb: float) -> str:
    """The builder's last error and what to do: an out-of-memory naming its request gets the --workspace that
    holds it (the largest profile shape's scratch; the GPU must have that much), anything else the general hint."""
    import math
    import re

    m = re.search(r"OutOfMemory \(Requested size was (\d+) bytes", error or "")
    if m:
        need = math.ceil(int(m.group(1)) / 2**30)
        return (
            f"{error} (a tactic for the largest profile shape needs {need} GiB of scratch, over --workspace "
            f"{workspace_gb:g}: pass --workspace {need + 1} if the GPU has it, or lower --max)"
        )
    return f"{error or 'see the TensorRT log'} (try a larger --workspace or a narrower profile)"
