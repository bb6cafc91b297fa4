"""``dtop-export data``: the data sets the toolkit builds itself (``data sample``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import app

data_app = typer.Typer(help="Data sets: build the embedded sample set.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("sample")
def data_sample(
    root: Annotated[
        Path, typer.Argument(help="Folder to build into: ROOT/sample, and INT8 calibration's ROOT/calib-sample.")
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Rebuild sample/ even if a valid copy exists (calib-sample/ is rebuilt when its recipe changes).",
        ),
    ] = False,
) -> None:
    """Build the embedded sample set (revisitop layout, from scikit-image's photos) and the embedded calibration set
    (INT8's default --calib): deterministic, cached."""
    from dtop_export.quantize import CALIBRATION_SET, default_calibration_images
    from dtop_export.retrieval.datasets import load_revisitop_folder
    from dtop_export.retrieval.sample_data import NAME, build_sample_dataset

    folder = build_sample_dataset(root, force=force)
    ds = load_revisitop_folder(folder, NAME)
    typer.echo(f"{folder}: {ds.n_images} database images, {ds.n_queries} queries")
    calib, _ = default_calibration_images(Path(root))  # INT8 calibration's default, built here up front too
    typer.echo(f"{Path(root) / CALIBRATION_SET}: {len(calib)} calibration images (none of them an image of {NAME})")
