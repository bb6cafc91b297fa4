"""OpenVINO IR (``.xml`` + ``.bin``) from an exported ONNX: fp32, or INT8 (QDQ calibration converted, or NNCF).

The IR keeps the ``dtop.*`` deployment metadata (OpenVINO's ``rt_info["framework"]``) and dynamic
batch/height/width, so :class:`~dtop_export.engines.openvino.OpenVinoEngine` and the C++ client read it like the
ONNX. INT8 calibrates on real images through the one preprocessing path (:func:`quantize.calibration_tensors`)
with one of two recipes (:func:`write_ir`): ``qdq``, the ``dtop-export quantize`` model converted (default: it
meets the INT8 contract on the full model), or ``nncf`` (NNCF post-training quantisation with the same float
roles, the FCs/whitening, LayerNorm, Softmax and GELU float).

Imports openvino and nncf inside the functions.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.int8_check import CheckInputs


@dataclass
class IRResult:
    """What :func:`write_ir` wrote."""

    path: Path
    precision: str
    seconds: float
    size_bytes: int  # .xml + .bin
    calibration: dict[str, Any] = field(default_factory=dict)


def ir_files(xml: Path) -> tuple[Path, Path]:
    """(``.xml``, ``.bin``) of an IR."""
    return xml, xml.with_suffix(".bin")


def _set_metadata(model: Any, updates: dict[str, str]) -> None:
    for key, value in updates.items():
        model.set_rt_info(value, ["framework", key])


def _save_atomic(model: Any, xml: Path) -> None:
    """``ov.save_model`` into a temp folder next to ``xml``, then the pair put in place by
    :func:`~dtop_export.atomic.atomic_paths`: the .bin renamed first, then the .xml (the entry point), with Ctrl-C and
    SIGTERM held between the two renames and the old pair put back when the second fails, so a reader never sees a new
    .xml with an old or half-written .bin, nor an old .xml with the new .bin (and the .xml names its .bin by sha256,
    :func:`stamp_weights`, so a reader that finds any .xml with another .bin refuses the pair)."""
    import openvino as ov

    from dtop_export.atomic import atomic_paths, output_folder

    parent = output_folder(xml)
    with tempfile.TemporaryDirectory(prefix=".dtop-ir-", dir=parent) as tmp:
        staged = Path(tmp) / xml.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        stamp_weights(staged)
        bin_file, xml_file = ir_files(xml)[::-1]
        with atomic_paths([bin_file, xml_file]) as temps:
            for src, temp in zip(ir_files(staged)[::-1], temps, strict=True):
                os.replace(src, temp)


def stamp_weights(xml: Path) -> None:
    """Record the sha256 of the IR's ``.bin`` in its ``.xml`` (``dtop.weights_sha256`` under ``rt_info/framework``),
    which :func:`~dtop_export.engines.openvino.check_weights` compares when the IR is read."""
    import xml.etree.ElementTree as ET

    from dtop_export.digest import file_sha256
    from dtop_export.engines.openvino import WEIGHTS_KEY

    tree = ET.parse(xml)
    info = tree.getroot().find("rt_info")
    if info is None:
        info = ET.SubElement(tree.getroot(), "rt_info")
    framework = info.find("framework")
    if framework is None:
        framework = ET.SubElement(info, "framework")
    for old in framework.findall(WEIGHTS_KEY):
        framework.remove(old)
    ET.SubElement(framework, WEIGHTS_KEY, {"value": file_sha256(xml.with_suffix(".bin"))})
    tree.write(xml, encoding="utf-8", xml_declaration=True)


def describe_ir(xml: Path) -> dict[str, Any]:
    """What ``dtop-export info model.xml`` prints: size, I/O (OpenVINO's partial shapes), operations, the
    precision it was written in and the ``dtop.*`` metadata from ``rt_info``."""
    from dtop_export.contract import metadata_report
    from dtop_export.engines.openvino import model_metadata, read_model

    model = read_model(xml)

    def sig(ports: Any) -> dict[str, str]:
        return {p.get_any_name(): f"{p.get_element_type().get_type_name()} {p.get_partial_shape()}" for p in ports}

    return {
        "file": str(xml),
        "size_mb": round(sum(f.stat().st_size for f in ir_files(xml) if f.is_file()) / 2**20, 2),
        "inputs": sig(model.inputs),
        "outputs": sig(model.outputs),
        "operations": len(model.get_ops()),
    } | metadata_report(model_metadata(model))


def ignored_names(onnx_path: Path, keep_float: Sequence[str], model: Any) -> list[str]:
    """Names of the IR's operations to keep float: the Conv/MatMul nodes whose role is in ``keep_float``, and
    every ONNX ``Gemm`` (the branch/head FCs and the whitening, which ``dtop-export quantize`` keeps float too;
    OpenVINO turns them into MatMuls NNCF would quantise). ONNX node names carry over as friendly names."""
    import onnx

    from dtop_export.quantize import plan_quantization

    graph = onnx.load(str(onnx_path), load_external_data=False)
    _, keep = plan_quantization(graph, keep_float=keep_float)
    keep += [n.name for n in graph.graph.node if n.op_type == "Gemm" and n.name]
    present = {op.get_friendly_name() for op in model.get_ops()}
    return [n for n in keep if n in present]


INT8_RECIPES = ("qdq", "nncf")
NNCF_INSTALL = "pip install 'dtop-export[nncf]'"


def require_nncf() -> None:
    """One line when ``--recipe nncf`` has no NNCF (an extra: the default recipe, ``qdq``, needs none of it)."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        raise DToPError(f"--recipe nncf needs NNCF: {NNCF_INSTALL} (or use the default recipe, qdq)")


def _nncf_int8(onnx_path: Path, model: Any, calib: Sequence[np.ndarray], roles: Sequence[str], fast_bc: bool) -> Any:
    """NNCF post-training quantisation of ``model`` (transformer mode), returns the quantised ov.Model."""
    import logging

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from dtop_export.logs import printed_to_log, quiet_logger, quiet_logging

    nncf.set_log_level(logging.WARNING)  # its INFO lines list every op it leaves float
    ignored = ignored_names(onnx_path, roles, model)
    # NNCF imports torch.utils.cpp_extension while it quantises, which logs "No CUDA runtime is found" on a
    # machine with a CUDA toolkit and no GPU: nothing here compiles CUDA code
    # and draws rich progress bars on stdout (no switch turns them off): the command's spinner says what runs
    with quiet_logging(), quiet_logger("torch.utils.cpp_extension"), printed_to_log():
        return nncf.quantize(
            model,
            nncf.Dataset(list(calib)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calib),
            fast_bias_correction=fast_bc,
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(
                # global min/max over the calibration set, as `dtop-export quantize` (NNCF's default averages
                # per-image ranges and clips the images with the largest activations)
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                # SmoothQuant off: on DToP it moved the worst image's cosine from 0.993 to 0.977
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
            ),
        )


def check_int8(fp32: Any, int8: Any, calib: Sequence[np.ndarray]) -> dict[str, Any]:
    """:func:`~dtop_export.int8_check.agreement` of the INT8 ``ov.Model`` with the fp32 one (both compiled f32 on
    the CPU) on ``calib``."""
    from dtop_export.int8_check import agreement

    return agreement(_descriptors(fp32, calib), _descriptors(int8, calib), "the fp32 ONNX in OpenVINO (f32)")


def _descriptors(model: Any, tensors: Sequence[np.ndarray]) -> list[np.ndarray]:
    import openvino.properties.hint as hints

    from dtop_export.contract import OUTPUT_NAME
    from dtop_export.engines.openvino import core

    compiled = core().compile_model(model, "CPU", {hints.inference_precision: "f32"})
    out = next((o for o in compiled.outputs if OUTPUT_NAME in o.get_names()), compiled.outputs[0])
    request = compiled.create_infer_request()
    return [np.array(request.infer({0: x})[out], dtype=np.float64).ravel() for x in tensors]


def refuse_below_contract(check: dict[str, Any], recipe: str, source: str, inputs: str = "calibration inputs") -> None:
    """:func:`~dtop_export.int8_check.refuse_below_contract` for an INT8 IR: nothing written, what to try instead."""
    from dtop_export.int8_check import refuse_below_contract as refuse

    other = ["the default recipe (--recipe qdq)"] if recipe == "nncf" else []
    remedies = [*other, "more layers float (--keep-float)", "images like yours (--calib DIR)"]
    remedies.append("the fp32 IR (drop --int8)")
    refuse(check, f"the INT8 IR ({recipe})", source, remedies, inputs=inputs)


def write_ir(
    onnx_path: str | Path,
    output: str | Path,
    *,
    int8: bool = False,
    recipe: str = "qdq",
    calib: Sequence[np.ndarray] = (),
    calibration_source: str = "",
    keep_float: Sequence[str] | None = None,
    fast_bias_correction: bool = True,
    inference_precision: str | None = None,
    on_step: Callable[[str], None] | None = None,
    check_inputs: CheckInputs | None = None,
) -> IRResult:
    """Convert the dtop-export ONNX ``onnx_path`` to an IR at ``output`` (``.xml``); INT8 when ``int8``, with the
    preprocessed calibration images ``calib`` ([1, 3, H, W] each, any mix of sizes).

    ``recipe``: ``qdq`` (default) calibrates and quantises exactly as ``dtop-export quantize`` (ONNX Runtime
    static QDQ, the roles of ``keep_float`` left float) and converts that file, which OpenVINO runs as INT8;
    ``nncf`` runs NNCF's post-training quantisation on the IR instead (transformer mode, same float roles plus
    the FCs/whitening, min/max ranges, no SmoothQuant). Measured on r50-vitb16 (benchmarks/README.md): ``qdq``
    meets the INT8 contract, ``nncf`` is ~5% faster but its |ΔmAP| broke the 1.0 bound. A QDQ INT8 file from
    ``dtop-export quantize`` converts as it is (an INT8 IR). ``inference_precision`` (e.g. ``bf16``) is recorded as
    ``dtop.inference_precision``: the hint the measured path ran with (the C++ client's ``--precision``). An fp32
    IR marks its FP32 islands (:func:`~dtop_export.engines.openvino.with_fp32_islands`; ``dtop.fp32_islands``
    counts the layers): under an f16 hint they stay FP32 (OpenVINO 2026.4's CPU plugin ignores the mark under bf16).
    An INT8 IR is checked against the fp32 model on ``check_inputs`` (images held out of calibration,
    :func:`~dtop_export.quantize.calibration_and_check`; default ``calib`` itself) (:func:`check_int8`, recorded in
    ``dtop.quantization`` with what it ran on) and refused below the INT8 contract (:func:`refuse_below_contract`),
    nothing written.
    """
    from dtop_export.contract import read_metadata
    from dtop_export.engines.openvino import model_metadata, read_model, with_fp32_islands
    from dtop_export.int8_check import CheckInputs, calibration_files
    from dtop_export.quantize import DEFAULT_FLOAT_ROLES, ROLES, quantize_int8, require_dynamic_shapes

    t0 = time.perf_counter()
    onnx_path, output = Path(onnx_path), Path(output)
    if output.suffix.lower() != ".xml":
        raise DToPError(f"output {output} should end in .xml (the IR's .bin is written next to it)")
    if recipe not in INT8_RECIPES:
        raise DToPError(f"unknown INT8 recipe {recipe!r}: choose {', '.join(INT8_RECIPES)}")
    if int8 and recipe == "nncf":
        require_nncf()  # before the ONNX is read (the `import nncf` below came before _nncf_int8's check)
    inference_hint = {"dtop.inference_precision": inference_precision} if inference_precision else {}
    meta = read_metadata(onnx_path)
    if "dtop.format" not in meta:
        raise DToPError(f"{onnx_path} has no dtop-export metadata: export it with `dtop-export onnx CKPT.pt`")
    source_precision = meta.get("dtop.precision", "fp32")
    if source_precision not in ("fp32", "int8") or (source_precision == "int8" and int8):
        raise DToPError(f"{onnx_path} is {source_precision}: convert the fp32 export (a QDQ INT8 file converts as is)")
    roles = list(DEFAULT_FLOAT_ROLES if keep_float is None else keep_float)
    bad = sorted(set(roles) - set(ROLES))
    if bad:
        raise DToPError(f"unknown node role(s) {', '.join(bad)}: choose from {', '.join(ROLES)}")
    if int8:
        require_dynamic_shapes(meta, onnx_path)
    if int8 and not calib:
        raise DToPError("no calibration images")
    say = on_step or (lambda _text: None)
    calibration: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dtop-ir-") as tmp:
        if int8 and recipe == "qdq":
            say(f"calibrating and quantising (QDQ) on {len(calib)} inputs")
            staged = Path(tmp) / "int8.onnx"
            # not checked (the IR it converts to is, below); its calibration images recorded (check_inputs)
            q = quantize_int8(
                onnx_path, staged, calib, keep_float=roles, calibration_source=calibration_source, check=False,
                check_inputs=check_inputs,
            )  # fmt: skip
            model = read_model(staged)
            calibration = {**q.calibration, "recipe": "qdq (dtop-export quantize, converted)"}
        else:
            say("reading the ONNX")
            model = read_model(onnx_path)
            if int8:
                say(f"quantising with NNCF on {len(calib)} calibration inputs")
                import nncf

                model = _nncf_int8(onnx_path, model, calib, roles, fast_bias_correction)
                calibration = {
                    "recipe": "nncf",
                    "tool": f"nncf {nncf.__version__}",
                    "images": len(calib),
                    "shapes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in calib}),
                    "source": calibration_source,
                    **({"files": calibration_files(check_inputs.calibrated)} if check_inputs else {}),
                    "model_type": "transformer (LayerNorm, Softmax, GELU float), no SmoothQuant, min/max ranges",
                    "float_roles": roles,
                }
        if int8:
            on = check_inputs or CheckInputs(list(calib), None, held_out=False)
            say(f"checking the INT8 IR against the fp32 model on {len(on.tensors)} {on.what()}")
            check = check_int8(read_model(onnx_path), model, on.tensors) | on.record()
            calibration["check"] = check
            refuse_below_contract(check, recipe, calibration_source, on.what())
        precision = "int8" if int8 or source_precision == "int8" else "fp32"
        islands = 0
        if precision == "fp32":
            # run with an f16 hint (the C++ client's --precision f16), the whitening, L2 norms, LayerNorm and
            # Softmax stay FP32, as in the FP16 ONNX of a TensorRT build
            say("marking the FP32 islands")
            model, islands = with_fp32_islands(model, onnx_path)
        _set_metadata(
            model,
            {
                **{k: v for k, v in meta.items() if k not in model_metadata(model)},
                "dtop.precision": precision,
                "dtop.derived_from": onnx_path.name,
                "dtop.ir_build_seconds": f"{time.perf_counter() - t0:.2f}",
                **({"dtop.quantization": json.dumps(calibration, sort_keys=True)} if int8 else {}),
                **({"dtop.fp32_islands": str(islands)} if islands else {}),
                **inference_hint,
            },
        )
        say(f"writing {output}")
        _save_atomic(model, output)
    return IRResult(
        path=output,
        precision=precision,
        seconds=time.perf_counter() - t0,
        size_bytes=sum(p.stat().st_size for p in ir_files(output)),
        calibration=calibration,
    )
