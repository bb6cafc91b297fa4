"""Checks that run on a CPU before a GPU is involved: ``dtop-export check``.

* :func:`lint_tensorrt` — does TensorRT's ONNX parser (10.x) accept this graph? Rules from the parser's
  importer/checker code and ``onnx-tensorrt/docs/operators.md`` (10.15): op support, opset range, tensor
  types, Resize modes, BatchNormalization training mode, constant reduction axes, and the per-op
  restrictions the support matrix lists. Each problem names the node, the op and a fix.
* :func:`fp16_audit` — how would this model fare in FP16? FP16 storage is emulated on the CPU: the FP16
  ONNX of :mod:`dtop_export.fp16` with every float16 tensor turned into float32 *rounded to float16*
  (``Cast(fp16)→Cast(fp32)`` after every op, weights rounded), so each op accumulates in FP32 and only
  its inputs/outputs carry FP16 precision and range, as TensorRT's FP16 kernels do. Reports descriptor
  cosine and retrieval mAP against FP32 and the nodes whose activations leave FP16 range (|x| > 65504,
  or too many non-zero values flushed to zero) — the list the builder keeps in FP32.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError
from dtop_export.fp16 import DEFAULT_KEEP_FP32_OPS, FLOAT, FLOAT16
from engines.base import Engine

if TYPE_CHECKING:
    import onnx

    from dtop_export.evaluate import RevisitopDataset
    from dtop_export.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_FLUSH = 2.0**-25  # |x| below this rounds to 0 in FP16 (half the smallest subnormal, 2^-24)

# TensorRT's ONNX parser ---------------------------------------------------------------------------------

# Opset range of the 10.x parsers: 10.0/10.1 parse opsets 9..20, 10.15 up to 24.
TRT10_MIN_OPSET = 9
TRT10_PORTABLE_MAX_OPSET = 20
TRT10_MAX_OPSET = 24

# Operators the 10.15 support matrix marks "N" (onnx-tensorrt docs/operators.md).
UNSUPPORTED_OPS = frozenset(
    {
        "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
        "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
        "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
        "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
        "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt",
        "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
        "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
        "StringSplit", "TfIdfVectorizer", "Unique",
    }
)  # fmt: skip
# Operators the 10.15 support matrix marks "Y".
SUPPORTED_OPS = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
        "Attention", "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil",
        "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh",
        "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
        "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements",
        "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
        "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow",
        "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
        "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
        "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
        "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero",
        "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear",
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
        "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan",
        "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin",
        "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
        "Squeeze", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK",
        "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
    }
)  # fmt: skip
# Ops added late in the 10.x line: parsed only by newer 10.x releases.
RECENT_OPS = {"RMSNormalization": "10.15", "RotaryEmbedding": "10.15", "TensorScatter": "10.15", "Attention": "10.15"}
REDUCE_OPS = frozenset(
    {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
     "ReduceProd", "ReduceSum", "ReduceSumSquare"}
)  # fmt: skip
# Element types the parser imports (DOUBLE is cast down with a warning; UINT8 only at the graph's I/O).
SUPPORTED_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 3: "int8",
                   22: "int4", 17: "float8e4m3fn", 23: "float4e2m1"}  # fmt: skip


@dataclass
class Issue:
    """One thing TensorRT's ONNX parser would reject (``error``) or handle with a caveat (``warning``)."""

    severity: str
    node: str
    op: str
    problem: str
    fix: str

    def line(self) -> str:
        """One line: ``error node (Op): problem -> fix``."""
        where = f"{self.node} ({self.op})" if self.node else self.op
        return f"{self.severity} {where}: {self.problem} -> {self.fix}"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _load_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise DToPError(f"ONNX file {path} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise DToPError(f"{path} is not a readable ONNX file ({e.__class__.__name__})") from e


def _walk(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.extend(_walk(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    out.extend(_walk(g))
    return out


def lint_tensorrt(model: onnx.ModelProto | str | Path) -> list[Issue]:
    """Problems TensorRT 10.x's ONNX parser would have with ``model`` (a ModelProto or a path).

    Severity ``error``: the parse (or build) fails; ``warning``: it works only on some 10.x releases or
    with a caveat. An empty list means the graph should parse on every TensorRT 10.x.
    """
    model = _load_model(model)
    issues: list[Issue] = []
    opset = _opset(model)
    if not TRT10_MIN_OPSET <= opset <= TRT10_MAX_OPSET:
        issues.append(
            Issue("error", "", "model", f"opset {opset} is outside {TRT10_MIN_OPSET}..{TRT10_MAX_OPSET}, the range "
                  "TensorRT 10.x parses", "re-export with --opset 18")
        )  # fmt: skip
    elif opset > TRT10_PORTABLE_MAX_OPSET:
        issues.append(
            Issue("warning", "", "model", f"opset {opset}: TensorRT 10.0/10.1 parse opsets up to "
                  f"{TRT10_PORTABLE_MAX_OPSET} only (10.15 up to {TRT10_MAX_OPSET})",
                  "re-export with --opset 18 to build on every 10.x")
        )  # fmt: skip
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in _walk(model.graph) if n.op_type == "Constant" for o in n.output}
    issues += _type_issues(model)
    for n in _walk(model.graph):
        issues += _node_issues(n, consts)
    return issues


def _type_issues(model: onnx.ModelProto) -> list[Issue]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort for the type check
        inferred = model
    io_names = {v.name for v in [*model.graph.input, *model.graph.output]}
    producers = {o: n for n in inferred.graph.node for o in n.output}
    issues: list[Issue] = []
    seen: set[str] = set()
    values = [(v.name, v.type.tensor_type.elem_type) for v in [*inferred.graph.input, *inferred.graph.output,
                                                               *inferred.graph.value_info]
              if v.type.HasField("tensor_type")]  # fmt: skip
    values += [(t.name, t.data_type) for t in inferred.graph.initializer]
    for name, et in values:
        if name in seen or et == 0:
            continue
        seen.add(name)
        node = producers.get(name)
        where, op = (node.name, node.op_type) if node is not None else (name, "tensor")
        tname = onnx.TensorProto.DataType.Name(et).lower()
        if et == onnx.TensorProto.DOUBLE:
            issues.append(Issue("warning", where, op, f"tensor {name!r} is float64: TensorRT casts it down to "
                                "float32, clamping to ±FLT_MAX", "export in float32"))  # fmt: skip
        elif et == onnx.TensorProto.UINT8:
            if name not in io_names:
                issues.append(
                    Issue(
                        "error",
                        where,
                        op,
                        f"tensor {name!r} is uint8: TensorRT takes uint8 only as a network input or output",
                        "cast to float32 or int32 at the graph boundary",
                    )
                )
        elif et not in SUPPORTED_TYPES:
            issues.append(
                Issue(
                    "error",
                    where,
                    op,
                    f"tensor {name!r} has type {tname}, which TensorRT does not support",
                    "remove it or cast it to float32/int32/int64 before export",
                )
            )
    return issues


def _node_issues(n: onnx.NodeProto, consts: set[str]) -> list[Issue]:
    """Per-node rules from the parser's importers and the support matrix."""
    name, op = n.name or "(unnamed)", n.op_type
    out: list[Issue] = []

    def err(problem: str, fix: str) -> None:
        out.append(Issue("error", name, op, problem, fix))

    def warn(problem: str, fix: str) -> None:
        out.append(Issue("warning", name, op, problem, fix))

    def constant_input(i: int) -> bool:
        return len(n.input) <= i or not n.input[i] or n.input[i] in consts

    if n.domain not in ("", "ai.onnx"):
        hint = (
            "ONNX Runtime contrib op (e.g. from `dtop-export optimize`): build from the plain `dtop-export onnx` export"
            if n.domain == "com.microsoft"
            else "rewrite it with standard ONNX ops or register a TensorRT plugin of that name"
        )
        err(f"custom-domain op {n.domain}::{op} has no TensorRT importer", hint)
        return out
    if op in UNSUPPORTED_OPS:
        err(f"{op} is not supported by TensorRT's ONNX parser", "rewrite it with supported ops before export")
        return out
    if op not in SUPPORTED_OPS:
        err(f"{op} is not in TensorRT's ONNX operator support list", "rewrite it with supported ops before export")
        return out
    if op in RECENT_OPS:
        warn(f"{op} is parsed only by TensorRT >= {RECENT_OPS[op]}", "build with a recent TensorRT or decompose it")

    if op == "Resize":
        if int(_attr(n, "antialias", 0)) != 0:
            err("antialias=1 is rejected by TensorRT's Resize importer",
                "resize without antialiasing (e.g. F.interpolate(..., antialias=False)) before export")  # fmt: skip
        ctm = _attr(n, "coordinate_transformation_mode", "half_pixel")
        if ctm in ("half_pixel_symmetric", "tf_crop_and_resize"):
            err(f"coordinate_transformation_mode={ctm} is not supported",
                "use half_pixel (PyTorch align_corners=False) or align_corners")  # fmt: skip
        policy = _attr(n, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            err(f"keep_aspect_ratio_policy={policy} is not supported (only stretch)",
                "compute the output size explicitly and pass `sizes`")  # fmt: skip
        mode = _attr(n, "mode", "nearest")
        if mode not in ("nearest", "linear", "cubic"):
            err(f"mode={mode} is not supported", "use nearest, linear or cubic")
    elif op == "BatchNormalization":
        if int(_attr(n, "training_mode", 0)) != 0 or len([o for o in n.output if o]) > 1:
            err("BatchNormalization in training mode (training_mode=1 or running-stat outputs) is rejected",
                "export the eval-mode model, or bake the batch statistics into constant weights (fold it)")  # fmt: skip
    elif op in REDUCE_OPS:
        if not constant_input(1):
            err(f"{op} takes its axes from a run-time tensor ({n.input[1]!r}); the parser needs constant axes",
                "make axes an initializer (constant-fold the graph, e.g. with onnxslim)")  # fmt: skip
    elif op in ("Squeeze", "Unsqueeze"):
        if not constant_input(1):
            warn(f"{op} axes come from a run-time tensor; supported only since TensorRT 10.7",
                 "make axes a constant (constant-fold the graph)")  # fmt: skip
    elif op == "Dropout":
        if len(n.input) > 2 and n.input[2] and n.input[2] not in consts:
            err("Dropout training_mode must be a constant False", "export the eval-mode model")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        dil = _attr(n, "dilations", None)
        if dil and any(int(d) != 1 for d in dil):
            err(f"dilations={list(dil)} are not supported", "use dilations of 1")
        if op == "MaxPool" and len([o for o in n.output if o]) > 1:
            err("the Indices output of MaxPool is not supported", "use only the first output")
    elif op == "LayerNormalization":
        if len([o for o in n.output if o]) > 1:
            err("only the first output (Y) of LayerNormalization is supported", "drop the Mean/InvStdDev outputs")
    elif op == "ScatterND":
        red = _attr(n, "reduction", "none")
        if red != "none":
            err(f"ScatterND reduction={red} is not supported", "use reduction=none")
    elif op == "LSTM":
        if int(_attr(n, "input_forget", 0)) != 0 or int(_attr(n, "layout", 0)) != 0:
            err("LSTM needs input_forget=0 and layout=0", "export with the default LSTM layout")
    elif op == "TopK":
        if not constant_input(1):
            err("TopK's K must be a build-time constant", "make K an initializer")
        if int(_attr(n, "sorted", 1)) != 1:
            err("TopK sorted=0 is not supported", "use sorted=1")
    elif op in ("CumSum", "OneHot"):
        if not constant_input(1):
            err(
                f"{op}'s {'axis' if op == 'CumSum' else 'depth'} must be a build-time constant",
                "make it an initializer",
            )
    elif op == "Conv" and not constant_input(1):
        warn("Conv weights come from a run-time tensor: slower and not refittable", "make the weights an initializer")
    return out


# FP16 emulation -----------------------------------------------------------------------------------------


def emulate_fp16(fp16_model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model that computes what ``fp16_model`` computes with FP32 accumulation: every float16
    tensor becomes float32 rounded to float16 (``Cast(fp16)→Cast(fp32)`` after its producer), float16
    weights become the same values in float32. Overflow shows as ±inf, as it would on the GPU."""
    import onnx
    from onnx import helper, numpy_helper

    from dtop_export.fp16 import tensor_types

    types = tensor_types(fp16_model)
    m = onnx.ModelProto()
    m.CopyFrom(fp16_model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes: list[onnx.NodeProto] = []
    k = 0

    def round_trip(src: str, dst: str) -> list[onnx.NodeProto]:
        nonlocal k
        k += 1
        mid = f"{dst}__fp16"
        return [
            helper.make_node("Cast", [src], [mid], to=FLOAT16, name=f"emu_to_fp16_{k}"),
            helper.make_node("Cast", [mid], [dst], to=FLOAT, name=f"emu_to_fp32_{k}"),
        ]

    for n in g.node:
        for a in n.attribute:
            if a.name in ("value", "value_float") and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            if (
                a.name in ("to", "dtype")
                and a.type == onnx.AttributeProto.INT
                and a.i == FLOAT16
                and n.op_type != "Cast"
            ):
                a.i = FLOAT
        if n.op_type == "Constant":
            nodes.append(n)
            continue
        if n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute):
            out = n.output[0]
            n.output[0] = f"{out}__pre"
            for a in n.attribute:
                if a.name == "to":
                    a.i = FLOAT
            nodes.append(n)
            nodes.extend(round_trip(n.output[0], out))
            continue
        extra: list[onnx.NodeProto] = []
        for i, out in enumerate(n.output):
            if out and types.get(out) == FLOAT16:
                n.output[i] = f"{out}__acc"
                extra.extend(round_trip(n.output[i], out))
        nodes.append(n)
        nodes.extend(extra)
    del g.node[:]
    g.node.extend(nodes)
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == FLOAT16:
            v.type.tensor_type.elem_type = FLOAT
    del g.value_info[:]
    return m


def instrument_ranges(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """A copy of the float32 ``model`` that also outputs, for every float32 node output ``t``: max |t|,
    the count of non-zero values FP16 would flush to zero, and the count of non-zero values. Returns the
    model and the watched ``(tensor, node name, op)`` list (output names ``t__amax``/``__flush``/``__nz``)."""
    import onnx
    from onnx import helper

    from dtop_export.fp16 import name_nodes, tensor_types

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m)
    types = tensor_types(m)
    g = m.graph
    flush = onnx.numpy_helper.from_array(np.array(FP16_FLUSH, dtype=np.float32), "dtop_audit_flush")
    zero = onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), "dtop_audit_zero")
    g.initializer.extend([flush, zero])
    watched: list[tuple[str, str, str]] = []
    new_nodes: list[onnx.NodeProto] = []
    sentinels = _sentinel_padding(m)
    for n in g.node:
        new_nodes.append(n)
        if n.op_type in ("Constant", "Shape", "Cast"):
            continue
        for t in n.output:
            if not t or types.get(t) != FLOAT or t in sentinels:
                continue
            p = f"dtop_audit/{len(watched)}"
            new_nodes += [
                helper.make_node("Abs", [t], [f"{p}/abs"], name=f"{p}/Abs"),
                helper.make_node("ReduceMax", [f"{p}/abs"], [f"{t}__amax"], keepdims=0, name=f"{p}/Max"),
                helper.make_node("Greater", [f"{p}/abs", "dtop_audit_zero"], [f"{p}/nz"], name=f"{p}/Nz"),
                helper.make_node("Less", [f"{p}/abs", "dtop_audit_flush"], [f"{p}/small"], name=f"{p}/Small"),
                helper.make_node("And", [f"{p}/nz", f"{p}/small"], [f"{p}/fl"], name=f"{p}/And"),
                helper.make_node("Cast", [f"{p}/nz"], [f"{p}/nzi"], to=onnx.TensorProto.INT64, name=f"{p}/C1"),
                helper.make_node("Cast", [f"{p}/fl"], [f"{p}/fli"], to=onnx.TensorProto.INT64, name=f"{p}/C2"),
                helper.make_node("ReduceSum", [f"{p}/nzi"], [f"{t}__nz"], keepdims=0, name=f"{p}/S1"),
                helper.make_node("ReduceSum", [f"{p}/fli"], [f"{t}__flush"], keepdims=0, name=f"{p}/S2"),
            ]
            g.output.append(helper.make_tensor_value_info(f"{t}__amax", FLOAT, []))
            g.output.append(helper.make_tensor_value_info(f"{t}__nz", onnx.TensorProto.INT64, []))
            g.output.append(helper.make_tensor_value_info(f"{t}__flush", onnx.TensorProto.INT64, []))
            watched.append((t, n.name, n.op_type))
    del g.node[:]
    g.node.extend(new_nodes)
    return m, watched


def _sentinel_padding(model: onnx.ModelProto) -> set[str]:
    """Outputs of constant ``Pad`` nodes that pad with ±huge values (≥ 65504, i.e. -inf for a max-pool) and
    feed only ``MaxPool``: out of FP16 range by design, and harmless there (FP16 keeps them at ±65504/inf,
    which a max ignores)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    out: set[str] = set()
    for n in model.graph.node:
        if n.op_type != "Pad" or _attr(n, "mode", "constant") != "constant" or len(n.input) < 3:
            continue
        value = inits.get(n.input[2])
        if value is None:
            continue
        v = numpy_helper.to_array(value)
        if (
            v.size == 1
            and abs(float(v.reshape(-1)[0])) >= FP16_MAX
            and set(consumers.get(n.output[0], [])) == {"MaxPool"}
        ):
            out.add(n.output[0])
    return out


def preprocess_from_metadata(meta: dict[str, str]) -> PreprocessConfig:
    """The image contract a dtop-export ONNX file carries in its metadata."""
    from dtop_export.preprocess import PreprocessConfig

    resize = json.loads(meta.get("dtop.resize_policy", "{}") or "{}")
    return PreprocessConfig(
        mean=tuple(json.loads(meta.get("dtop.mean", "[0.5, 0.5, 0.5]"))),
        std=tuple(json.loads(meta.get("dtop.std", "[0.5, 0.5, 0.5]"))),
        color_order=meta.get("dtop.color_order", "RGB"),
        stride=int(meta.get("dtop.stride", 16)),
        resize=resize.get("policy", "longest_side"),
        size=int(resize.get("size", 1024)),
        interpolation=resize.get("interpolation", "bilinear"),
    )


class SessionEngine(Engine):
    """An in-memory ONNX model in an ONNX Runtime CPU session behind the engine interface (the audit's
    reference and emulated runs). ``on_outputs`` receives every extra output of each run."""

    name = "onnxruntime"

    def __init__(
        self,
        model: onnx.ModelProto,
        preprocess: PreprocessConfig,
        descriptor_dim: int,
        precision: str = "fp32",
        on_outputs: Callable[[dict[str, np.ndarray]], None] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        from dtop_export.export import INPUT_NAME, OUTPUT_NAME

        opts = ort.SessionOptions()
        # Basic level: constant folding only, no fusions that could skip the emulation's casts.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.preprocess, self.stride, self.descriptor_dim = preprocess, preprocess.stride, descriptor_dim
        self.precision = precision
        self.on_outputs = on_outputs
        self._in, self._out = INPUT_NAME, OUTPUT_NAME
        self._names = [o.name for o in self.session.get_outputs()] if on_outputs else [OUTPUT_NAME]
        self.shapes: set[tuple[int, ...]] = set()

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = self._check_images(images)
        self.shapes.add(tuple(x.shape))
        res = dict(zip(self._names, self.session.run(self._names, {self._in: x})))
        if self.on_outputs is not None:
            self.on_outputs(res)
        return np.asarray(res[self._out], dtype=np.float32)


@dataclass
class RangeFinding:
    """A tensor whose FP32 values leave FP16 range on the audit images."""

    tensor: str
    node: str
    op: str
    max_abs: float
    flush_share: float
    reason: str


@dataclass
class PrecisionRun:
    """One FP16 variant compared with FP32: per-image cosine, finiteness, mAP."""

    label: str
    fp32_nodes: int
    cosine_min: float
    cosine_mean: float
    finite: bool
    map: dict[str, float] = field(default_factory=dict)
    map_delta: dict[str, float] = field(default_factory=dict)


@dataclass
class Fp16AuditResult:
    """What :func:`fp16_audit` found; ``keep_fp32_nodes`` is the list for ``dtop-export trt --keep-fp32``."""

    model: str
    images: int
    queries: int
    image_size: int | None
    shapes: list[str]
    watched_tensors: int
    findings: list[RangeFinding]
    keep_fp32_nodes: list[str]
    runs: list[PrecisionRun]
    map_fp32: dict[str, float] = field(default_factory=dict)
    cosine_contract: float = 0.999
    map_contract: float = 0.2
    seconds: float = 0.0

    @property
    def final(self) -> PrecisionRun:
        """The variant the builder would produce (default islands + the audit's nodes)."""
        return self.runs[-1]

    @property
    def passed(self) -> bool:
        """The final variant meets the FP16 contract (cosine, finite, |ΔmAP|)."""
        r = self.final
        ok = r.finite and r.cosine_min >= self.cosine_contract
        return ok and all(abs(d) <= self.map_contract + 1e-9 for d in r.map_delta.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        """Markdown: one row per FP16 variant, then the out-of-range tensors."""
        setups = list(self.map_fp32)
        head = "| variant | FP32 nodes | cosine min | cosine mean | finite |"
        head += "".join(f" ΔmAP {s[0].upper()} |" for s in setups)
        lines = [head, "|---|---:|---:|---:|:---:|" + "---:|" * len(setups)]
        for r in self.runs:
            finite = "yes" if r.finite else "NO"
            row = f"| {r.label} | {r.fp32_nodes} | {r.cosine_min:.6f} | {r.cosine_mean:.6f} | {finite} |"
            row += "".join(f" {r.map_delta.get(s, float('nan')):+.2f} |" for s in setups)
            lines.append(row)
        if self.findings:
            lines += ["", "| tensor | node | op | max abs | flushed to 0 | reason |", "|---|---|---|---:|---:|---|"]
            for f in self.findings:
                lines.append(
                    f"| {f.tensor} | {f.node} | {f.op} | {f.max_abs:.4g} | {100 * f.flush_share:.2f}% | {f.reason} |"
                )
        return "\n".join(lines)


def _image_source(images: str | Path | Sequence[str | Path] | RevisitopDataset) -> tuple[Any, list[Path], list[Any]]:
    """(dataset or None, query paths, bboxes) + database paths are in the dataset or the list."""
    from dtop_export.evaluate import RevisitopDataset, resolve_dataset

    if isinstance(images, RevisitopDataset):
        return images, [], []
    if isinstance(images, (str, Path)):
        p = Path(images)
        if str(images) == "sample" or (p.is_dir() and any(p.glob("gnd_*.pkl"))):
            return resolve_dataset(str(images)), [], []
        if not p.is_dir():
            raise DToPError(f"image folder {p} does not exist")
        suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
        paths = sorted(q for q in p.rglob("*") if q.suffix.lower() in suffixes and q.is_file())
        if not paths:
            raise DToPError(f"no images ({', '.join(suffixes)}) under {p}")
        return None, paths, []
    paths = [Path(q) for q in images]
    if not paths:
        raise DToPError("no audit images given")
    return None, paths, []


def fp16_audit(
    onnx_path: str | Path,
    images: str | Path | Sequence[str | Path] | RevisitopDataset,
    *,
    image_size: int | None = None,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
    underflow_threshold: float = 0.01,
    scales: Sequence[float] = (1.0,),
    crop_queries: bool = True,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Fp16AuditResult:
    """Audit the float32 dtop-export ONNX ``onnx_path`` for FP16 (see the module docstring).

    ``images``: a revisitop-layout folder (``gnd_*.pkl`` + ``jpg/``: mAP is reported too), ``sample`` (the
    embedded sample set), a plain image folder or a list of paths. Two FP16 variants are compared with
    FP32: the default islands only, and the default islands plus the nodes the audit finds out of range
    (|x| > 65504, or more than ``underflow_threshold`` of the non-zero values flushed to 0) together with
    the nodes that read those tensors (so that they never pass through FP16).
    """

    from dtop_export.evaluate import evaluate_descriptors, extract_many
    from dtop_export.export import OUTPUT_NAME
    from dtop_export.fp16 import convert_to_fp16, is_fp16_model, name_nodes, plan_fp32_islands
    from dtop_export.parity import contract_for, cosine_per_row

    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    model = _load_model(onnx_path)
    name_nodes(model)
    if is_fp16_model(model):
        raise DToPError(f"{onnx_path} is already FP16: audit the float32 export it was made from")
    meta = {p.key: p.value for p in model.metadata_props}
    pp = preprocess_from_metadata(meta)
    out_vi = next((o for o in model.graph.output if o.name == OUTPUT_NAME), None)
    if out_vi is None:
        raise DToPError(f"{onnx_path} is not a dtop-export model: no output '{OUTPUT_NAME}'")
    dim = int(meta.get("dtop.descriptor_dim", out_vi.type.tensor_type.shape.dim[-1].dim_value or 0))

    dataset, paths, _ = _image_source(images)
    if dataset is not None:
        groups = [
            ("queries", dataset.queries, dataset.bboxes if crop_queries else None),
            ("database", dataset.images, None),
        ]
        size = image_size or dataset.image_size or pp.size
        if crop_queries and any(b is None for b in dataset.bboxes):
            raise DToPError(f"{dataset.name}: some queries have no bounding box: pass --no-crop")
    else:
        if limit:
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int)]
        groups = [("images", paths, None)]
        size = image_size or pp.size

    # FP32 reference with range statistics
    stats_model, watched = instrument_ranges(model)
    amax = np.zeros(len(watched))
    flushed = np.zeros(len(watched))
    nonzero = np.zeros(len(watched))

    def collect(res: dict[str, np.ndarray]) -> None:
        for i, (t, _, _) in enumerate(watched):
            amax[i] = max(amax[i], float(np.nan_to_num(res[f"{t}__amax"], nan=np.inf)))
            flushed[i] += float(res[f"{t}__flush"])
            nonzero[i] += float(res[f"{t}__nz"])

    reference = SessionEngine(stats_model, pp, dim, "fp32", on_outputs=collect, threads=threads)
    del stats_model
    base_plan = plan_fp32_islands(model, keep_fp32_ops, keep_fp32_nodes)
    baseline = SessionEngine(
        emulate_fp16(convert_to_fp16(model, keep_fp32_ops, keep_fp32_nodes)), pp, dim, "fp16", threads=threads
    )

    def extract(engines: list[Engine]) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = [[] for _ in engines]
        for desc, group, bboxes in groups:
            res = extract_many(
                engines, group, pp, scales, bboxes, progress=progress, image_size=size,
                batch_size=batch_size, description=f"fp16 audit: {desc}",
            )  # fmt: skip
            for o, r in zip(outs, res):
                o.append(r)
        return [np.concatenate(o) for o in outs]

    ref, base = extract([reference, baseline])
    # what leaves FP16 range
    findings: list[RangeFinding] = []
    bad_tensors: list[str] = []
    for i, (t, node, op) in enumerate(watched):
        share = flushed[i] / nonzero[i] if nonzero[i] else 0.0
        reason = ""
        if not np.isfinite(amax[i]) or amax[i] > FP16_MAX:
            reason = "overflow (> 65504)"
        elif share > underflow_threshold:
            reason = f"underflow (> {100 * underflow_threshold:g}% of non-zero values flush to 0)"
        if reason:
            findings.append(RangeFinding(t, node, op, float(amax[i]), float(share), reason))
            bad_tensors.append(t)
    keep = _nodes_touching(model, bad_tensors)
    keep = [n for n in keep if n not in base_plan.islands or n in set(keep_fp32_nodes)]
    all_keep = list(dict.fromkeys([*keep_fp32_nodes, *keep]))

    runs_desc = [("FP16, default FP32 islands", base, len(base_plan.islands))]
    if keep:
        audited_model = convert_to_fp16(model, keep_fp32_ops, all_keep)
        n_islands = len(plan_fp32_islands(model, keep_fp32_ops, all_keep).islands)
        audited = SessionEngine(emulate_fp16(audited_model), pp, dim, "fp16", threads=threads)
        del audited_model
        (aud,) = extract([audited])
        runs_desc.append(("FP16, + audit's FP32 nodes", aud, n_islands))

    n_q = len(dataset.queries) if dataset is not None else 0
    map_ref: dict[str, float] = {}
    if dataset is not None:
        map_ref = evaluate_descriptors(ref[n_q:], ref[:n_q], dataset.gnd)["map"]
    runs = []
    for label, d, n_islands in runs_desc:
        cos = cosine_per_row(ref, d)
        finite = bool(np.isfinite(d).all())
        run = PrecisionRun(
            label=label,
            fp32_nodes=n_islands,
            cosine_min=float(np.nanmin(cos)) if finite else float("nan"),
            cosine_mean=float(np.nanmean(cos)) if finite else float("nan"),
            finite=finite,
        )
        if dataset is not None and finite:
            run.map = evaluate_descriptors(d[n_q:], d[:n_q], dataset.gnd)["map"]
            run.map_delta = {s: run.map[s] - map_ref[s] for s in map_ref}
        runs.append(run)
    contract = contract_for("fp16")
    return Fp16AuditResult(
        model=str(onnx_path),
        images=len(ref),
        queries=n_q,
        image_size=size,
        shapes=sorted(f"{h}x{w}" for _, _, h, w in reference.shapes),
        watched_tensors=len(watched),
        findings=findings,
        keep_fp32_nodes=all_keep,
        runs=runs,
        map_fp32=map_ref,
        cosine_contract=contract.cosine_min,
        map_contract=contract.map_delta,
        seconds=time.perf_counter() - t0,
    )


def _nodes_touching(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Producers and consumers of ``tensors``: keeping all of them FP32 keeps the tensor out of FP16."""
    wanted = set(tensors)
    out: list[str] = []
    for n in model.graph.node:
        if wanted & set(n.output) or (wanted & set(n.input) and n.op_type not in ("Shape", "Size")):
            out.append(n.name)
    return list(dict.fromkeys(out))
