"""``dtop-export parity``: every artefact against the PyTorch reference, one report, exit 1 on failure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import (
    BatchOpt,
    DataRootOpt,
    DatasetOpt,
    ForceOpt,
    ImageSizeOpt,
    JsonOpt,
    NoCropOpt,
    ProgressOpt,
    ScalesOpt,
    app,
    console,
    open_engine,
    refuse_existing,
    write_json,
)
from dtop_export.errors import DToPError


@app.command()
def parity(
    reference: Annotated[Path, typer.Argument(help="The reference checkpoint (.pt), run in PyTorch fp32.")],
    models: Annotated[
        list[Path] | None,
        typer.Argument(help="Artifacts to check: .onnx, .xml, .plan, checkpoints; FILE:openvino for OpenVINO."),
    ] = None,
    dataset: DatasetOpt = "sample",
    data_root: DataRootOpt = None,
    scales: ScalesOpt = "1",
    no_crop: NoCropOpt = False,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 1,
    fp16_emulate: Annotated[
        bool, typer.Option("--fp16-emulate", help="Also check the reference run in FP16 on the CPU (model.half()).")
    ] = False,
    json_out: JsonOpt = None,
    progress: ProgressOpt = True,
    force: ForceOpt = False,
) -> None:
    """Descriptor and mAP parity of every MODEL against the PyTorch reference; exit 1 if any contract fails."""
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.identity import check_exported_from, reference_whitening
    from dtop_export.parity import parity as run_parity
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.extract import parse_scales

    if reference.suffix.lower() not in (".pt", ".pth", ".ckpt"):
        raise DToPError(f"the reference {reference} must be a checkpoint (.pt) run in PyTorch")
    if not reference.exists():
        raise DToPError(f"reference checkpoint {reference} not found")
    models = models or []
    if not models and not fp16_emulate:
        raise DToPError("give at least one MODEL to compare with the reference (or --fp16-emulate)")
    refuse_existing(json_out, force=force)
    for m in models:  # before any work: an export of another checkpoint fails by construction
        check_exported_from(m, reference)
    whiten, note = reference_whitening(models, reference)  # a --no-whiten export: the reference without it too
    sc = parse_scales(scales)
    if image_size is not None:
        from dtop_export.memory import check_image_size

        check_image_size(image_size, sc, batch_size)
    ds = resolve_dataset(dataset, data_root)
    if note:
        typer.echo(note, err=True)
    ref = TorchEngine.from_checkpoint(reference, whiten=whiten)
    engines = [open_engine(m) for m in models]
    if fp16_emulate:
        engines.append(TorchEngine.from_checkpoint(reference, precision="fp16", whiten=whiten))
    try:
        report = run_parity(ref, engines, ds, sc, not no_crop, batch_size, progress, image_size)
    finally:
        for e in engines:
            e.close()
    typer.echo(report.table())
    typer.echo(
        f"{ds.name}: {report.n_queries} queries, {report.n_images} images, {report.image_size}px, "
        f"scales {', '.join(f'{s:g}' for s in sc)}: {report.seconds:.1f} s"
    )
    from dtop_export.int8_check import calibration_overlap_note

    for e in engines:  # an INT8 model graded on its own calibration images
        if note := calibration_overlap_note(e, [*ds.images, *ds.queries], "ΔmAP"):
            typer.echo(note)
    if json_out is not None:
        write_json(json_out, report.to_dict(), strict=True)  # strict JSON: no bare NaN
        typer.echo(f"wrote {json_out}")
    if not report.passed:
        for line in report.failures():
            typer.echo(f"FAIL {line}", err=True)
        raise typer.Exit(1)
    console().print("[green]parity: all engines within their contracts[/green]")
