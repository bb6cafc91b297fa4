"""Quieting chatty libraries: Python logging for a while (ONNX Runtime's Python tools, one named logger), what they
print to stdout (:func:`printed_to_log`), single notices for good (:class:`DropMessages`), and ONNX Runtime's C++
logger."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message starts with one of ``starts`` (a library's notice
    that does not apply here), and lets every other record of that logger through."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_logging(level: int = logging.ERROR) -> contextlib.AbstractContextManager[None]:
    """Raise the root logger's level for a while: ONNX Runtime's Python tools log notes that do not apply
    here (symbolic shape inference of dynamic H/W, "consider pre-processing")."""
    return quiet_logger("", level)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the logger ``name`` ("" is the root) for a while: a library's logger with a level of
    its own is not reached by the root's."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def printed_to_log(enabled: bool = True) -> Iterator[None]:
    """While ``enabled``, what is printed to stdout (ONNX Runtime's histogram calibrators, NNCF's progress bars) is
    logged at debug level instead: stdout keeps the command's own lines. A live display that writes to
    ``sys.stdout`` pauses meanwhile."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logging.getLogger(__name__).debug("printed: %s", line)


@contextlib.contextmanager
def quiet_ort_logs() -> Iterator[None]:
    """Silence ONNX Runtime's C++ warnings (e.g. NCHWc serialisation notes) while benchmarking or converting."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)
