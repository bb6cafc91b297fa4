"""``dtop-export onnx``: checkpoint -> one deployable ONNX file (``--fp16``: its FP16 conversion)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from dtop_export.atomic import output_folder
from dtop_export.cli.common import ProgressOpt, app, console, output_option, output_path, refuse_existing, spinner


@app.command()
def onnx(
    checkpoint: Annotated[Path, typer.Argument(help="dtop-export checkpoint (.pt).")],
    output: Annotated[
        Path | None,
        output_option("-o", "--output", help="ONNX file to write (default: next to the checkpoint).", suffix=".onnx"),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18..23).")] = 18,
    static: Annotated[
        str | None, typer.Option("--static", help="Fix HxW (e.g. 512x512) for runtimes without dynamic shapes.")
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Fix the batch size (default: dynamic).")] = None,
    no_whiten: Annotated[bool, typer.Option("--no-whiten", help="Leave the checkpoint's whitening out.")] = False,
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16", help="FP16 with FP32 islands as Casts (strongly typed TensorRT); default MODEL.fp16.onnx."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Export a checkpoint to one self-contained ONNX file: dynamic batch/height/width, DPE in-graph,
    batchnorm and whitening folded, metadata for deployers."""
    from dtop_export.digest import prefetch_sha256

    prefetch_sha256(checkpoint)  # hashed on the other core while torch imports; the metadata records it
    from dtop_export.checkpoint import check_checkpoint_file

    check_checkpoint_file(checkpoint)  # before the output's: `onnx m.onnx` would say m.onnx exists
    output = output or output_path(checkpoint.with_suffix(".fp16.onnx" if fp16 else ".onnx"))
    refuse_existing(output, force=force)
    from dtop_export.export import export_onnx, parse_hw

    static_hw = parse_hw(static) if static else None
    if static_hw:
        from dtop_export.memory import check_image_size

        check_image_size(max(static_hw), batch=batch or 1, option="--static's longer side", batch_option="--batch")
    con = console()
    with contextlib.ExitStack() as stack:
        exported = output
        if fp16:  # the float32 export goes to a hidden folder beside it: only the FP16 file is put in place, once
            hidden = stack.enter_context(tempfile.TemporaryDirectory(dir=output_folder(output), prefix="."))
            exported = Path(hidden) / "float32.onnx"
        with spinner(con, "exporting", progress) as status:
            result = export_onnx(
                checkpoint,
                exported,
                opset=opset,
                static_hw=static_hw,
                batch=batch,
                whiten=not no_whiten,
                on_stage=lambda s: status.update(f"exporting: {s}"),
            )
        if fp16:
            from dtop_export.fp16.convert import convert_file, fp32_nodes_of

            with spinner(con, "converting to FP16", progress):
                fp16_model = convert_file(exported, output)
    _report(con, result, output, static, static_hw, batch)
    if fp16:
        con.print(f"converted to FP16: {len(fp32_nodes_of(fp16_model))} nodes kept FP32 (casts around them)")


def _report(con: Any, result: Any, output: Path, static: str | None, static_hw: Any, batch: int | None) -> None:
    """What ``onnx`` wrote: the file, its shapes and descriptor, the stages' times, a static shape's caveat."""
    whitening = "whitened" if '"applied": true' in result.metadata["dtop.whitening"] else "not whitened"
    dims = "dynamic batch/height/width" if not (static_hw or batch) else f"static {static or ''} batch {batch or 'dyn'}"
    con.print(
        f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, opset {result.opset}, {result.nodes} nodes, "
        f"{dims}, descriptor {result.metadata['dtop.descriptor_dim']}-d {whitening}) in {result.seconds:.1f} s",
        soft_wrap=True,
    )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
    con.print(f"stages: {timings}", style="dim")
    if static_hw and static_hw[0] != static_hw[1]:
        con.print(
            f"note: a {static} export takes {static} tensors only: `embed`, `evaluate` and the C++ client resize a "
            f"photo by its longer side, which rarely gives {static}; for photos, --static "
            f"{max(static_hw)}x{max(static_hw)} (the whole image resized to that square) or the dynamic export",
            style="yellow",
            soft_wrap=True,
        )
    elif static_hw:
        con.print(f"resize policy: square at {static_hw[0]} (the whole image resized to {static}, as a .pte)")
