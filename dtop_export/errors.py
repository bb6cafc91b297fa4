"""One base class for every user-facing error.

The CLI prints ``error: <message>`` and exits with code 2 for any :class:`DToPError`; ``--debug`` shows
the traceback. Messages are one line and say what to do.
"""

from __future__ import annotations


class DToPError(Exception):
    """A user error: bad input, a missing file, an option that cannot be honoured."""


class CheckpointError(DToPError):
    """A checkpoint file is missing, unreadable, unsafe or inconsistent with its config."""


class ShapeError(DToPError):
    """An input tensor has a shape the model cannot take (e.g. size not a multiple of the stride)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the interrupted command kept and how to go on (the CLI prints it and exits 130; after
    another signal, ``signum``, 128 + its number: 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def raise_interrupted(signum: int, frame: object) -> None:
    """The CLI's SIGTERM handler: SIGTERM raises :class:`Interrupted` (exit code 143) as Ctrl-C raises
    KeyboardInterrupt. Code that defers Ctrl-C (a TensorRT build, whose callbacks swallow exceptions) defers the
    signals this handles too."""
    import signal

    raise Interrupted(f"{signal.Signals(signum).name}: files are written whole or not at all", signum)


def find_cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in the chain that led to ``error`` (its causes and contexts): typer raises
    ``Exit(130) from`` Ctrl-C's KeyboardInterrupt, and a C extension interrupted while it loads raises
    ``ImportError("initialization failed")`` from it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return None
