"""INT8 for CPUs: ONNX Runtime static quantisation (QDQ) of an exported DToP model.

Weights are int8 per output channel, activations uint8 per tensor (the u8×s8 pair that AVX-512 VNNI
and ARM dot-product kernels run natively), with scales from calibration images. Only the heavy
operators are quantised: the stem and ELM convolutions and the transformer's linear layers (MatMul).
What stays float, because it is either cheap or sensitive: LayerNormalization, Softmax, GELU, the
GroupNorm of the CNN stem, the DPE ``Resize``, the branch/head FCs and whitening (``Gemm``), the L2
normalisations, and by default the first stem conv (3 input channels, no gain) and the two attention
matmuls (QKᵀ and attention·V: a uint8 softmax rounds most of 1000+ attention weights to zero).

The quantised model keeps dynamic batch/height/width: scales are per tensor, not per shape, and the
calibration set mixes several image sizes so the ranges cover the sizes it will see. By default it is the embedded
calibration set (:func:`default_calibration_images`), no image of which is in the embedded evaluation set.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.atomic import atomic_path
from dtop_export.errors import DToPError
from dtop_export.int8_check import CheckInputs, calibration_files

if TYPE_CHECKING:
    import onnx

    from dtop_export.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

# --method -> ONNX Runtime's CalibrationMethod
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass
class QuantizeResult:
    """What :func:`quantize_int8` wrote and how."""

    path: Path
    seconds: float
    size_bytes: int
    quantized_nodes: dict[str, int]
    float_nodes: dict[str, int]
    calibration: dict[str, Any] = field(default_factory=dict)


# calibration images ----------------------------------------------------------------------------------


CALIBRATION_SET = "calib-sample"  # the embedded calibration set's folder, next to the evaluation set's


def default_calibration_images(cache_dir: Path | None = None) -> tuple[list[Path], str]:
    """The embedded calibration set: 3 views of each photo of the embedded training set (also the evaluation set's
    photos) made by its recipe (:func:`~dtop_export.training.sample.build_training_sample`: random crop, rotation,
    illumination, JPEG; a seed of their own, up to 512 px), 60 images, no file of the evaluation set (``sample``,
    which grades INT8 models: calibrated on its own images, their ΔmAP there was optimistic). Built on first use in
    ``cache_dir/calib-sample``, by default next to the evaluation set
    (:func:`~dtop_export.retrieval.datasets.default_data_root`: ``$DTOP_EXPORT_DATA``, else
    ``$XDG_CACHE_HOME/dtop-export/data``). Returns (paths, a one-line description of the source)."""
    from dtop_export.preprocess import list_images
    from dtop_export.retrieval.datasets import default_data_root
    from dtop_export.training.sample import build_training_sample

    root = (cache_dir or default_data_root()) / CALIBRATION_SET
    try:
        build_training_sample(root, views_per_class=3, seed=1, max_side=512)
    except DToPError as e:  # e.g. a read-only data folder that holds only the evaluation set
        raise DToPError(
            f"{e}: give --calib DIR, or build it where it can be written: dtop-export data sample {root.parent}"
        ) from e
    return list_images(root), f"embedded calibration set, no image of the evaluation set ({root})"


MIN_CALIB_IMAGES = 8  # fewer images than asked and fewer than this: refused (unless asked for that few)


def calibration_tensors(
    paths: Sequence[Path],
    pp: PreprocessConfig,
    sizes: Sequence[int],
    limit: int,
    square: bool = False,
    check_only: bool = False,
    picked: Sequence[Path] | None = None,
) -> list[np.ndarray]:
    """``limit`` images spread evenly over ``paths`` (sets are often grouped by object; fewer than ``limit`` and than
    :data:`MIN_CALIB_IMAGES` available are refused), or those ``picked`` from them already (:func:`split_calibration`),
    each at every size in ``sizes`` (longer side, or square crops), as model inputs [1, 3, H, W] made by the one
    preprocessing path every engine sees (:mod:`dtop_export.preprocess`: EXIF, RGB, resize, stride rounding, mean/std).
    ``check_only``: the images only check an INT8 model that needs no calibration (ExecuTorch's dynamic INT8), and
    the refusals say so."""
    if limit < 1:
        raise DToPError(f"--calib-count must be >= 1, got {limit}")
    if not sizes or min(sizes) < pp.stride:
        raise DToPError(f"calibration sizes must be >= the stride {pp.stride}, got {list(sizes)}")
    paths = list(paths)
    if not paths:
        raise DToPError("no images to check the INT8 program on" if check_only else "no calibration images")
    if len(paths) < min(limit, MIN_CALIB_IMAGES):
        what = (
            f"check image(s) for the {limit} asked: an INT8 check on fewer than {MIN_CALIB_IMAGES} images says "
            "little (dynamic INT8 needs no calibration; the images only check the program)"
            if check_only
            else f"calibration image(s) for the {limit} asked: INT8 ranges from fewer than {MIN_CALIB_IMAGES} images "
            "are unreliable"
        )
        raise DToPError(
            f"{len(paths)} {what}: give a folder with more (--calib DIR), or ask for as few with --calib-count"
        )
    return image_tensors(spread(paths, limit) if picked is None else picked, pp, sizes, square)


def image_tensors(
    paths: Sequence[Path], pp: PreprocessConfig, sizes: Sequence[int], square: bool = False
) -> list[np.ndarray]:
    """Each of ``paths`` at every size in ``sizes`` through the one preprocessing path, [1, 3, H, W] each; an image
    that cannot be read is refused naming ``--calib``."""
    from dtop_export.preprocess import load_image, prepare, prepare_square

    out = []
    for path in paths:
        try:
            img = load_image(path)
        except DToPError as e:
            raise DToPError(f"{e}: remove it from the --calib images, or give another folder") from None
        for size in sizes:
            x = prepare_square(img, pp, size) if square else prepare(img, pp, size)
            out.append(x[None])
    return out


def spread(paths: Sequence[Path], n: int) -> list[Path]:
    """``n`` of ``paths`` (all when fewer) spread evenly over them, in order: sets are often grouped by object."""
    if n < 1 or not paths:
        return []
    return [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)]


def split_calibration(paths: Sequence[Path], limit: int) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out check images) of one source: the ``limit`` :func:`calibration_tensors`
    calibrates on, and up to ``limit`` of the others, spread evenly over them, to check the INT8 model on (its own
    calibration inputs flatter it). No check images when fewer than ``min(limit, MIN_CALIB_IMAGES)`` are left over:
    the check then runs on the calibration images, and says so (:class:`CheckInputs`)."""
    calib = spread(paths, limit)
    used = set(calib)
    rest = [p for p in paths if p not in used]
    return calib, spread(rest, limit) if len(rest) >= min(limit, MIN_CALIB_IMAGES) else []


def calibration_and_check(
    paths: Sequence[Path], pp: PreprocessConfig, sizes: Sequence[int], limit: int, square: bool = False
) -> tuple[list[np.ndarray], CheckInputs]:
    """:func:`calibration_tensors` and the inputs to check the INT8 model on: the held-out images of
    :func:`split_calibration` at the same sizes (as many inputs as calibration, or fewer), else the calibration
    inputs themselves (``held_out`` false)."""
    picked, held = split_calibration(list(paths), limit)
    calib = calibration_tensors(paths, pp, sizes, limit, square=square, picked=picked)
    if not held:
        return calib, CheckInputs(calib, len(picked), held_out=False, calibrated=picked)
    return calib, CheckInputs(image_tensors(held, pp, sizes, square), len(held), held_out=True, calibrated=picked)


def require_fp32(meta: dict[str, str], path: Path) -> None:
    """One line for a model that is not the fp32 export (an INT8 or FP16 file), before any calibration image is read."""
    if meta.get("dtop.precision", "fp32") != "fp32":
        raise DToPError(f"{path} is already {meta['dtop.precision']}: quantise the fp32 export")


def require_dynamic_shapes(meta: dict[str, str], path: Path) -> None:
    """One line for an export of fixed shapes (``--static HxW``, ``--batch N``): calibration feeds one image at a time
    at several sizes, which such a model refuses (ONNX Runtime's calibration failed with a traceback)."""
    hw = json.loads(meta.get("dtop.static_hw") or "null")
    batch = json.loads(meta.get("dtop.fixed_batch") or "null")
    fixed = [*([f"--static {hw[0]}x{hw[1]}"] if hw else []), *([f"--batch {batch}"] if batch else [])]
    if fixed:
        raise DToPError(
            f"{path} is a {' '.join(fixed)} export: INT8 calibration runs one image at a time at several sizes, so "
            "quantise the dynamic export (`dtop-export onnx CKPT.pt` without --static/--batch)"
        )


# graph analysis --------------------------------------------------------------------------------------


def node_roles(model: onnx.ModelProto) -> dict[str, str]:
    """Role of every Conv/MatMul node, by position and weight shape: ``first_conv``, ``stem`` (CNN stem
    convs), ``elm`` (local-branch convs), ``qkv``/``proj``/``fc1``/``fc2`` (transformer linears),
    ``attention`` (activation x activation matmuls), ``linear`` (any other weighted MatMul).
    Nodes without a name get one (``<op>_<index>``)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    roles: dict[str, str] = {}
    seen_conv = seen_transformer = False
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        if n.op_type in ("LayerNormalization", "SkipLayerNormalization", "MultiHeadAttention"):
            seen_transformer = True
        if n.op_type == "Conv":
            roles[n.name] = "first_conv" if not seen_conv else ("elm" if seen_transformer else "stem")
            seen_conv = True
        elif n.op_type == "MatMul" and n.name.startswith("dtop_dpe/"):
            roles[n.name] = "dpe"  # the DPE resize as matmuls (dtop_export.optimize)
        elif n.op_type == "MatMul":
            w = next((shapes[x] for x in n.input[1:] if x in shapes), None)
            if w is None:
                roles[n.name] = "linear" if any(x in consts for x in n.input) else "attention"
            elif len(w) != 2:
                roles[n.name] = "dpe" if len(w) == 4 else "linear"
            elif w[1] == 3 * w[0]:
                roles[n.name] = "qkv"
            elif w[1] == 4 * w[0]:
                roles[n.name] = "fc1"
            elif w[0] == 4 * w[1]:
                roles[n.name] = "fc2"
            elif w[0] == w[1]:
                roles[n.name] = "proj"
            else:
                roles[n.name] = "linear"
    return roles


DEFAULT_FLOAT_ROLES = ("first_conv", "stem", "attention", "dpe")


def plan_quantization(
    model: onnx.ModelProto, *, keep_float: Sequence[str] = DEFAULT_FLOAT_ROLES
) -> tuple[list[str], list[str]]:
    """Names of the Conv/MatMul nodes to quantise, and of those kept float (their role is in ``keep_float``)."""
    roles = node_roles(model)
    unknown = set(keep_float) - {*roles.values(), *ROLES}
    if unknown:
        raise DToPError(f"unknown node role(s) {', '.join(sorted(unknown))}: choose from {', '.join(ROLES)}")
    quant = [n for n, r in roles.items() if r not in keep_float]
    keep = [n for n, r in roles.items() if r in keep_float]
    return quant, keep


ROLES = ("first_conv", "stem", "elm", "qkv", "proj", "fc1", "fc2", "attention", "dpe", "linear")


# quantisation ----------------------------------------------------------------------------------------


class _Reader:
    """CalibrationDataReader over a list of input tensors."""

    def __init__(self, input_name: str, tensors: list[np.ndarray], on_item: Callable[[], None] | None) -> None:
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(tensors)
        self.on_item = on_item

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        if self.on_item:
            self.on_item()
        return {self.input_name: x}

    def rewind(self) -> None:  # pragma: no cover - not used by the static calibrators we call
        raise NotImplementedError


def quantize_int8(
    onnx_path: str | Path,
    output: str | Path,
    calib: Sequence[np.ndarray],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    keep_float: Sequence[str] = DEFAULT_FLOAT_ROLES,
    exclude_nodes: Sequence[str] = (),
    calibration_source: str = "",
    on_item: Callable[[], None] | None = None,
    check: bool = True,
    on_check: Callable[[int], Callable[[], None] | None] | None = None,
    check_inputs: CheckInputs | None = None,
) -> QuantizeResult:
    """Statically quantise the dtop-export ONNX ``onnx_path`` to ``output`` (QDQ, atomic write).

    ``calib``: preprocessed images [1, 3, H, W] (any mix of sizes). ``keep_float``: roles of Conv/MatMul
    nodes (see :func:`node_roles`) left in float; by default the first stem conv and the attention matmuls.
    ``on_item`` is called once per calibration image (progress bars); what ONNX Runtime's histogram calibrators print
    is kept off stdout (logged at debug level). ``check``: the INT8 model, run by ONNX
    Runtime, against the fp32 one on ``check_inputs`` (:func:`calibration_and_check`: images held out of
    calibration; default ``calib`` itself) (:func:`check_int8`, recorded in ``dtop.quantization`` with what it ran
    on), refused below the INT8 contract with nothing written (``openvino --int8`` checks the IR it converts
    instead); ``on_check(total)``, called as the check starts, may return a callback invoked once per checked input.
    ``check_inputs.calibrated``, the calibration images, are recorded as ``files``
    (:func:`~dtop_export.int8_check.calibration_files`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from dtop_export.contract import INPUT_NAME, metadata_of, set_metadata

    t0 = time.perf_counter()
    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise DToPError(f"ONNX file {onnx_path} not found")
    if method not in CALIBRATION_METHODS:
        raise DToPError(f"unknown calibration method {method!r}: choose {', '.join(CALIBRATION_METHODS)}")
    on = check_inputs or CheckInputs(list(calib), None, held_out=False)
    if not calib:
        raise DToPError("no calibration images")
    if method != "minmax" and len({x.shape for x in calib}) > 1:
        raise DToPError(
            f"{method} calibration needs every calibration image at one shape (an ONNX Runtime limitation): "
            "use square crops at one size, or --method minmax"
        )
    model = onnx.load(str(onnx_path))
    meta = metadata_of(model)
    require_fp32(meta, onnx_path)
    require_dynamic_shapes(meta, onnx_path)
    if [i.name for i in model.graph.input] != [INPUT_NAME]:
        raise DToPError(f"{onnx_path} is not a dtop-export model (input must be '{INPUT_NAME}')")
    quant, keep = plan_quantization(model, keep_float=keep_float)
    if exclude_nodes:
        keep += [n for n in quant if n in set(exclude_nodes)]
        quant = [n for n in quant if n not in set(exclude_nodes)]
    with tempfile.TemporaryDirectory(prefix="dtop-quant-") as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save_model(model, str(named))  # node names filled in by plan_quantization
        del model
        staged = Path(tmp) / "int8.onnx"
        from dtop_export.logs import printed_to_log, quiet_logging

        with quiet_logging(), printed_to_log(method != "minmax"):  # the histogram calibrators print
            quantize_static(
                str(named),
                str(staged),
                _Reader(INPUT_NAME, list(calib), on_item),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "MatMul"],
                nodes_to_quantize=quant,
                per_channel=per_channel,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]],
                extra_options={
                    "CalibTensorRangeSymmetric": False,
                    # MatMul outputs stay float: ONNX Runtime runs DQ→MatMul as MatMulIntegerToFloat (no
                    # requantisation of the output; better accuracy and fewer Q/DQ nodes than QLinearMatMul).
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                    "CalibPercentile": 99.999,
                },
                calibration_providers=["CPUExecutionProvider"],
            )
        qmodel = onnx.load(str(staged))
        seconds = time.perf_counter() - t0
        checked = None
        if check:
            checked = check_int8(named, staged, on.tensors, on_check(len(on.tensors)) if on_check else None)
            checked |= on.record()
    calibration: dict[str, Any] = {
        "method": method,
        "images": len(calib),
        "shapes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in calib}),
        "source": calibration_source,
        **({"files": calibration_files(on.calibrated)} if on.calibrated else {}),
        "per_channel": per_channel,
        "activations": "uint8 per-tensor asymmetric",
        "weights": "int8 per-channel symmetric" if per_channel else "int8 per-tensor symmetric",
        "float_ops": "LayerNormalization, Softmax, Gelu, GroupNorm, Resize (DPE), Gemm (FCs, whitening), L2 norms",
        "float_roles": list(keep_float),
        **({"check": checked} if checked else {}),
    }
    if checked:
        from dtop_export.int8_check import refuse_below_contract

        # the default float roles first, then the block layers one at a time (the one ExecuTorch keeps first)
        more = [r for r in DEFAULT_FLOAT_ROLES if r not in keep_float]
        more = more or [r for r in ("fc2", "fc1", "proj", "qkv", "elm") if r not in keep_float][:1]
        fix = [f"more layers float (--keep-float {','.join([*keep_float, *more])})"] if more else []
        remedies = [*fix, "images like yours (--calib DIR)", "the fp32 ONNX (no INT8)"]
        refuse_below_contract(checked, "the INT8 model", calibration_source, remedies, inputs=on.what())
    meta.update(
        {
            "dtop.precision": "int8",
            "dtop.quantization": json.dumps(calibration, sort_keys=True),
            "dtop.derived_from": onnx_path.name,
            "dtop.build_seconds": f"{seconds:.2f}",
        }
    )
    set_metadata(qmodel, meta)
    with atomic_path(output) as tmp_out:
        onnx.save_model(qmodel, str(tmp_out))
    ops = Counter(n.op_type for n in qmodel.graph.node)
    q_types = {"QuantizeLinear", "DequantizeLinear"}
    return QuantizeResult(
        path=output,
        seconds=seconds,
        size_bytes=output.stat().st_size,
        quantized_nodes={"Conv/MatMul": len(quant), **{k: v for k, v in ops.items() if k in q_types}},
        float_nodes={"Conv/MatMul kept float": len(keep)},
        calibration=calibration,
    )


def check_int8(
    fp32: Path, int8: Path, calib: Sequence[np.ndarray], on_item: Callable[[], None] | None = None
) -> dict[str, Any]:
    """:func:`~dtop_export.int8_check.agreement` of the INT8 ONNX with the fp32 one, both run by ONNX Runtime on
    the CPU, on ``calib`` ([1, 3, H, W] each, one run per input)."""
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.host import usable_cpus
    from dtop_export.int8_check import agreement

    threads = usable_cpus()
    ref, q = OnnxRuntimeEngine(fp32, threads=threads), OnnxRuntimeEngine(int8, threads=threads)
    a, b = [], []
    for x in calib:
        a.append(ref.embed(x))
        b.append(q.embed(x))
        if on_item is not None:
            on_item()
    return agreement(a, b, "the fp32 ONNX in ONNX Runtime (CPU)")
