"""The ``dtop-export`` command line. The only place that wires the packages together.

Everything heavy (torch, timm, onnx, onnxruntime, tensorrt) is imported inside the commands so that
``dtop-export --help`` is instant. Any :class:`DToPError` becomes one ``error: ...`` line on stderr and
exit code 2; ``--debug`` (or ``DTOP_EXPORT_DEBUG=1``) shows the traceback instead.

Each command module registers its commands on :data:`app` when imported; keep their top-level imports
to typer and the standard library.
"""

from __future__ import annotations

import os
import sys

import typer

from dtop_export.cli import bench as _bench  # noqa: F401  (registers bench)
from dtop_export.cli import demo as _demo  # noqa: F401  (registers demo)
from dtop_export.cli import evaluate as _evaluate  # noqa: F401  (registers data, evaluate, embed, parity)
from dtop_export.cli import export as _export  # noqa: F401  (registers onnx)
from dtop_export.cli import model as _model  # noqa: F401  (registers init, info)
from dtop_export.cli import quantize as _quantize  # noqa: F401  (registers optimize, quantize)
from dtop_export.cli import train as _train  # noqa: F401  (registers train, whiten)
from dtop_export.cli import trt as _trt  # noqa: F401  (registers trt, check)
from dtop_export.cli._app import app
from dtop_export.errors import DToPError

__all__ = ["app", "main"]


# entry point -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and turns user errors into one line + exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("DTOP_EXPORT_DEBUG") == "1"
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
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
