"""Fast-CPU commands: ``optimize`` (ONNX Runtime graph rewrites) and ``quantize`` (static INT8)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli._app import app, console
from dtop_export.errors import DToPError


def _check_out(src: Path, output: Path | None, suffix: str, force: bool) -> Path:
    if not src.is_file():
        raise DToPError(f"ONNX file {src} not found")
    output = output or src.with_name(src.stem + suffix)
    if output.exists() and not force:
        raise DToPError(f"{output} exists: pass --force to overwrite it")
    return output


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="An fp32 ONNX file from `dtop-export onnx`.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default: MODEL.opt.onnx.")] = None,
    no_attention: Annotated[
        bool, typer.Option("--no-attention", help="Keep attention as exported (no MultiHeadAttention fusion).")
    ] = False,
    no_resize: Annotated[bool, typer.Option("--no-resize", help="Keep the DPE as one cubic Resize.")] = False,
    no_ort_fusions: Annotated[
        bool, typer.Option("--no-ort-fusions", help="Skip onnxruntime.transformers' fusions (GELU, ...).")
    ] = False,
    check: Annotated[
        str, typer.Option("--check", help="Sizes at which to verify against MODEL ('' to skip).")
    ] = "256,384",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Rewrite an exported model for ONNX Runtime on CPU: DPE resize as matmuls, fused MultiHeadAttention,
    ORT's transformer fusions. Verified against the input; the result runs in ONNX Runtime only."""
    from dtop_export.bench import parse_int_list, quiet_ort_logs
    from dtop_export.optimize import optimize_onnx

    output = _check_out(model, output, ".opt.onnx", force)
    sizes = tuple(parse_int_list(check, "--check")) if check.strip() else ()
    con = console()
    with quiet_ort_logs(), con.status("optimising"):
        r = optimize_onnx(
            model,
            output,
            resize=not no_resize,
            attention=not no_attention,
            ort_fusions=not no_ort_fusions,
            check_sizes=sizes,
        )
    done = ", ".join(f"{k} ×{v}" for k, v in r.rewrites.items() if v) or "nothing matched"
    con.print(f"wrote {r.path} ({r.size_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s: {done}", soft_wrap=True)
    if r.max_abs_diff is not None:
        con.print(f"max |Δ| vs {model.name}: {r.max_abs_diff:.2e} at {', '.join(r.checked_shapes)}", style="dim")


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="An fp32 ONNX file (`onnx`, or `optimize` for the fastest).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default: MODEL.int8.onnx.")] = None,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Folder of calibration images (default: the embedded sample set)."),
    ] = None,
    calib_count: Annotated[int, typer.Option("--calib-count", help="Calibration images to use.")] = 16,
    calib_sizes: Annotated[
        str, typer.Option("--calib-sizes", help="Longer-side sizes each image is calibrated at.")
    ] = "320,512",
    method: Annotated[
        str,
        typer.Option("--method", help="Calibration: minmax (mixed sizes), percentile or entropy (square crops)."),
    ] = "minmax",
    keep_float: Annotated[
        str,
        typer.Option(
            "--keep-float",
            help="Conv/MatMul roles left in float: first_conv, stem, elm, qkv, proj, fc1, fc2, attention, dpe.",
        ),
    ] = "first_conv,stem,attention,dpe",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Statically quantise to INT8 (QDQ; int8 per-channel weights, uint8 activations) with calibration
    images. Dynamic shapes are kept; LayerNorm, Softmax, GELU, GroupNorm, the DPE resize, FCs, whitening
    and the L2 norms stay float."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dtop_export.bench import parse_int_list, quiet_ort_logs
    from dtop_export.quantize import calibration_tensors, default_calibration_images, list_images, quantize_int8
    from engines.ort import OnnxRuntimeEngine

    output = _check_out(model, output, ".int8.onnx", force)
    sizes = parse_int_list(calib_sizes, "--calib-sizes")
    roles = [r.strip() for r in keep_float.split(",") if r.strip()]
    from dtop_export.quantize import CALIBRATION_METHODS, ROLES

    bad = sorted(set(roles) - set(ROLES))
    if bad:
        raise DToPError(f"unknown node role(s) {', '.join(bad)} in --keep-float: choose from {', '.join(ROLES)}")
    if method not in CALIBRATION_METHODS:
        raise DToPError(f"unknown --method {method!r}: choose {', '.join(CALIBRATION_METHODS)}")
    con = console()
    with quiet_ort_logs():
        pp = OnnxRuntimeEngine(model).preprocess
        if calib is not None:
            paths, source = list_images(calib), str(calib)
        else:
            with con.status("preparing calibration images"):
                paths, source = default_calibration_images()
        # Histogram calibrators need one input shape: square crops at the largest size.
        square = method != "minmax"
        tensors = calibration_tensors(paths, pp, [max(sizes)] if square else sizes, calib_count, square=square)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=con
        ) as prog:
            task = prog.add_task("calibrating", total=len(tensors))
            r = quantize_int8(
                model,
                output,
                tensors,
                method=method,
                keep_float=roles,
                calibration_source=source,
                on_item=lambda: prog.advance(task),
            )
    con.print(
        f"wrote {r.path} ({r.size_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s: "
        f"{r.quantized_nodes['Conv/MatMul']} Conv/MatMul int8, "
        f"{r.float_nodes['Conv/MatMul kept float']} kept float ({', '.join(roles) or 'none'}); "
        f"calibrated on {len(tensors)} images ({', '.join(r.calibration['shapes'])}) from {source}",
        soft_wrap=True,
    )
