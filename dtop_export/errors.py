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
    """Ctrl-C, with what the interrupted command kept and how to go on (the CLI prints it and exits 130)."""
