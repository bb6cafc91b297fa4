"""``dtop-export openvino``: an OpenVINO IR (fp32, or INT8: QDQ calibration or NNCF) from an exported ONNX."""

from __future__ import annotations

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
    refuse_existing,
    spinner,
)


@app.command()
def openvino(
    model: Annotated[
        Path,
        typer.Argument(
            help="An fp32 ONNX file from `dtop-export onnx` (or a QDQ INT8 file from `quantize`); with --precision "
            "auto, the checkpoint (.pt) that `bench --recommend` measured."
        ),
    ],
    output: Annotated[
        Path | None, output_option("-o", "--output", help="The IR's .xml (default: MODEL.xml, MODEL.int8.xml).")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise to INT8 (calibration images).")] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="INT8 recipe: qdq (dtop-export quantize's calibration, converted; meets the contract) or nncf "
            "(NNCF post-training quantisation; ~5% faster here, larger ΔmAP) [default: qdq].",
        ),
    ] = None,
    calib: CalibOpt = None,
    calib_count: CalibCountOpt = None,
    calib_sizes: CalibSizesOpt = None,
    keep_float: KeepFloatOpt = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="auto: the IR of the fastest OpenVINO path `bench --recommend MODEL.pt` measured within its "
            "contract on this CPU (what the C++ client should run here).",
        ),
    ] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Convert to an OpenVINO IR (.xml + .bin) that keeps the deployment metadata and dynamic
    batch/height/width; --int8 quantises it, calibrated on real images through the one preprocessing path
    (LayerNorm, Softmax, GELU, the FCs, whitening and the --keep-float roles stay float). --precision auto
    writes the IR the C++ client should run on this CPU, as measured by `bench --recommend`."""
    from dtop_export.contract import preprocess_from_metadata
    from dtop_export.errors import DToPError
    from dtop_export.int8_check import describe_check
    from dtop_export.openvino_ir import INT8_RECIPES, require_nncf, write_ir
    from dtop_export.pipeline.artefacts import DEFAULT_CALIB_COUNT, DEFAULT_CALIB_SIZES
    from dtop_export.preprocess import list_images
    from dtop_export.quantize import (
        DEFAULT_FLOAT_ROLES,
        calibration_and_check,
        default_calibration_images,
        require_dynamic_shapes,
        require_fp32,
    )

    int8_only = {"--recipe": recipe, "--calib": calib, "--calib-count": calib_count, "--calib-sizes": calib_sizes}
    for flag, value in {**int8_only, "--keep-float": keep_float}.items():
        if value is not None and not int8:  # an fp32 IR would ignore it
            fix = "drop it" if precision is not None else "add --int8, or drop it"
            raise DToPError(f"{flag} applies to --int8 only: {fix}")
    recipe = recipe or "qdq"
    if recipe not in INT8_RECIPES:
        raise DToPError(f"unknown --recipe {recipe!r}: choose {', '.join(INT8_RECIPES)}")
    if precision is not None:
        if precision != "auto":
            raise DToPError(f"openvino --precision takes only 'auto' (got {precision!r}); INT8 is --int8")
        if int8:
            raise DToPError("--precision auto chooses fp32, bf16 or INT8 from the measurement: drop --int8")
        _auto_ir(model, output, force, progress)
        return
    if int8 and recipe == "nncf":
        require_nncf()  # after the options' own refusals; before the input, the output and the calibration
    meta = onnx_input(model)  # a file that is not ONNX: one line, before "the output exists"
    sizes: list[int] = []
    if int8:
        require_fp32(meta, model)  # an INT8 file: before the calibration images are read
        require_dynamic_shapes(meta, model)
        sizes = list(DEFAULT_CALIB_SIZES) if calib_sizes is None else parse_int_list(calib_sizes, "--calib-sizes")
    if sizes:
        from dtop_export.memory import check_image_size

        check_image_size(max(sizes), stride=int(meta.get("dtop.stride", 16)), option="--calib-sizes")
    output = new_output(model, output, ".int8.xml" if int8 else ".xml", force)  # input checked above
    if output.suffix.lower() != ".xml":
        raise DToPError(f"output {output} should end in .xml (the .bin is written next to it)")
    refuse_existing(output.with_suffix(".bin"), force=force)
    roles = list(DEFAULT_FLOAT_ROLES) if keep_float is None else [r.strip() for r in keep_float.split(",") if r.strip()]
    calib_count = DEFAULT_CALIB_COUNT if calib_count is None else calib_count
    tensors, source, check_inputs = [], "", None
    con = console()
    with spinner(con, "converting", progress) as status:
        if int8:
            paths, source = (list_images(calib), str(calib)) if calib is not None else default_calibration_images()
            status.update(f"preparing {calib_count} calibration images at {sizes}")
            pp = preprocess_from_metadata(meta)
            tensors, check_inputs = calibration_and_check(paths, pp, sizes, calib_count)
        r = write_ir(
            model, output, int8=int8, recipe=recipe, calib=tensors, calibration_source=source, keep_float=roles,
            on_step=lambda text: status.update(text), check_inputs=check_inputs,
        )  # fmt: skip
    what = "fp32"
    if int8:
        n = len(tensors) // len(sizes)
        check = r.calibration["check"]
        what = (f"INT8 ({recipe}, calibrated on {n} image(s) x {len(sizes)} size(s) = {len(tensors)} inputs from "
                f"{source}; float: {', '.join(roles)}; cosine min {check['cosine_min']:.5f} to the fp32 model on "
                f"{describe_check(check)}, within the INT8 contract)")  # fmt: skip
    con.print(
        f"wrote {r.path} + {r.path.with_suffix('.bin').name} ({r.size_bytes / 2**20:.1f} MiB, {what}) "
        f"in {r.seconds:.1f} s",
        soft_wrap=True,
        highlight=False,
    )


def _auto_ir(checkpoint: Path, output: Path | None, force: bool, progress: bool) -> None:
    """``openvino CKPT.pt --precision auto``: the IR of the OpenVINO candidate ``bench --recommend`` chose."""
    from dtop_export.bench.recommend import recommended
    from dtop_export.contract import read_metadata
    from dtop_export.openvino_ir import write_ir

    choice = recommended(checkpoint, runtime="openvino")
    source = Path(choice["path"])
    hint = choice["options"].get("precision")
    int8 = read_metadata(source).get("dtop.precision") == "int8"
    output = new_output(checkpoint, output, ".int8.xml" if int8 else ".xml", force)
    refuse_existing(output.with_suffix(".bin"), force=force)
    con = console()
    with spinner(con, f"converting {source.name}", progress) as status:
        r = write_ir(source, output, inference_precision=hint, on_step=lambda text: status.update(text))
    con.print(
        f"wrote {r.path} + {r.path.with_suffix('.bin').name} ({r.size_bytes / 2**20:.1f} MiB, {r.precision}) from "
        f"{source.name}: {choice['label']}, {choice['speedup']:.2f}× eager fp32 on this CPU, cos min "
        f"{choice['cosine_min']:.5f}, |ΔmAP| <= {choice['map_delta_max']:.2f}",
        soft_wrap=True,
        highlight=False,
    )
    if hint and hint != "fp32":
        con.print(
            f"it runs with the {hint} hint it was measured with (dtop-embed, Python engines; --precision f32 / "
            f"MODEL.xml:fp32 to override)"
        )
