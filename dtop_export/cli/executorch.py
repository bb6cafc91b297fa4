"""``dtop-export executorch``: checkpoint -> one ExecuTorch program (``.pte``, XNNPACK) per square input size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import (
    ForceOpt,
    JsonOpt,
    ProgressOpt,
    app,
    console,
    output_option,
    parse_int_list,
    refuse_existing,
    spinner,
    write_json,
)
from dtop_export.errors import DToPError


def pte_outputs(checkpoint: Path, output: Path | None, sizes: list[int], int8: bool) -> list[Path]:
    """The files to write: ``-o`` as given for one size; for several, ``-o``'s stem + ``.S.pte`` (``.S.int8.pte``, a
    stem's own ``.int8`` moved behind the size); by default ``CHECKPOINT.S.pte`` (``.S.int8.pte``) next to the
    checkpoint."""
    tail = ".int8.pte" if int8 else ".pte"
    if output is not None:
        if output.suffix.lower() != ".pte":
            raise DToPError(f"-o {output} should end in .pte")
        if len(sizes) == 1:
            return [output]
        stem = output.stem[: -len(".int8")] if int8 and output.stem.lower().endswith(".int8") else output.stem
        return [output.with_name(f"{stem}.{s}{tail}") for s in sizes]
    return [checkpoint.with_name(f"{checkpoint.stem}.{s}{tail}") for s in sizes]


@app.command()
def executorch(
    checkpoint: Annotated[Path, typer.Argument(help="dtop-export checkpoint (.pt).")],
    size: Annotated[
        str,
        typer.Option(
            "--size", help="Square input side(s), multiples of the stride: one .pte per size (e.g. 384 or 256,384)."
        ),
    ] = "384",
    output: Annotated[
        Path | None,
        output_option(
            "-o",
            "--output",
            help=".pte to write (several sizes: its stem + .SIZE[.int8].pte; default CKPT.SIZE[.int8].pte).",
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8", help="INT8: dynamic quantisation of the linear layers (XNNPACK QD8), checked on --calib."
        ),
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib", help="Folder of images the INT8 program is checked on (default: the embedded calibration set)."
        ),
    ] = None,
    calib_count: Annotated[
        int | None, typer.Option("--calib-count", help="Images the INT8 program is checked on (default 16).")
    ] = None,
    keep_float: Annotated[
        str | None,
        typer.Option("--keep-float", help="Block layers --int8 leaves float: qkv, proj, fc1, fc2 (default: fc2)."),
    ] = None,
    no_whiten: Annotated[bool, typer.Option("--no-whiten", help="Leave the checkpoint's whitening out.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = None,
    progress: ProgressOpt = True,
) -> None:
    r"""Compile a checkpoint to ExecuTorch programs for phones, ARM boards and embedded Linux: one .pte per square
    size, the position embedding resampled once for it, whitening and L2 norms folded in, every operator delegated to
    XNNPACK, the deployment contract inside the file. Images are resized whole to SIZE x SIZE (aspect ratio not
    kept). Needs the \[edge] extra (pip install 'dtop-export\[edge]')."""
    if not int8:
        for value, flag in ((calib, "--calib"), (calib_count, "--calib-count"), (keep_float, "--keep-float")):
            if value is not None:
                raise DToPError(f"{flag} applies to --int8 only: add --int8, or drop {flag}")
    calib_count = 16 if calib_count is None else calib_count
    from dtop_export.edge.pte import DEFAULT_KEEP_FLOAT, check_keep_float

    roles = DEFAULT_KEEP_FLOAT if keep_float is None else [r.strip() for r in keep_float.split(",") if r.strip()]
    check_keep_float(roles if int8 else ())  # before the checkpoint is read and a program built
    if calib_count < 1:
        raise DToPError(f"--calib-count must be >= 1, got {calib_count}")
    if checkpoint.suffix.lower() in (".pte", ".onnx", ".xml"):
        raise DToPError(
            f"{checkpoint.name} is an exported model: `dtop-export executorch` compiles the checkpoint (.pt) it came "
            "from (INT8 too: --int8)"
        )
    sizes = list(dict.fromkeys(parse_int_list(size, "--size")))
    from dtop_export.checkpoint import check_checkpoint_file

    check_checkpoint_file(checkpoint)
    outputs = pte_outputs(checkpoint, output, sizes, int8)
    refuse_existing(*outputs, json_out, force=force)
    from dtop_export.engines.executorch import require_executorch

    require_executorch()  # before minutes of work: the [edge] extra and a matching torch
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.edge.pte import square_preprocess, write_pte
    from dtop_export.int8_check import INT8_MIN_COSINE

    ckpt = load_checkpoint(checkpoint)
    stride = ckpt.preprocess.stride
    for s in sizes:
        if s % stride:
            lower = max(stride, s // stride * stride)
            raise DToPError(
                f"--size {s} is not a multiple of the model stride {stride}: try {lower} or {lower + stride}"
            )
    from dtop_export.memory import check_image_size

    check_image_size(max(sizes), stride=stride, option="--size")  # before minutes of work (and the OOM killer)
    con = console()
    paths, source = [], ""
    if int8:
        from dtop_export.preprocess import list_images
        from dtop_export.quantize import default_calibration_images

        paths, source = (list_images(calib), str(calib)) if calib is not None else default_calibration_images()
    from dtop_export.atomic import atomic_paths

    results = []
    with atomic_paths(outputs) as staged:  # all or nothing: a size that fails leaves no program of any size
        for s, out, tmp in zip(sizes, outputs, staged):
            tensors = []
            with spinner(con, f"{out.name}: preparing", progress) as status:
                if int8:
                    from dtop_export.quantize import calibration_tensors

                    status.update(f"{out.name}: preparing {calib_count} check images at {s}x{s}")
                    pp = square_preprocess(ckpt.preprocess, s)
                    tensors = calibration_tensors(paths, pp, [s], calib_count, check_only=True)
                r = write_pte(
                    ckpt, out, s, int8=int8, calib=tensors, calibration_source=source,
                    keep_float=roles if int8 else (), whiten=not no_whiten, staged=tmp,
                    on_stage=lambda name, o=out: status.update(f"{o.name}: {name}"),
                )  # fmt: skip
            results.append(r)
            con.print(
                f"built {out.name} ({r.size_bytes / 2**20:.1f} MiB, {r.precision}, input 1x3x{s}x{s}, "
                f"{r.delegation.describe()}) in {r.seconds:.1f} s",
                soft_wrap=True,
                highlight=False,
            )
            con.print("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.stage_seconds.items()), style="dim")
            check = r.quantization.get("check")
            if check:
                from dtop_export.int8_check import describe_check

                con.print(  # below the contract write_pte refused the program
                    f"INT8 vs the fp32 program on {describe_check(check)} from {source}: cosine min "
                    f"{check['cosine_min']:.5f}, mean {check['cosine_mean']:.5f} (within the INT8 contract's "
                    f"{INT8_MIN_COSINE:g})",
                    soft_wrap=True,
                    highlight=False,
                )
    con.print(f"wrote {', '.join(str(o) for o in outputs)}", soft_wrap=True, highlight=False)
    if json_out is not None:
        write_json(json_out, {"checkpoint": str(checkpoint), "programs": [r.to_dict() for r in results]})
