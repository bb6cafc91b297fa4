"""``dtop-export demo``: the whole toolkit on the embedded default (:mod:`dtop_export.pipeline.demo` does the
work; this module parses the options and draws the stages and the summary)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dtop_export.cli.common import ProgressOpt, app, console, rich_reporter

if TYPE_CHECKING:
    from rich.console import Console

    from dtop_export.pipeline.demo import DemoResult


@app.command()
def demo(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Model preset to train (see `info --presets`).")] = (
        "small"
    ),
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where every artefact goes.")] = Path("dtop-demo"),
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Start from this checkpoint instead of training (its whitening is kept)."),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs on the embedded training set.")] = 15,
    steps_per_epoch: Annotated[
        int | None, typer.Option("--steps-per-epoch", help="Cap the optimiser steps per epoch (quick runs).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training images per step.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Training seed (initialisation, sampling, augmentation).")] = 0,
    fp16_emulate: Annotated[
        bool,
        typer.Option(
            "--fp16-emulate/--no-fp16-emulate",
            help="Also hold the model run in FP16 on the CPU (model.half()) to the FP16 contract in the parity "
            "report: a preview of a TensorRT FP16 engine where there is no GPU.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Rebuild every stage, even if its files exist.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Run the whole toolkit on the embedded data: train, whiten, export, parity, evaluate, picture.

    About 7 minutes on 2 idle CPU cores with the small preset (longer while other work shares them); re-runs reuse
    what is already built and continue an interrupted training (--force rebuilds). Exit code 1 when an artefact
    fails its parity contract.
    """
    from dtop_export.pipeline.demo import DemoSettings, run_demo

    settings = DemoSettings(
        workdir=workdir,
        preset=preset,
        checkpoint=checkpoint,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        seed=seed,
        fp16_emulate=fp16_emulate,
        force=force,
        progress=progress,
    )
    con = console()
    result = run_demo(settings, rich_reporter(con, progress))
    _summary(con, result)
    if not result.passed:
        for line in result.failures():
            typer.echo(f"FAIL {line}", err=True)
        raise typer.Exit(1)


def _summary(con: Console, result: DemoResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    runner = result.runner
    table = Table(title=f"dtop-export demo: {runner.workdir}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("artefacts / result")
    colours = {"built": "green", "reused": "cyan", "skipped": "yellow", "failed": "red"}
    for s in result.stages:
        what = escape(", ".join(runner.relative(p) for p in s.outputs) or s.note)
        if s.name == "parity":
            what += "  " + ("[green]PASS[/green]" if s.facts.get("passed") else "[red]FAIL[/red]")
        table.add_row(s.name, f"[{colours.get(s.status, 'white')}]{s.status}[/]", f"{s.seconds:.1f} s", what)
    con.print()
    con.print(table)
    for line in result.summary():
        con.print(line, soft_wrap=True, markup=False)
