"""``dtop-export embed``: descriptors of image files (``.npy`` + ``.json`` sidecar)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import BatchOpt, ImageSizeOpt, ProgressOpt, ScalesOpt, app, open_engine, write_json
from dtop_export.errors import DToPError


@app.command()
def embed(
    model: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint (.pt), .onnx, OpenVINO .xml or TensorRT .plan; FILE:openvino runs an .onnx "
            "in OpenVINO (options as in `bench`)."
        ),
    ],  # fmt: skip
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Descriptor matrix to write (.npy).")],
    batch_size: BatchOpt = 1,
    scales: ScalesOpt = "1",
    image_size: ImageSizeOpt = None,
    progress: ProgressOpt = True,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (PyTorch, ONNX Runtime or OpenVINO); default: all.")
    ] = None,
) -> None:
    """Descriptors of images: OUTPUT.npy (n x N float32) and OUTPUT.json (paths in row order, skipped ones).

    Unreadable images are reported and skipped.
    """
    import numpy as np

    from dtop_export.atomic import atomic_path
    from dtop_export.preprocess import IMAGE_SUFFIXES, expand_images
    from dtop_export.retrieval.extract import extract, parse_scales

    if output.suffix.lower() != ".npy":
        raise DToPError(f"output {output} should end in .npy")
    paths = expand_images(images)
    if not paths:
        raise DToPError("no images given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ")")
    sc = parse_scales(scales)
    if threads is not None and threads < 1:
        raise DToPError(f"--threads must be >= 1, got {threads}")
    from dtop_export.bench.spec import parse_spec

    # every CPU engine takes threads= (PyTorch sets torch's); a TensorRT plan has none
    cpu = parse_spec(str(model)).kind != "plan"
    engine = open_engine(model, **({"threads": threads} if threads and cpu else {}))
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
    write_json(
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
