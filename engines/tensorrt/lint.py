"""Does TensorRT's ONNX parser accept this graph? Checked on the CPU, before a GPU is involved
(``dtop-export check --target tensorrt``).

Two opinions: :func:`real_parser_issues` runs the real ONNX parser of whichever TensorRT flavour can make a
builder here (TensorRT-RTX does without a GPU; TensorRT proper needs one) and reports each parser error as a
finding naming the node; :func:`lint_tensorrt`, the project's own rules below, is the fallback where no parser
runs and a second opinion where one does (it also knows which 10.x releases lack an op or opset).

Rules from the parser's importer/checker code and ``onnx-tensorrt/docs/operators.md`` (10.15): op support,
opset range, tensor types, Resize modes, BatchNormalization training mode, constant reduction axes, and the
per-op restrictions the support matrix lists. Each problem names the node, the op and a fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dtop_export.contract import load_onnx, opset_of
from dtop_export.onnx_graph import attr, walk

if TYPE_CHECKING:
    import onnx

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
    source: str = "lint"  # "lint" (the rules here) or the parser that reported it ("TensorRT-RTX 1.7.1.116 parser")

    def line(self) -> str:
        """One line: ``error node (Op): problem -> fix``."""
        where = f"{self.node} ({self.op})" if self.node else self.op
        return f"{self.severity} {where}: {self.problem} -> {self.fix}"


@dataclass
class ParserRun:
    """What the real ONNX parser of one TensorRT flavour said about a graph."""

    parser: str  # "TensorRT-RTX 1.7.1.116 ONNX parser"
    issues: list[Issue]
    skipped: list[str]  # flavours that could not run here, with why


def real_parser_issues(model: onnx.ModelProto | str | Path) -> ParserRun:
    """Parse ``model`` with the real ONNX parser of the first installed flavour that can create a builder here
    (TensorRT, then TensorRT-RTX, which needs no GPU) into a network; one :class:`Issue` per parser error, with
    the node's name and op (a fix from :func:`lint_tensorrt` when it flags the same node). ``parser`` is empty
    when none could run (``skipped`` says why)."""
    from dtop_export.engines.tensorrt.install import FLAVOURS, create_builder, import_tensorrt, log, process_logger
    from dtop_export.engines.tensorrt.network import parser_errors
    from dtop_export.errors import DToPError
    from dtop_export.fp16.convert import name_nodes
    from dtop_export.logs import quiet_logger

    if not hasattr(model, "graph"):
        model = load_onnx(model)
    name_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    skipped: list[str] = []
    for flavour in FLAVOURS.values():
        try:
            trt = import_tensorrt(flavour)
            logger = process_logger(trt)
            builder = create_builder(trt, logger, flavour)  # TensorRT proper: needs a CUDA driver and GPU
        except DToPError as e:
            skipped.append(f"{flavour.label}: {e}")
            continue
        flags = 0
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        issues: list[Issue] = []
        with quiet_logger(log.name, logging.CRITICAL):  # its multi-line log: each error becomes one finding
            parsed = parser.parse(model.SerializeToString())
        if not parsed:
            ours = {i.node: i for i in lint_tensorrt(model) if i.node}
            label = f"{flavour.label} {trt.__version__} parser"
            for err in parser_errors(parser):
                fix = ours[err.node].fix if err.node in ours else "change or remove this node, then export again"
                op = err.op or ops.get(err.node, "") or "model"
                issues.append(Issue("error", err.node, op, err.desc, fix, label))
            if not issues:  # no error objects: the logger's line
                why = logger.last_error or "the parser rejected the graph"
                issues.append(Issue("error", "", "model", why, "see the TensorRT log (--debug)", label))
        return ParserRun(f"{flavour.label} {trt.__version__} ONNX parser", issues, skipped)
    return ParserRun("", [], skipped)


def lint_tensorrt(model: onnx.ModelProto | str | Path) -> list[Issue]:
    """Problems the ONNX parser of TensorRT 10.x or 11.x (what ``pip`` installs today) would have with
    ``model`` (a ModelProto or a path).

    The rules are those of the 10.x parsers, whose op and opset support 11.x keeps; 11.x additionally builds
    strongly typed only, which every dtop-export artefact is. Severity ``error``: the parse (or build)
    fails; ``warning``: it works only on some 10.x releases or with a caveat. An empty list means the graph
    should parse on every TensorRT 10.x and 11.x.
    """
    if not hasattr(model, "graph"):
        model = load_onnx(model)
    issues: list[Issue] = []
    opset = opset_of(model)
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
    consts |= {o for n in walk(model.graph) if n.op_type == "Constant" for o in n.output}
    issues += _type_issues(model)
    for n in walk(model.graph):
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
        if int(attr(n, "antialias", 0)) != 0:
            err("antialias=1 is rejected by TensorRT's Resize importer",
                "resize without antialiasing (e.g. F.interpolate(..., antialias=False)) before export")  # fmt: skip
        ctm = attr(n, "coordinate_transformation_mode", "half_pixel")
        if ctm in ("half_pixel_symmetric", "tf_crop_and_resize"):
            err(f"coordinate_transformation_mode={ctm} is not supported",
                "use half_pixel (PyTorch align_corners=False) or align_corners")  # fmt: skip
        policy = attr(n, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            err(f"keep_aspect_ratio_policy={policy} is not supported (only stretch)",
                "compute the output size explicitly and pass `sizes`")  # fmt: skip
        mode = attr(n, "mode", "nearest")
        if mode not in ("nearest", "linear", "cubic"):
            err(f"mode={mode} is not supported", "use nearest, linear or cubic")
    elif op == "BatchNormalization":
        if int(attr(n, "training_mode", 0)) != 0 or len([o for o in n.output if o]) > 1:
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
        dil = attr(n, "dilations", None)
        if dil and any(int(d) != 1 for d in dil):
            err(f"dilations={list(dil)} are not supported", "use dilations of 1")
        if op == "MaxPool" and len([o for o in n.output if o]) > 1:
            err("the Indices output of MaxPool is not supported", "use only the first output")
    elif op == "LayerNormalization":
        if len([o for o in n.output if o]) > 1:
            err("only the first output (Y) of LayerNormalization is supported", "drop the Mean/InvStdDev outputs")
    elif op == "ScatterND":
        red = attr(n, "reduction", "none")
        if red != "none":
            err(f"ScatterND reduction={red} is not supported", "use reduction=none")
    elif op == "LSTM":
        if int(attr(n, "input_forget", 0)) != 0 or int(attr(n, "layout", 0)) != 0:
            err("LSTM needs input_forget=0 and layout=0", "export with the default LSTM layout")
    elif op == "TopK":
        if not constant_input(1):
            err("TopK's K must be a build-time constant", "make K an initializer")
        if int(attr(n, "sorted", 1)) != 1:
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
