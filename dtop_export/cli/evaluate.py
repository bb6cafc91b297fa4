"""``dtop-export evaluate``: Revisited Oxford/Paris mAP of any model file on a data set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dtop_export.cli.common import (
    BatchOpt,
    DataRootOpt,
    DatasetOpt,
    ImageSizeOpt,
    JsonOpt,
    NoCropOpt,
    ProgressOpt,
    ScalesOpt,
    app,
    check_report_files,
    open_engine,
    output_option,
    progress_bar,
    refuse_existing,
    write_json,
    written_together,
)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="A checkpoint (.pt), an .onnx or a TensorRT .plan.")],
    dataset: DatasetOpt = "sample",
    data_root: DataRootOpt = None,
    scales: ScalesOpt = "1",
    no_crop: NoCropOpt = False,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 1,
    distractors: Annotated[
        Path | None,
        typer.Option(
            "--distractors", help="+R1M-style distractor descriptors: .npy [M, N], or a shard folder (`embed -o DIR`)."
        ),
    ] = None,
    json_out: JsonOpt = None,
    picture: Annotated[
        Path | None,
        output_option(
            "--picture",
            help="Write a PNG of 5 queries and their top-5 results, correct/wrong marked (ranked with --distractors "
            "as the table is: a distractor is a grey tile).",
        ),
    ] = None,
    progress: ProgressOpt = True,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="As `embed --precision` (auto: what `bench --recommend MODEL.pt` chose)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Overwrite --json/--picture; use --distractors that fail a check (unfinished, other image size or "
            "scales, not unit norm, embedded by a model of another checkpoint) with a warning.",
        ),
    ] = False,
) -> None:
    """Revisited Oxford/Paris evaluation: Easy/Medium/Hard mAP and mP@1/5/10 of MODEL on a data set."""
    from dtop_export.corpus.integrity import open_distractors
    from dtop_export.memory import check_image_size
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.evaluate import evaluate_dataset, evaluation_size
    from dtop_export.retrieval.extract import parse_scales

    sc = parse_scales(scales)
    check_report_files(json_out, picture)
    refuse_existing(json_out, picture, force=force)
    ds = resolve_dataset(dataset, data_root)
    if picture is not None:  # before anything is embedded: a picture of nothing would fail only at the end
        from dtop_export.retrieval.visualize import check_picture

        check_picture(ds)
    provenance = None
    if distractors is not None:
        from dtop_export.identity import check_distractors

        provenance = check_distractors(model, distractors, force)  # said once they pass their own checks: one line
    engine = open_engine(model, precision=precision)
    captured: dict[str, Any] = {}
    with engine:
        size = evaluation_size(ds, engine, image_size)
        check_image_size(size, sc, batch_size, engine.preprocess.stride)
        dis = None
        if distractors is not None:  # checked before the data set is embedded: a refusal costs nothing
            with progress_bar(enabled=progress) as bar:

                def counted(total: int) -> Callable[[int], None]:
                    task = bar.add_task("checking distractors", total=total)
                    return lambda n: bar.advance(task, n)

                dis, warnings = open_distractors(distractors, engine.descriptor_dim, size, sc, force, counted)
            if provenance:
                typer.echo(provenance, err=True)
            for w in warnings:
                typer.echo(f"warning: {w}", err=True)
        result = evaluate_dataset(
            engine, ds, sc, not no_crop, batch_size, progress, size, distractors=dis,
            on_extract=(lambda db, q: captured.update(db=db, q=q)) if picture is not None else None,
            on_rank=(lambda positions: captured.update(positions=positions)) if picture is not None else None,
        )  # fmt: skip
    typer.echo(result.table())
    typer.echo(
        f"{engine.label}, {result.image_size}px, scales {', '.join(f'{s:g}' for s in sc)}, "
        f"queries {'cropped' if not no_crop else 'uncropped'}: {result.seconds:.1f} s"
    )
    from dtop_export.int8_check import calibration_overlap_note

    if note := calibration_overlap_note(engine, [*ds.images, *ds.queries], "mAP"):  # graded on its calibration images
        typer.echo(note)
    with written_together(json_out, picture) as tmp:  # a picture that fails leaves no --json behind
        if picture is not None:
            from dtop_export.retrieval.visualize import retrieval_picture

            retrieval_picture(
                ds, captured["db"], captured["q"], tmp[picture], crop_queries=not no_crop,
                positions=captured["positions"], n_distractors=result.n_distractors,
            )  # fmt: skip
        if json_out is not None:
            write_json(tmp[json_out], {"model": str(model), **result.to_dict()})
    for path in tmp:
        typer.echo(f"wrote {path}")
