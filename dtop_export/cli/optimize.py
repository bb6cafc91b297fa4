"""``dtop-export optimize``: ONNX Runtime CPU graph rewrites of an exported model, verified against it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ProgressOpt, app, console, new_output, onnx_input, output_option, parse_int_list


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="An fp32 ONNX file from `dtop-export onnx`.")],
    output: Annotated[
        Path | None, output_option("-o", "--output", help="Default: MODEL.opt.onnx.", suffix=".onnx")
    ] = None,
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
    progress: ProgressOpt = True,
) -> None:
    """Rewrite an exported model for ONNX Runtime on CPU: DPE resize as matmuls, fused MultiHeadAttention,
    ORT's transformer fusions. Verified against the input; the result runs in ONNX Runtime only."""
    from dtop_export.cli.common import spinner
    from dtop_export.logs import quiet_ort_logs
    from dtop_export.optimize import check_optimizable, optimize_onnx

    check_optimizable(model, onnx_input(model))  # before the output's check and the model's load
    output = new_output(model, output, ".opt.onnx", force)
    sizes = tuple(parse_int_list(check, "--check")) if check.strip() else ()
    con = console()
    with quiet_ort_logs(), spinner(con, "optimising", progress):
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
