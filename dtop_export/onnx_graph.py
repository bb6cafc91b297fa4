"""Small ONNX graph helpers shared by the artefact makers (FP16, optimize, quantize) and the checks.

Imports onnx inside the functions, so importing this module is free.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import onnx

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (strings decoded), or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def walk(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.extend(walk(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    out.extend(walk(g))
    return out


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model``."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (``<op>_<index>``); block lists and reports use names."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            cand = f"{n.op_type}_{i}"
            while cand in seen:
                cand += "_"
            n.name = cand
            seen.add(cand)


def constant_names(model: onnx.ModelProto) -> set[str]:
    """Names of the initializers and ``Constant`` outputs."""
    out = {t.name for t in model.graph.initializer}
    out |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return out


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder ``model.graph.node`` so that every node comes after the producers of its inputs (stable)."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    for n in nodes:
        deps.append({producer[i] for i in n.input if i in producer})
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = deque(i for i, k in enumerate(indeg) if k == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise DToPError("the converted graph has a cycle: cannot sort it")
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (inputs, outputs, initializers, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, int] = {}
    for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if v.type.HasField("tensor_type"):
            out[v.name] = v.type.tensor_type.elem_type
    for t in inferred.graph.initializer:
        out[t.name] = t.data_type
    for n in inferred.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t.data_type
    return out
