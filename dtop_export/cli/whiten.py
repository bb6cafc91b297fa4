"""``dtop-export whiten``: learn whitening (supervised Lw from pairs, or PCA) into a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ForceOpt, ProgressOpt, app, at_least, output_option, refuse_existing
from dtop_export.cli.train import setup_logging
from dtop_export.errors import DToPError


@app.command()
def whiten(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to add whitening to (rewritten atomically).")],
    pairs: Annotated[
        Path | None,
        typer.Option(
            help="Matching pairs for supervised Lw: cirtorch *-whiten.pkl / SfM-120k pkl (or its download folder), a "
            "CSV of query,positive paths, or a class-per-folder directory."
        ),
    ] = None,
    images: Annotated[Path | None, typer.Option(help="Image folder for unsupervised PCA whitening.")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder the pair paths are relative to (pkl: holds ims/).")] = None,
    dim: Annotated[
        int | None,
        typer.Option(callback=at_least(1), help="Output dimension (leading components, 1..N); default: N."),
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Longest image side for descriptors (default: the checkpoint's).")
    ] = None,
    scales: Annotated[str, typer.Option(help="Comma-separated scales, e.g. 1,0.7071,1.4142.")] = "1",
    shrinkage: Annotated[
        str,
        typer.Option(
            help="Lw: shrink the pair covariance towards a scaled identity: 'auto' (Ledoit-Wolf), or a number "
            "in [0, 1] (0 = cirtorch's exact Lw). Keeps the projection well-conditioned for FP16/INT8."
        ),
    ] = "auto",
    output: Annotated[Path | None, output_option("-o", "--output", help="Write here instead of in place.")] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Learn whitening (supervised Lw from pairs, or PCA from images) and store it in the checkpoint."""
    try:
        scale_list = tuple(float(s) for s in scales.split(",") if s.strip())
    except ValueError:
        raise DToPError(f"--scales must be comma-separated numbers, got {scales!r}") from None
    if not scale_list or any(s <= 0 for s in scale_list):
        raise DToPError("--scales must list positive numbers")
    if size is not None:
        from dtop_export.memory import check_image_size

        check_image_size(size, scale_list, option="--size")
    from dtop_export.training.whitening import parse_shrinkage, whiten_checkpoint

    shrink = parse_shrinkage(shrinkage)  # before the minutes of embedding, not after
    if shrink != "auto" and pairs is None:
        raise DToPError("--shrinkage applies to supervised Lw (--pairs) only")
    if output is not None and output.resolve() != checkpoint.resolve():  # in place is what whiten does by default
        refuse_existing(output, force=force)
    setup_logging()

    out, wh = whiten_checkpoint(
        checkpoint,
        output,
        pairs=pairs,
        images=images,
        root=root,
        dim=dim,
        size=size,
        scales=scale_list,
        progress=progress,
        shrinkage=shrink,
    )
    what = f"{wh.info.get('pairs')} pairs, " if wh.kind == "lw" else ""
    how = f", shrinkage {wh.info['shrinkage']:.3g}" if "shrinkage" in wh.info else ""
    typer.echo(
        f"wrote {out}: {wh.kind} whitening {wh.info['in_dim']} -> {wh.out_dim} ({what}{wh.info.get('images')} images"
        f"{how}, condition number {wh.info['condition_number']:.0f})"
    )
