"""What TensorRT made of an ONNX graph: the parser's errors (node, op, description), which ONNX node each layer of
the parsed ``INetworkDefinition`` came from, the float types the network computes in against the FP32 islands
(:func:`network_precision`: what a strongly typed FP16 build proves before it builds), and, for weak typing
(TensorRT 10.0–10.11), the layers pinned to FP32. Works on any object with TensorRT's network API (both flavours,
and the recording fakes of the tests); never imports ``tensorrt`` itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger("dtop_export.engines.tensorrt")


@dataclass(frozen=True)
class ParserError:
    """One error of TensorRT's ONNX parser: the node (name, op, index; empty/-1 when the graph as a whole) and
    the parser's description."""

    node: str
    op: str
    index: int
    desc: str

    def line(self) -> str:
        """``node 'name' (Op): description``."""
        if self.node:
            where = f"node {self.node!r} ({self.op or '?'})"
        elif self.index >= 0:
            where = f"node #{self.index}" + (f" ({self.op})" if self.op else "")
        else:
            where = "graph"
        return f"{where}: {self.desc}"


def parser_errors(parser: Any) -> list[ParserError]:
    """The errors an ``OnnxParser`` recorded (the accessors older bindings lack read as empty)."""

    def call(obj: Any, name: str) -> Any:
        fn = getattr(obj, name, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - older bindings lack some accessors
            return None

    out = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        index = call(err, "node")
        out.append(
            ParserError(
                str(call(err, "node_name") or ""),
                str(call(err, "node_operator") or ""),
                int(index) if index is not None else -1,
                " ".join(str(call(err, "desc") or "unknown error").split()),
            )
        )
    return out


def parser_error_lines(parser: Any) -> list[str]:
    """One line per ONNX-parser error: ``node 'name' (Op): description``."""
    return [e.line() for e in parser_errors(parser)]


def layer_owner(layer_name: str, node_names: Sequence[str]) -> str | None:
    """The ONNX node a TensorRT layer came from: the longest node name equal to the layer name or a prefix
    of it followed by a non-alphanumeric character (the parser names layers after their node and
    suffixes the extra layers it creates)."""
    best = None
    for n in node_names:
        if not n or not layer_name.startswith(n):
            continue
        rest = layer_name[len(n) :]
        if rest and rest[0].isalnum():
            continue
        if best is None or len(n) > len(best):
            best = n
    return best


def layer_node(layer: Any, node_names: Sequence[str]) -> str | None:
    """The ONNX node a parsed layer came from: the parser's ``[ONNX Layer: name]`` metadata where the bindings
    expose it (TensorRT 10.x, TensorRT-RTX), else :func:`layer_owner` on the layer's name."""
    meta = str(getattr(layer, "metadata", "") or "")
    m = re.search(r"\[ONNX Layer: ([^\]]+)\]", meta)
    if m and m.group(1) in set(node_names):
        return m.group(1)
    return layer_owner(layer.name, node_names)


# ONNX ops whose layers only move types or shapes: their output types are what the neighbouring nodes ask for
_TYPE_GLUE_OPS = frozenset({"Cast", "CastLike", "Identity", "Constant", "Shape", "Size"})


@dataclass
class NetworkPrecision:
    """The float types the parsed ``INetworkDefinition`` computes in, per ONNX node, against the islands."""

    expected: str  # "fp16" (islands FP32, the rest FP16) or "fp32" (everything FP32)
    fp32_layers: int = 0
    fp16_layers: int = 0
    island_layers: int = 0  # layers of FP32-island nodes (all of them FP32 when ``ok``)
    islands_seen: int = 0  # island nodes with at least one float layer
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "fp32_layers": self.fp32_layers,
            "fp16_layers": self.fp16_layers,
            "island_layers": self.island_layers,
            "islands_seen": self.islands_seen,
            "violations": self.violations[:20],
        }


def network_precision(
    trt: ModuleType, network: Any, islands: Sequence[str], nodes: Sequence[tuple[str, str]], fp16: bool
) -> NetworkPrecision:
    """Read the float type of every compute layer of a strongly typed network: layers of an FP32-island node
    (``islands``: LayerNorm, Softmax, the L2 norms, the whitening, ...) must compute FP32; under ``fp16`` every
    other node's layers FP16, else FP32. ``nodes`` are the ONNX (name, op type) pairs. Constant, shape and type
    glue (Cast, Identity) layers, and layers without a float output, are not judged."""
    names = [n for n, _ in nodes]
    ops = dict(nodes)
    keep = set(islands)
    half, single = trt.float16, trt.float32
    skip_types = {getattr(trt.LayerType, t) for t in ("CONSTANT", "SHAPE", "CAST") if hasattr(trt.LayerType, t)}
    res = NetworkPrecision("fp16" if fp16 else "fp32")
    seen: set[str] = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        owner = layer_node(layer, names)
        if owner is None or layer.type in skip_types or ops.get(owner) in _TYPE_GLUE_OPS:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if any(getattr(t, "is_shape_tensor", False) for t in outputs):
            continue
        floats = {t.dtype for t in outputs if t.dtype in (half, single)}
        if not floats:
            continue
        island = owner in keep
        want = single if island or not fp16 else half
        res.fp32_layers += single in floats
        res.fp16_layers += half in floats
        if island:
            res.island_layers += 1
            seen.add(owner)
        if floats != {want}:
            got = "/".join(sorted("FP16" if f == half else "FP32" for f in floats))
            why = "an FP32 island" if island else "outside the FP32 islands"
            res.violations.append(
                f"{layer.name} ({str(layer.type).split('.')[-1]}, node {owner}, {ops.get(owner)}) computes {got}, "
                f"{why}: expected {'FP32' if want == single else 'FP16'}"
            )
    res.islands_seen = len(seen)
    return res


def fp32_layers(
    trt: ModuleType, network: Any, keep_nodes: Sequence[str], all_nodes: Sequence[str]
) -> tuple[list[tuple[Any, str]], list[str]]:
    """Weak typing: the layers of ``network`` that came from one of ``keep_nodes`` (by layer name, or by an
    output tensor named like the node's) and compute floats, as (layer, owning node); and the keep nodes
    that matched no such layer. Constant and shape layers, and layers whose outputs are shape tensors or
    not floats, are skipped (Polygraphy's rule: pinning them only blocks fusions or fails the build)."""
    keep = set(keep_nodes)
    floats = {trt.float32, trt.float16}
    skip_types = {getattr(trt.LayerType, t) for t in ("CONSTANT", "SHAPE") if hasattr(trt.LayerType, t)}
    found: list[tuple[Any, str]] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        owner = layer_owner(layer.name, all_nodes)
        if owner not in keep:
            owner = next((o for o in (layer_owner(t.name, all_nodes) for t in outputs) if o in keep), None)
        if owner is None or layer.type in skip_types:
            continue
        if any(getattr(t, "is_shape_tensor", False) for t in outputs) or not any(t.dtype in floats for t in outputs):
            continue
        found.append((layer, owner))
    matched = {owner for _, owner in found}
    return found, sorted(keep - matched)


def pin_layers_fp32(
    trt: ModuleType, network: Any, keep_nodes: Sequence[str], all_nodes: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Weak typing: set ``precision`` and float output types to FP32 on the layers :func:`fp32_layers`
    selects. Returns (pinned layer names, keep nodes that matched no layer — also a warning)."""
    found, unmatched = fp32_layers(trt, network, keep_nodes, all_nodes)
    floats = {trt.float32, trt.float16}
    for layer, _ in found:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
    if unmatched:
        log.warning(
            "weak typing: %d FP32 node(s) matched no TensorRT layer (fused away or renamed), not pinned: %s",
            len(unmatched),
            ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""),
        )
    return [layer.name for layer, _ in found], unmatched
