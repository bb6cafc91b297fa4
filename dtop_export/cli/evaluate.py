"""Evaluation commands: ``data sample``, ``evaluate``, ``embed`` and ``parity``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dtop_export.cli._app import app, console
from dtop_export.errors import DToPError

data_app = typer.Typer(help="Data sets: build the embedded sample set.", no_args_is_help=True)
app.add_typer(data_app, name="data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

ScalesOpt = Annotated[
    str,
    typer.Option("--scales", help="Comma-separated scales (cirtorch multi-scale: 1,0.707,1.414 or `ms`)."),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option("--image-size", help="Longer image side before scaling (default: the data set's, else 1024)."),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass (same-shape images).")]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="roxford5k, rparis6k, sample, or a folder with gnd_<name>.pkl + jpg/.")
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding the data sets (default: $DTOP_EXPORT_DATA or ~/.cache)."),
]
NoCropOpt = Annotated[bool, typer.Option("--no-crop", help="Use whole query images, not their bounding boxes.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from dtop_export._io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


# data ------------------------------------------------------------------------------------------------


@data_app.command("sample")
def data_sample(
    root: Annotated[Path, typer.Argument(help="Folder to build into; the set lands in ROOT/sample.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Rebuild even if a valid copy exists.")] = False,
) -> None:
    """Build the embedded sample set (revisitop layout, from scikit-image's photos): deterministic, cached."""
    import pickle

    from dtop_export.sample_data import build_sample_dataset

    folder = build_sample_dataset(root, force=force)
    with open(folder / "gnd_sample.pkl", "rb") as fh:
        cfg = pickle.load(fh)
    typer.echo(f"{folder}: {len(cfg['imlist'])} database images, {len(cfg['qimlist'])} queries")


# evaluate --------------------------------------------------------------------------------------------


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
        Path | None, typer.Option("--distractors", help="+R1M-style distractor descriptors (.npy, [M, N]).")
    ] = None,
    json_out: JsonOpt = None,
    picture: Annotated[
        Path | None,
        typer.Option("--picture", help="Write a PNG of 5 queries and their top-5 results, correct/wrong marked."),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Revisited Oxford/Paris evaluation: Easy/Medium/Hard mAP and mP@1/5/10 of MODEL on a data set."""
    from dtop_export.evaluate import evaluate_dataset, parse_scales, resolve_dataset
    from engines.base import load_engine

    sc = parse_scales(scales)
    ds = resolve_dataset(dataset, data_root)
    if picture is not None and picture.suffix.lower() != ".png":
        raise DToPError(f"--picture {picture} should end in .png")
    engine = load_engine(model)
    captured: dict[str, Any] = {}
    with engine:
        result = evaluate_dataset(
            engine, ds, sc, not no_crop, batch_size, progress, image_size, distractors=distractors,
            on_extract=(lambda db, q: captured.update(db=db, q=q)) if picture is not None else None,
        )  # fmt: skip
    typer.echo(result.table())
    typer.echo(
        f"{engine.label}, {result.image_size}px, scales {', '.join(f'{s:g}' for s in sc)}, "
        f"queries {'cropped' if not no_crop else 'uncropped'}: {result.seconds:.1f} s"
    )
    if json_out is not None:
        _write_json(json_out, {"model": str(model), **result.to_dict()})
        typer.echo(f"wrote {json_out}")
    if picture is not None:
        from dtop_export.visualize import retrieval_picture

        retrieval_picture(ds, captured["db"], captured["q"], picture, crop_queries=not no_crop)
        typer.echo(f"wrote {picture}")


# embed -----------------------------------------------------------------------------------------------


def _expand_images(items: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in items:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


@app.command()
def embed(
    model: Annotated[Path, typer.Argument(help="A checkpoint (.pt), an .onnx or a TensorRT .plan.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Descriptor matrix to write (.npy).")],
    batch_size: BatchOpt = 1,
    scales: ScalesOpt = "1",
    image_size: ImageSizeOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Descriptors of images: OUTPUT.npy (n x N float32) and OUTPUT.json (paths in row order, skipped ones).

    Unreadable images are reported and skipped.
    """
    import numpy as np

    from dtop_export._io import atomic_path
    from dtop_export.evaluate import extract, parse_scales
    from engines.base import load_engine

    if output.suffix.lower() != ".npy":
        raise DToPError(f"output {output} should end in .npy")
    paths = _expand_images(images)
    if not paths:
        raise DToPError("no images given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    sc = parse_scales(scales)
    engine = load_engine(model)
    errors: list[tuple[int, str]] = []
    with engine:
        size = image_size or engine.preprocess.size
        desc = extract(
            engine, paths, None, sc, None, progress, image_size=size, batch_size=batch_size, errors=errors,
            description="embedding",
        )  # fmt: skip
    for _, msg in errors:
        typer.echo(f"skipped: {msg}", err=True)
    skipped = {i for i, _ in errors}
    kept = [str(p) for i, p in enumerate(paths) if i not in skipped]
    if not kept:
        raise DToPError(f"none of the {len(paths)} images could be read")
    with atomic_path(output) as tmp, open(tmp, "wb") as fh:
        np.save(fh, desc)
    sidecar = output.with_suffix(".json")
    _write_json(
        sidecar,
        {
            "model": str(model),
            "engine": engine.describe(),
            "descriptor_dim": int(desc.shape[1]),
            "image_size": size,
            "scales": list(sc),
            "images": kept,
            "skipped": [{"path": str(paths[i]), "error": msg} for i, msg in errors],
        },
    )
    typer.echo(
        f"wrote {output} ({desc.shape[0]} x {desc.shape[1]} float32) and {sidecar}"
        + (f"; skipped {len(errors)} unreadable image(s)" if errors else "")
    )


# parity ----------------------------------------------------------------------------------------------


@app.command()
def parity(
    reference: Annotated[Path, typer.Argument(help="The reference checkpoint (.pt), run in PyTorch fp32.")],
    models: Annotated[
        list[Path] | None, typer.Argument(help="Artifacts to check: .onnx, .plan, or checkpoints.")
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
) -> None:
    """Descriptor and mAP parity of every MODEL against the PyTorch reference; exit 1 if any contract fails."""
    from dtop_export.evaluate import parse_scales, resolve_dataset
    from dtop_export.parity import parity as run_parity
    from engines.base import load_engine
    from engines.pytorch import TorchEngine

    if reference.suffix.lower() not in (".pt", ".pth", ".ckpt"):
        raise DToPError(f"the reference {reference} must be a checkpoint (.pt) run in PyTorch")
    if not reference.exists():
        raise DToPError(f"reference checkpoint {reference} not found")
    models = models or []
    if not models and not fp16_emulate:
        raise DToPError("give at least one MODEL to compare with the reference (or --fp16-emulate)")
    sc = parse_scales(scales)
    ds = resolve_dataset(dataset, data_root)
    ref = TorchEngine.from_checkpoint(reference)
    engines = [load_engine(m) for m in models]
    if fp16_emulate:
        engines.append(TorchEngine.from_checkpoint(reference, precision="fp16"))
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
    if json_out is not None:
        _write_json(json_out, report.to_dict())
        typer.echo(f"wrote {json_out}")
    if not report.passed:
        for line in report.failures():
            typer.echo(f"FAIL {line}", err=True)
        raise typer.Exit(1)
    console().print("[green]parity: all engines within their contracts[/green]")
