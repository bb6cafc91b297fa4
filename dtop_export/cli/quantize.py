"""``dtop-export quantize``: static INT8 (QDQ) with calibration images through the one preprocessing path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import (
    CalibCountOpt,
    CalibOpt,
    CalibSizesOpt,
    ForceOpt,
    KeepFloatOpt,
    ProgressOpt,
    app,
    console,
    new_output,
    onnx_input,
    output_option,
    parse_int_list,
    progress_bar,
)


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="An fp32 ONNX file (`onnx`, or `optimize` for the fastest).")],
    output: Annotated[
        Path | None, output_option("-o", "--output", help="Default: MODEL.int8.onnx.", suffix=".onnx")
    ] = None,
    calib: CalibOpt = None,
    calib_count: CalibCountOpt = None,
    calib_sizes: CalibSizesOpt = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="Calibration: minmax (mixed sizes), percentile or entropy (square crops at one --calib-sizes size, "
            "default 512).",
        ),
    ] = "minmax",
    keep_float: KeepFloatOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Statically quantise to INT8 (QDQ; int8 per-channel weights, uint8 activations) with calibration
    images. Dynamic shapes are kept; LayerNorm, Softmax, GELU, GroupNorm, the DPE resize, FCs, whitening
    and the L2 norms stay float."""
    from dtop_export.errors import DToPError
    from dtop_export.int8_check import INT8_MIN_COSINE, describe_check
    from dtop_export.logs import quiet_ort_logs
    from dtop_export.memory import check_image_size
    from dtop_export.pipeline.artefacts import DEFAULT_CALIB_COUNT, DEFAULT_CALIB_SIZES, build_int8
    from dtop_export.preprocess import list_images
    from dtop_export.quantize import DEFAULT_FLOAT_ROLES, require_dynamic_shapes, require_fp32

    meta = onnx_input(model)  # a file that is not ONNX: one line, before "the output exists"
    require_fp32(meta, model)  # an INT8 file: before the calibration images are read
    require_dynamic_shapes(meta, model)
    sizes = parse_int_list(calib_sizes, "--calib-sizes") if calib_sizes is not None else list(DEFAULT_CALIB_SIZES)
    if method != "minmax":  # one shape: square crops at one size (build_int8 would take the largest)
        if calib_sizes is not None and len(sizes) > 1:
            raise DToPError(
                f"--method {method} calibrates at one size (square crops; an ONNX Runtime limitation): give one "
                f"--calib-sizes (e.g. {max(sizes)}), or use --method minmax for several"
            )
        sizes = [max(sizes)]
    check_image_size(max(sizes), stride=int(meta.get("dtop.stride", 16)), option="--calib-sizes")
    output = new_output(model, output, ".int8.onnx", force)  # the input is checked above
    roles = list(DEFAULT_FLOAT_ROLES) if keep_float is None else [r.strip() for r in keep_float.split(",") if r.strip()]
    paths, source = (list_images(calib), str(calib)) if calib is not None else (None, "")
    con = console()
    with quiet_ort_logs(), progress_bar(con, enabled=progress) as prog:
        task = prog.add_task("preparing calibration images", total=None)

        def calibrating(total: int) -> Callable[[], None]:
            prog.update(task, description="calibrating", total=total, completed=0)
            return lambda: prog.advance(task)

        def checking(total: int) -> Callable[[], None]:
            prog.update(task, description="checking INT8 vs fp32", total=total, completed=0)
            return lambda: prog.advance(task)

        r = build_int8(
            model, output, calib_paths=paths, calib_source=source, calib_sizes=sizes,
            calib_count=DEFAULT_CALIB_COUNT if calib_count is None else calib_count,
            method=method, keep_float=roles, on_calibration=calibrating, on_check=checking,
        )  # fmt: skip
    cal = r.calibration
    con.print(
        f"wrote {r.path} ({r.size_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s: "
        f"{r.quantized_nodes['Conv/MatMul']} Conv/MatMul int8, "
        f"{r.float_nodes['Conv/MatMul kept float']} kept float ({', '.join(roles) or 'none'}); "
        f"calibrated on {cal['images'] // len(sizes)} image(s) x {len(sizes)} size(s) = {cal['images']} inputs "
        f"({', '.join(cal['shapes'])}) from {cal['source']}",
        soft_wrap=True,
    )
    check = cal["check"]
    con.print(
        f"INT8 vs fp32 (ONNX Runtime) on {describe_check(check)}: cosine min "
        f"{check['cosine_min']:.5f}, mean {check['cosine_mean']:.5f} (the INT8 contract's floor: {INT8_MIN_COSINE:g})",
        soft_wrap=True,
        highlight=False,
    )
