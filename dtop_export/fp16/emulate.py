"""FP16 on a CPU: emulate TensorRT's FP16 kernels and instrument a float32 graph's ranges.

* :func:`emulate_fp16`: the FP16 ONNX of :mod:`dtop_export.fp16.convert` with every float16 tensor turned into
  float32 *rounded to float16* (``Cast(fp16)→Cast(fp32)`` after every op, weights rounded), so each op
  accumulates in FP32 and only its inputs/outputs carry FP16 precision and range, as TensorRT's FP16 kernels do.
* :func:`instrument_ranges`: a float32 graph that also outputs, per tensor, max |x| and how many non-zero
  values FP16 would flush to zero — what the audit uses to find the nodes that must stay FP32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dtop_export.onnx_graph import FLOAT, FLOAT16, attr, copy_model, name_nodes, tensor_types

if TYPE_CHECKING:
    import onnx

FP16_MAX = 65504.0
FP16_FLUSH = 2.0**-25  # |x| below this rounds to 0 in FP16 (half the smallest subnormal, 2^-24)


def emulate_fp16(fp16_model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model that computes what ``fp16_model`` computes with FP32 accumulation: every float16
    tensor becomes float32 rounded to float16 (``Cast(fp16)→Cast(fp32)`` after its producer), float16
    weights become the same values in float32. Overflow shows as ±inf, as it would on the GPU."""
    import onnx
    from onnx import helper, numpy_helper

    types = tensor_types(fp16_model)
    m = copy_model(fp16_model)
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

    m = copy_model(model)
    name_nodes(m)
    types = tensor_types(m)
    g = m.graph
    flush = onnx.numpy_helper.from_array(np.array(FP16_FLUSH, dtype=np.float32), "dtop_audit_flush")
    g.initializer.append(flush)
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
            # counts as float32 sums of 0/1 (exact up to 2**24 values a tensor; a share either way): no int64
            # or boolean temporaries the size of the tensor, ~3x less overhead than Greater/And/Cast(int64)
            new_nodes += [
                helper.make_node("Abs", [t], [f"{p}/abs"], name=f"{p}/Abs"),
                helper.make_node("ReduceMax", [f"{p}/abs"], [f"{t}__amax"], keepdims=0, name=f"{p}/Max"),
                helper.make_node("Sign", [f"{p}/abs"], [f"{p}/nz"], name=f"{p}/Nz"),
                helper.make_node("ReduceSum", [f"{p}/nz"], [f"{t}__nz"], keepdims=0, name=f"{p}/S1"),
                helper.make_node("Less", [f"{p}/abs", "dtop_audit_flush"], [f"{p}/small"], name=f"{p}/Small"),
                helper.make_node("Cast", [f"{p}/small"], [f"{p}/smallf"], to=FLOAT, name=f"{p}/C"),
                helper.make_node("Mul", [f"{p}/smallf", f"{p}/nz"], [f"{p}/fl"], name=f"{p}/Fl"),
                helper.make_node("ReduceSum", [f"{p}/fl"], [f"{t}__flush"], keepdims=0, name=f"{p}/S2"),
            ]
            g.output.append(helper.make_tensor_value_info(f"{t}__amax", FLOAT, []))
            g.output.append(helper.make_tensor_value_info(f"{t}__nz", FLOAT, []))
            g.output.append(helper.make_tensor_value_info(f"{t}__flush", FLOAT, []))
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
        if n.op_type != "Pad" or attr(n, "mode", "constant") != "constant" or len(n.input) < 3:
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
