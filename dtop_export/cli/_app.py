"""The Typer application object and the root options; command modules register on it."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from dtop_export import __version__

app = typer.Typer(
    name="dtop-export",
    help="Train DToP image-retrieval models and ship them as ONNX / TensorRT descriptors with proven parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dtop-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """dtop-export: DToP checkpoints -> ONNX / TensorRT descriptors, with parity and mAP checks."""
    if debug:
        os.environ["DTOP_EXPORT_DEBUG"] = "1"


def console():  # noqa: ANN201 - rich is imported lazily
    """A rich console on stdout."""
    from rich.console import Console

    return Console()
