"""What happens while TensorRT builds: progress, Ctrl-C, and the reading of a failed build.

``builder.build_serialized_network`` runs for seconds (TensorRT-RTX, no GPU) to many minutes (TensorRT tuning a
large model on the GPU) inside C++. Python runs only in TensorRT's callbacks there, and a ``KeyboardInterrupt``
raised in one of them is caught by TensorRT ("Exception caught in log()") and the build goes on: Ctrl-C was
lost and the plan written anyway. :class:`BuildWatch` turns Ctrl-C into a flag for the time of the build and
hands TensorRT an ``IProgressMonitor`` (TensorRT 10.0+, TensorRT-RTX) that reports each optimizer phase and
answers "stop" at the next step once the flag is set; the builder then raises
:class:`~dtop_export.errors.Interrupted` before it writes anything more.

Python runs a signal handler only when the main thread runs Python, which during a build is TensorRT's next
callback (~1 s later on the small preset here, minutes where TensorRT times tactics), so the handler alone tells
the user nothing until then. A listener thread woken through :func:`signal.set_wakeup_fd` says at once that the
build stops at the next step (TensorRT-RTX 1.7 releases the GIL while it builds, measured; a binding that held it
would delay the line to the next callback, as before); a second Ctrl-C while TensorRT builds exits 130 at once:
nothing is on disk then but finished plans (each with its sidecar), since the build writes its files only after
TensorRT returns and the FP16 ONNX only with the first plan.

SIGTERM, which the CLI turns into :class:`~dtop_export.errors.Interrupted` too
(:func:`~dtop_export.errors.raise_interrupted`), was lost the same way (the plan written, exit 0): while the CLI's
handler is installed it is deferred like Ctrl-C, and the stop raises ``Interrupted`` with its number (exit code 143).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dtop_export.errors import Interrupted, raise_interrupted


class BuildWatch:
    """Ctrl-C noted (not raised) and optimizer phases reported while TensorRT builds; see the module notes."""

    STOPPING = "stopping at TensorRT's next step (Ctrl-C again to abort now)"
    STOPPING_OUTSIDE = "stopping before TensorRT's next build (files being written are finished first)"

    def __init__(self, planned: Sequence[Path] = ()) -> None:
        self.interrupted = False
        self.report: Callable[[str], None] | None = None  # hears "Timing tactics (2/3)"
        self.kept: list[Path] = []  # plans written whole (each with its sidecar): what a stop keeps
        self.planned = list(planned)  # every plan the build writes: those not reached may hold old plans
        self.signum = int(signal.SIGINT)  # the signal that stopped the build (SIGTERM: exit code 143)
        self._presses = 0
        self._in_build = False
        self._listening = False
        self._deferred: set[int] = set()  # the signals turned into the flag while inside deferring_ctrl_c

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.interrupted:  # before the listener thread heard it, or without one
            self.signum = int(signum)
        if not self._listening:  # no listener thread: the handler runs at TensorRT's next callback
            self._press(signum)
        self.interrupted = True

    def _press(self, signum: int = signal.SIGINT) -> None:
        """One Ctrl-C (or SIGTERM): the first says that the build stops at the next step, a second one during the
        build exits (outside it, files being written, it is not promised: they are finished first)."""
        self._presses += 1
        if not self.interrupted:
            self.signum = int(signum)
        self.interrupted = True
        if self._presses == 1:
            line = self.STOPPING if self._in_build else self.STOPPING_OUTSIDE
            if signum != signal.SIGINT:
                line = f"{signal.Signals(signum).name}: {line}"
            with contextlib.suppress(Exception):  # no stderr to tell it on: the stop still comes
                print(line, file=sys.stderr, flush=True)
        elif self._in_build:
            self._abort_now(signum)

    def _abort_now(self, signum: int = signal.SIGINT) -> None:
        """Exit 128 + ``signum`` (130 for Ctrl-C) at once, TensorRT still building (no exception reaches Python
        through TensorRT's callbacks)."""
        with contextlib.suppress(OSError):
            if os.isatty(1):
                os.write(1, b"\x1b[?25h\n")  # the status line hid the cursor, and nothing else will show it again
            os.write(2, f"interrupted: the TensorRT build was aborted; {self.kept_line()}\n".encode())
        os._exit(128 + int(signum))

    def kept_line(self) -> str:
        """What a stop leaves: the plans written, and the old plans of targets not reached once some were (their
        sidecars describe the files of an earlier build, the FP16 ONNX too)."""
        if not self.kept:
            return "no plan written"
        line = f"kept {', '.join(map(str, self.kept))} (each with its sidecar)"
        old = [p for p in self.planned if p not in self.kept and p.exists()]
        if old:
            line += f"; the old {', '.join(map(str, old))} of targets not reached kept as they were: rebuild them"
        return line

    def stop_if_interrupted(self) -> None:
        """Ctrl-C (or SIGTERM) came during the build: stop (:class:`~dtop_export.errors.Interrupted`, exit code 128 +
        the signal's number), naming the plans kept."""
        if self.interrupted:
            raise Interrupted(f"the TensorRT build was stopped; {self.kept_line()}", self.signum)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Around ``build_serialized_network``: a second Ctrl-C in here exits at once."""
        self._in_build = True
        try:
            yield
        finally:
            self._in_build = False

    @contextlib.contextmanager
    def _listener(self) -> Iterator[None]:
        """A thread that hears each deferred signal (SIGINT, SIGTERM) the moment it arrives (the C-level handler
        writes its number to a pipe), whatever the main thread is doing. Not where another wakeup fd is set (an
        event loop's) or can be."""
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(write_fd, False)
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):  # Windows takes a socket there: the handler says it, at the next callback
            previous = None
        if previous != -1:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            _close(read_fd, write_fd)
            yield
            return

        def listen() -> None:
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum == 0:  # the end, written below
                        return
                    if signum in self._deferred:
                        self._press(signum)

        self._listening = True  # from here each deferred signal is the listener's (counted once)
        thread = threading.Thread(target=listen, name="dtop-export-ctrl-c", daemon=True)
        thread.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(-1)
            self._listening = False
            os.write(write_fd, b"\0")
            thread.join()
            _close(read_fd, write_fd)

    @contextlib.contextmanager
    def deferring_ctrl_c(self) -> Iterator[BuildWatch]:
        """While inside: SIGINT (and SIGTERM) set :attr:`interrupted` instead of raising, said at once by a listener
        thread (only on the main thread, and only where Python's own Ctrl-C handler, or the CLI's SIGTERM one, is
        installed: a caller with its own keeps it; SIGTERM's default still ends the process, with nothing written)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        mine = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_interrupted}
        previous = {s: signal.getsignal(s) for s in mine}
        self._deferred = {int(s) for s in mine if previous[s] is mine[s]}
        if not self._deferred:
            yield self
            return
        try:
            for s in self._deferred:
                signal.signal(s, self._on_signal)
            with self._listener():
                yield self
        finally:
            for s in self._deferred:
                signal.signal(s, previous[s])
            self._deferred = set()

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


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


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
