"""The ``dtop-export`` command line. The only place that wires the packages together.

Everything heavy (torch, timm, onnx, onnxruntime, tensorrt) is imported inside the commands so that
``dtop-export --help`` is instant. Any :class:`DToPError` becomes one ``error: ...`` line on stderr and
exit code 2; ``--debug`` (or ``DTOP_EXPORT_DEBUG=1``) shows the traceback instead.

One module per command (or command group), named after it (``cli/evaluate.py`` registers ``evaluate``,
``cli/data.py`` the ``data`` group); each registers on :data:`app` when imported and keeps its top-level
imports to typer, the standard library and ``cli.common``. The modules parse options, call the library and
print; the work happens in the library. Nothing outside the CLI imports it.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from typing import Any

import typer

from dtop_export.cli import (  # noqa: F401 - each module registers the command it is named after
    bench,
    check,
    cpp,
    data,
    demo,
    embed,
    evaluate,
    executorch,
    index,
    info,
    init,
    onnx,
    openvino,
    optimize,
    parity,
    quantize,
    search,
    serve,
    train,
    trt,
    whiten,
)
from dtop_export.cli.common import app
from dtop_export.errors import DToPError, Interrupted, find_cause, raise_interrupted

__all__ = ["app", "main"]


# entry point -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and turns user errors into one line + exit code 2, and SIGTERM (a
    timeout, ``docker stop``, a CI job cancelled) into what Ctrl-C does: temporary files removed, exit code 143."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("DTOP_EXPORT_DEBUG") == "1"
    before = _on_sigterm()
    try:
        app(args=args, prog_name="dtop-export")
    except DToPError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # raised outside a command (typer turns the command's into exit code 130)
        _interrupted(e)
        sys.exit(getattr(e, "exit_code", 130))
    except Exception as e:
        interrupt = find_cause(e, KeyboardInterrupt)  # Ctrl-C while a C extension loaded: an ImportError
        if interrupt is None or debug:
            raise
        _interrupted(interrupt)
        sys.exit(getattr(interrupt, "exit_code", 130))
    except SystemExit as e:
        interrupt = find_cause(e, KeyboardInterrupt)
        if e.code == 130 and interrupt is not None:
            _interrupted(interrupt)
            sys.exit(getattr(interrupt, "exit_code", 130))  # 143: stopped by SIGTERM
        raise
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
        if argv is None:
            # The process exits next: spare the interpreter its final collection over everything the command
            # made (about 2 s after an r50-vitb16 export, whose tracing leaves millions of objects behind).
            gc.freeze()


def _on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Interrupted` (exit code 143) in the main thread, as Ctrl-C raises KeyboardInterrupt,
    so that the temporary files of the command are removed on the way out (by default SIGTERM ends the process where
    it stands). Returns the handler it replaced (None: none replaced, off the main thread or where SIGTERM is ignored
    or handled outside Python). Commands that stop gracefully (``train``, ``serve``) install their own while they
    run."""
    if threading.current_thread() is not threading.main_thread():
        return None
    before = signal.getsignal(signal.SIGTERM)
    if before in (signal.SIG_IGN, None):
        return None
    signal.signal(signal.SIGTERM, raise_interrupted)
    return before


def _interrupted(interrupt: BaseException) -> None:
    """Ctrl-C's line: what the command kept and how to go on (a :class:`Interrupted` says), else that nothing is
    half-written."""
    what = str(interrupt) if isinstance(interrupt, Interrupted) else "files are written whole or not at all"
    typer.echo(f"interrupted: {what}", err=True)


if __name__ == "__main__":
    main()
