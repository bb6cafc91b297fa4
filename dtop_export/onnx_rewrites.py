"""The graph rewrites of the ``optimize`` command (:mod:`dtop_export.optimize`), each exact up to float rounding:
the DToP position-embedding resize as two matmuls (:func:`rewrite_dpe_resize`) and timm's attention as one
``com.microsoft.MultiHeadAttention`` (:func:`fuse_attention`), with the small producer/consumer index they match
patterns on. Imports onnx inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.onnx_graph import attr

if TYPE_CHECKING:
    import onnx

MS_DOMAIN = "com.microsoft"


# graph helpers ---------------------------------------------------------------------------------------


class _Graph:
    """Producer/consumer index over an ONNX graph, for small pattern rewrites."""

    def __init__(self, model: onnx.ModelProto, prefix: str) -> None:
        self.model = model
        self.prefix = prefix
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.refresh()
        self._uid = 0

    def refresh(self) -> None:
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def name(self, base: str) -> str:
        self._uid += 1
        return f"{self.prefix}/{base}_{self._uid}"

    def const(self, value: Any, dtype: Any = np.float32, base: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def const_value(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def single(self, tensor: str, op: str) -> Any | None:
        """The only consumer of ``tensor`` if it is an ``op`` node."""
        cons = self.consumers.get(tensor, [])
        return cons[0] if len(cons) == 1 and cons[0].op_type == op else None

    def made_by(self, tensor: str, op: str) -> Any | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == op else None


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nothing uses, and unused initializers. Returns the number of nodes removed."""
    g = model.graph
    keep_out = {o.name for o in g.output}
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input} | keep_out
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return removed


def _insert_before(model: onnx.ModelProto, anchor: Any, new_nodes: list[Any]) -> None:
    nodes = model.graph.node
    idx = list(nodes).index(anchor)
    for k, n in enumerate(new_nodes):
        nodes.insert(idx + k, n)


def _static_shape(model: onnx.ModelProto, tensor: str) -> list[int | None] | None:
    for t in model.graph.initializer:
        if t.name == tensor:
            return list(t.dims)
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


# rewrite 1: DPE resize -> matmuls --------------------------------------------------------------------


def _cubic_matrix(g: _Graph, out_size: str, in_size: int, a: float, nodes: list[Any]) -> str:
    """Nodes computing the [out, in] cubic interpolation matrix for an int64 scalar ``out_size``."""
    from onnx import TensorProto, helper

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = g.name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=g.name(op), **attrs))
        return out

    c = g.const
    nf = node("Cast", [out_size], to=TensorProto.FLOAT)
    i = node("Range", [c(0.0), nf, c(1.0)])
    scale = node("Div", [c(float(in_size)), nf])
    x = node("Sub", [node("Mul", [node("Add", [i, c(0.5)]), scale]), c(0.5)])
    x0 = node("Floor", [x])
    t = node("Sub", [x, x0])
    one_minus_t = node("Sub", [c(1.0), t])

    def far(d: str) -> str:  # ((a*d - 5a)*d + 8a)*d - 4a for d in [1, 2]
        y = node("Sub", [node("Mul", [c(a), d]), c(5 * a)])
        y = node("Add", [node("Mul", [y, d]), c(8 * a)])
        return node("Sub", [node("Mul", [y, d]), c(4 * a)])

    def near(d: str) -> str:  # ((a+2)*d - (a+3))*d*d + 1 for d in [0, 1]
        y = node("Sub", [node("Mul", [c(a + 2), d]), c(a + 3)])
        return node("Add", [node("Mul", [node("Mul", [y, d]), d]), c(1.0)])

    weights = {
        -1: far(node("Add", [t, c(1.0)])),
        0: near(t),
        1: near(one_minus_t),
        2: far(node("Sub", [c(2.0), t])),
    }
    grid = c(np.arange(in_size, dtype=np.float32)[None, :], base="grid")
    axes = c(np.array([1]), np.int64, base="axes")
    total = None
    for k, w in weights.items():
        idx = node("Clip", [node("Add", [x0, c(float(k))]), c(0.0), c(float(in_size - 1))])
        hit = node("Cast", [node("Equal", [node("Unsqueeze", [idx, axes]), grid])], to=TensorProto.FLOAT)
        term = node("Mul", [hit, node("Unsqueeze", [w, axes])])
        total = term if total is None else node("Add", [total, term])
    assert total is not None
    return total


def rewrite_dpe_resize(model: onnx.ModelProto) -> int:
    """Replace each cubic, half-pixel, non-antialiased ``Resize`` of a rank-4 tensor with static spatial
    size and a ``sizes`` input by ``M_h · X · M_wᵀ``. Returns the number of rewrites."""
    from onnx import helper

    g = _Graph(model, "dtop_dpe")
    count = 0
    for n in list(model.graph.node):
        if n.op_type != "Resize" or len(n.input) < 4 or not n.input[3]:
            continue
        if (
            attr(n, "mode", "nearest") != "cubic"
            or attr(n, "coordinate_transformation_mode", "half_pixel") != "half_pixel"
            or attr(n, "antialias", 0) != 0
            or attr(n, "exclude_outside", 0) != 0
            or attr(n, "keep_aspect_ratio_policy", "stretch") != "stretch"
            or (len(n.input) > 2 and n.input[2] and g.const_value(n.input[2]) is not None)
        ):
            continue
        shape = _static_shape(model, n.input[0])
        if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
            continue
        h0, w0 = int(shape[2]), int(shape[3])
        a = float(attr(n, "cubic_coeff_a", -0.75))
        new: list[Any] = []
        sizes = n.input[3]
        hh, ww = g.name("out_h"), g.name("out_w")
        new.append(helper.make_node("Gather", [sizes, g.const(2, np.int64)], [hh], name=g.name("Gather"), axis=0))
        new.append(helper.make_node("Gather", [sizes, g.const(3, np.int64)], [ww], name=g.name("Gather"), axis=0))
        mh = _cubic_matrix(g, hh, h0, a, new)
        mw = _cubic_matrix(g, ww, w0, a, new)
        rows, mwt = g.name("rows"), g.name("mwt")
        new.append(helper.make_node("MatMul", [mh, n.input[0]], [rows], name=g.name("MatMul")))
        new.append(helper.make_node("Transpose", [mw], [mwt], name=g.name("Transpose"), perm=[1, 0]))
        new.append(helper.make_node("MatMul", [rows, mwt], [n.output[0]], name=g.name("MatMul")))
        _insert_before(model, n, new)
        model.graph.node.remove(n)
        count += 1
    if count:
        remove_dead_nodes(model)
    return count


# rewrite 2: attention -> MultiHeadAttention ----------------------------------------------------------


def fuse_attention(model: onnx.ModelProto) -> int:
    """Fuse timm's exported attention (qkv → reshape/transpose/slices → scaled QKᵀ → softmax → ·V →
    transpose/reshape) into ``Split`` + ``com.microsoft.MultiHeadAttention``. Returns the count."""
    from onnx import helper

    g = _Graph(model, "dtop_mha")
    count = 0
    for sm in [n for n in model.graph.node if n.op_type == "Softmax"]:
        if attr(sm, "axis", -1) not in (-1, 3):
            continue
        qk = g.made_by(sm.input[0], "MatMul")
        av = g.single(sm.output[0], "MatMul")
        if qk is None or av is None or av.input[0] != sm.output[0]:
            continue
        tr = g.single(av.output[0], "Transpose")
        rs = g.single(tr.output[0], "Reshape") if tr is not None else None
        if tr is None or rs is None or list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
            continue
        # v = Squeeze(Slice(Transpose[2,0,3,1,4](Reshape(qkv))))
        sq = g.made_by(av.input[1], "Squeeze")
        sl = g.made_by(sq.input[0], "Slice") if sq is not None else None
        perm = g.made_by(sl.input[0], "Transpose") if sl is not None else None
        if perm is None or list(attr(perm, "perm", [])) != [2, 0, 3, 1, 4]:
            continue
        view = g.made_by(perm.input[0], "Reshape")
        if view is None:
            continue
        qkv = view.input[0]
        # Scale: Mul(q, c) @ Mul(k', c) — timm's sqrt(scale) on both sides.
        mq, mk = g.made_by(qk.input[0], "Mul"), g.made_by(qk.input[1], "Mul")
        if mq is None or mk is None:
            continue
        cq, ck = g.const_value(mq.input[1]), g.const_value(mk.input[1])
        if cq is None or ck is None or cq.size != 1 or ck.size != 1:
            continue
        scale = float(cq.reshape(-1)[0]) * float(ck.reshape(-1)[0])
        qshape = _static_shape(model, av.output[0])  # [B, heads, N, hd]
        if qshape is not None and len(qshape) == 4 and qshape[1] and qshape[3]:
            heads, head_dim = int(qshape[1]), int(qshape[3])
        else:
            head_dim = round(scale**-2)
            heads = 0
        width = _qkv_width(g, qkv)
        if width is None or width % 3:
            continue
        dim = width // 3
        if heads == 0:
            if head_dim <= 0 or dim % head_dim:
                continue
            heads = dim // head_dim
        q, k, v = g.name("q"), g.name("k"), g.name("v")
        split = helper.make_node(
            "Split", [qkv, g.const([dim, dim, dim], np.int64)], [q, k, v], name=g.name("Split"), axis=-1
        )
        mha = helper.make_node(
            "MultiHeadAttention",
            [q, k, v],
            [rs.output[0]],
            name=g.name("MultiHeadAttention"),
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=scale,
        )
        _insert_before(model, rs, [split, mha])
        model.graph.node.remove(rs)
        count += 1
    if count:
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        remove_dead_nodes(model)
    return count


def _qkv_width(g: _Graph, tensor: str) -> int | None:
    """Last-dim width of the qkv projection: from the MatMul weight (through a bias Add)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Add":
        for x in node.input:
            p = g.producer.get(x)
            if p is not None and p.op_type == "MatMul":
                node = p
                break
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        return None
    w = g.const_value(node.input[1])
    return None if w is None or w.ndim != 2 else int(w.shape[1])
