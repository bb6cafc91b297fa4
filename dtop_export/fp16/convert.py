"""FP16 ONNX with FP32 islands made by ``Cast`` nodes: the ``--fp16`` artefact for strongly typed TensorRT.

TensorRT 11 removed the FP16 builder flag and per-layer precision (deprecated since 10.12): a network's
precision is whatever the tensor types and ``Cast`` nodes of the ONNX say. So ``--fp16`` means an ONNX
whose weights and activations are float16 except for *islands* kept in float32:

* ``LayerNormalization``, ``Softmax``, ``InstanceNormalization``/``GroupNormalization`` (mean/variance
  reductions overflow or lose precision in FP16: the ViT pitfalls reported upstream);
* the L2 normalisations — ``ReduceL2`` and the ``Clip``/``Expand``/``Div`` that divide by the norm (an
  FP16 sum of squares overflows once ‖x‖ > 256);
* whitening: the ``Gemm`` (or ``MatMul`` + ``Add``) applied to an L2-normalised descriptor;
* whatever else the FP16 audit (:func:`dtop_export.fp16.audit.fp16_audit`) finds out of FP16 range, passed
  by node name.

The conversion itself is ONNX Runtime's maintained converter
(``onnxruntime.transformers.float16.convert_float_to_float16``, ``keep_io_types=True``: input ``images``
and output ``descriptors`` stay float32). Two clean-ups follow: the FP32→FP16→FP32 round trips it
leaves between two adjacent FP32 nodes are removed (an island stays FP32 end to end), and the node list
is sorted topologically again. The result passes the ONNX checker and runs in ONNX Runtime on a CPU.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dtop_export.atomic import atomic_path
from dtop_export.contract import load_onnx, metadata_of, set_metadata
from dtop_export.errors import DToPError
from dtop_export.onnx_graph import (
    FLOAT,
    FLOAT16,
    constant_names,
    consumers,
    copy_model,
    name_nodes,
    tensor_types,
    topological_sort,
)

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# Op types kept in FP32 by default (whole op types; L2 norms and whitening are found structurally).
DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "InstanceNormalization",
    "GroupNormalization",
    "ReduceL2",
    "ReduceSumSquare",
    "LpNormalization",
)
# Element-wise glue between a norm and the division by it (``x / clamp(‖x‖, eps).expand_as(x)``).
_NORM_GLUE = {"Clip", "Max", "Expand", "Add", "Sqrt", "Reciprocal", "Unsqueeze", "Reshape", "Identity", "Cast"}


@dataclass
class Fp16Plan:
    """Which nodes stay FP32 and why (node name -> reason)."""

    islands: dict[str, str] = field(default_factory=dict)

    def reasons(self) -> dict[str, int]:
        """Count of island nodes per reason."""
        out: dict[str, int] = defaultdict(int)
        for r in self.islands.values():
            out[r] += 1
        return dict(out)


# graph helpers ---------------------------------------------------------------------------------------


def l2_norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of every L2 normalisation ``x / f(‖x‖)``: the ``ReduceL2`` (or
    ``ReduceSumSquare``), the glue after it (Clip, Expand, Sqrt, ...) and the dividing ``Div``/``Mul``."""
    readers = consumers(model)
    found: list[str] = []
    for n in model.graph.node:
        if n.op_type not in ("ReduceL2", "ReduceSumSquare"):
            continue
        found.append(n.name)
        queue = deque(n.output)
        seen: set[str] = set()
        while queue:
            t = queue.popleft()
            for c in readers.get(t, []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in ("Div", "Mul"):
                    found.append(c.name)
                elif c.op_type in _NORM_GLUE:
                    found.append(c.name)
                    queue.extend(c.output)
    return list(dict.fromkeys(found))


def whitening_nodes(model: onnx.ModelProto, l2_nodes: Iterable[str]) -> list[str]:
    """Names of the affine maps applied to an L2-normalised vector (cirtorch whitening ``P·(x − m)``):
    an optional ``Sub``/``Add`` of a constant, then a ``Gemm`` or ``MatMul`` with constant weights, and the
    bias ``Add`` after a ``MatMul``."""
    consts = constant_names(model)
    readers = consumers(model)
    by_name = {n.name: n for n in model.graph.node}
    found: list[str] = []
    for name in l2_nodes:
        node = by_name.get(name)
        if node is None or node.op_type not in ("Div", "Mul"):
            continue
        frontier = list(node.output)
        for _ in range(3):  # Sub(m) -> MatMul/Gemm(P) -> Add(b)
            nxt: list[str] = []
            for t in frontier:
                for c in readers.get(t, []):
                    others = [i for i in c.input if i and i != t]
                    const_operand = bool(others) and all(i in consts for i in others)
                    if const_operand and c.op_type in ("Gemm", "MatMul", "Sub", "Add"):
                        found.append(c.name)
                        nxt.extend(c.output)
            frontier = nxt
    return list(dict.fromkeys(found))


def plan_fp32_islands(
    model: onnx.ModelProto,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
) -> Fp16Plan:
    """The FP32 islands of ``model`` (names unnamed nodes in place). Unknown names in ``keep_fp32_nodes``
    are an error: a typo would silently leave an overflowing layer in FP16."""
    name_nodes(model)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in keep_fp32_nodes if n not in names]
    if unknown:
        raise DToPError(f"no node named {', '.join(unknown[:5])} in the model: take names from `dtop-export check`")
    plan = Fp16Plan()
    ops = set(keep_fp32_ops)
    for n in model.graph.node:
        if n.op_type in ops:
            plan.islands[n.name] = f"op {n.op_type}"
    l2 = l2_norm_nodes(model)
    for name in l2:
        plan.islands.setdefault(name, "L2 normalisation")
    for name in whitening_nodes(model, l2):
        plan.islands.setdefault(name, "whitening")
    for name in keep_fp32_nodes:
        plan.islands.setdefault(name, "requested (FP16 audit)")
    return plan


def _cast_to(node: onnx.NodeProto) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def remove_cast_round_trips(model: onnx.ModelProto, types: dict[str, int]) -> int:
    """Bypass ``Cast(to=fp32)(Cast(to=fp16)(x))`` where ``x`` is float32: the round trips the converter
    leaves between two adjacent FP32 nodes. Returns how many were removed."""
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for n in model.graph.node:
        if n.op_type != "Cast" or _cast_to(n) != FLOAT:
            continue
        first = producer.get(n.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != FLOAT16:
            continue
        src = first.input[0]
        if types.get(src) != FLOAT:
            continue
        if n.output[0] in outputs:  # keep the graph output's name: an Identity of the FP32 value
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = src
        else:
            rename[n.output[0]] = src
            drop.add(id(n))
    if not rename and not drop:
        return 0
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    kept = [n for n in model.graph.node if id(n) not in drop]
    # FP16 casts that nobody reads any more
    used = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and _cast_to(n) == FLOAT16 and n.output[0] not in used)]
    removed = len(model.graph.node) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    live = {o for n in kept for o in n.output} | {i.name for i in model.graph.input}
    keep_vi = [v for v in model.graph.value_info if v.name in live]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_vi)
    return removed


# the conversion --------------------------------------------------------------------------------------


def convert_to_fp16(
    model: onnx.ModelProto,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
) -> onnx.ModelProto:
    """An FP16 copy of the float32 ``model`` with FP32 islands (see the module docstring).

    ``keep_fp32_ops``: op types kept FP32 (default :data:`DEFAULT_KEEP_FP32_OPS`); ``keep_fp32_nodes``:
    node names kept FP32 in addition (the FP16 audit's list). Graph inputs and outputs stay float32.
    ``dtop.precision`` becomes ``fp16`` and ``dtop.fp16`` records the islands.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = copy_model(model)
    _check_float32(model)
    plan = plan_fp32_islands(model, keep_fp32_ops, keep_fp32_nodes)
    from dtop_export.logs import quiet_logging

    with quiet_logging():
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=sorted(set(keep_fp32_ops)),
            node_block_list=sorted(plan.islands),
        )
    topological_sort(converted)
    removed = remove_cast_round_trips(converted, tensor_types(converted))
    topological_sort(converted)
    meta = metadata_of(converted)
    meta["dtop.precision"] = "fp16"
    meta["dtop.fp16"] = json.dumps(
        {
            "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True,
            "keep_fp32_ops": sorted(set(keep_fp32_ops)),
            "fp32_nodes": sorted(plan.islands),
            "fp32_reasons": plan.reasons(),
            "cast_round_trips_removed": removed,
        },
        sort_keys=True,
    )
    set_metadata(converted, meta)
    converted = onnx.shape_inference.infer_shapes(converted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:  # a graph it cannot convert
        raise DToPError(
            f"the FP16 model fails the ONNX checker: {str(e).splitlines()[0]} (convert the fp32 export from "
            "`dtop-export onnx`)"
        ) from e
    return converted


def fp32_nodes_of(model: onnx.ModelProto) -> list[str]:
    """The FP32 island node names recorded in an FP16 model's ``dtop.fp16`` metadata (empty if none)."""
    meta = metadata_of(model)
    try:
        return list(json.loads(meta.get("dtop.fp16", "{}")).get("fp32_nodes", []))
    except json.JSONDecodeError:
        return []


def is_fp16_model(model: onnx.ModelProto) -> bool:
    """True when ``model`` already computes in FP16 (metadata says so, or any float16 initializer)."""
    meta = metadata_of(model)
    if meta.get("dtop.precision") == "fp16":
        return True
    return any(t.data_type == FLOAT16 for t in model.graph.initializer)


def convert_file(
    src: str | Path,
    dst: str | Path,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
) -> onnx.ModelProto:
    """:func:`convert_to_fp16` from file ``src`` to file ``dst`` (atomic; ``dst`` may equal ``src``)."""
    import onnx

    src = Path(src)
    if not src.is_file():
        raise DToPError(f"ONNX file {src} not found")
    model = onnx.load(str(src))
    if is_fp16_model(model):
        raise DToPError(f"{src} is already FP16: convert the float32 export")
    refuse_derived(model, src)
    out = convert_to_fp16(model, keep_fp32_ops, keep_fp32_nodes)
    with atomic_path(dst) as tmp:
        onnx.save_model(out, str(tmp))
    return out


def refuse_derived(model: onnx.ModelProto, source: str | Path = "the model", what: str = "convert to FP16") -> None:
    """Refuse, in one line, a file that is not the fp32 export itself (an INT8 file, an ONNX Runtime-optimised one:
    their QDQ or com.microsoft nodes do not convert to FP16), naming the export it was made from
    (``dtop.derived_from``). ``what``: what would have been done with it."""
    meta = metadata_of(model)
    precision = meta.get("dtop.precision", "fp32")
    if precision != "fp32":
        kind = precision.upper()
    elif "dtop.optimized" in meta:
        kind = "optimised for ONNX Runtime (com.microsoft operators)"
    else:
        return
    origin = meta.get("dtop.derived_from")
    raise DToPError(
        f"{source} is {kind}: give the fp32 export it came from ({origin or 'what `dtop-export onnx` wrote'}) to {what}"
    )


def _check_float32(model: onnx.ModelProto) -> None:
    if is_fp16_model(model):
        raise DToPError("the model is already FP16: convert the float32 export")
    refuse_derived(model)
    bad = [i.name for i in model.graph.input if i.type.tensor_type.elem_type not in (FLOAT, 0)]
    if bad:
        raise DToPError(f"input(s) {', '.join(bad)} are not float32: expected a float32 dtop-export model")


def prepare_fp16_onnx(
    onnx_path: Path, out_path: Path, keep_fp32_nodes: Sequence[str] = (), keep_fp32_ops: Sequence[str] | None = None
) -> tuple[Path, list[str]]:
    """The ONNX a strongly typed ``--fp16`` TensorRT build parses: ``onnx_path`` itself when it is already FP16,
    else its FP16 conversion written to ``out_path``. Returns (path, FP32 island nodes)."""
    import onnx

    converted, fp32_nodes = fp16_onnx_model(onnx_path, keep_fp32_nodes, keep_fp32_ops)
    if converted is None:
        return Path(onnx_path), fp32_nodes
    refuse_fp16_over_source(onnx_path, out_path)
    with atomic_path(out_path) as tmp:
        onnx.save_model(converted, str(tmp))
    return Path(out_path), fp32_nodes


def refuse_fp16_over_source(onnx_path: str | Path, out_path: str | Path) -> None:
    """One line when the FP16 ONNX made from the float32 ``onnx_path`` would be written over ``onnx_path`` itself
    (the same file, through any link): the source is never replaced by its conversion."""
    if Path(out_path).resolve() == Path(onnx_path).resolve():
        raise DToPError(f"--fp16-onnx {out_path} is the float32 ONNX it is made from: name another file")


def fp16_onnx_model(
    onnx_path: Path, keep_fp32_nodes: Sequence[str] = (), keep_fp32_ops: Sequence[str] | None = None
) -> tuple[onnx.ModelProto | None, list[str]]:
    """(the FP16 conversion of ``onnx_path``, its FP32 island nodes), in memory; (None, the islands it records) when
    ``onnx_path`` is FP16 already (:func:`prepare_fp16_onnx` without the write)."""
    model = load_onnx(onnx_path)
    if is_fp16_model(model):
        if keep_fp32_nodes:
            raise DToPError(f"{onnx_path} is already FP16: pass the float32 export to add --keep-fp32 nodes")
        return None, fp32_nodes_of(model)
    refuse_derived(model, onnx_path)
    converted = convert_to_fp16(model, keep_fp32_ops or DEFAULT_KEEP_FP32_OPS, keep_fp32_nodes)
    return converted, fp32_nodes_of(converted)
