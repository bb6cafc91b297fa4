"""Can OpenVINO's bf16 hint meet the bf16 parity contract if chosen layers are kept float32? The parity of
``MODEL.onnx:openvino,bf16`` against PyTorch fp32 on an evaluation set, with layers marked to keep their precision
(OpenVINO's ``DisablePrecisionConversion`` attribute, the mark ``dtop-export openvino`` writes for the f16 hint),
one row per variant, and what the CPU plugin ran each layer type in.

    python benchmarks/openvino_bf16_marks.py dtop-demo/model.pt --data-root dtop-demo/data \\
        --variants none,edges,edges+adds,edges+adds+mvn --json ov_bf16_marks.json

Marks: ``edges`` the layers the PyTorch bf16 path keeps float32 (``engines/torch_deploy.py: fp32_edges``): the
first convolution and the projections to descriptor space (global, local and head FC, and the whitening), the
projections rewritten as 1x1 convolutions (the CPU plugin's MatMul -> FullyConnected conversion drops the mark;
a convolution keeps it); ``adds`` every ONNX Add (the residual stream, float32 under PyTorch's autocast); ``mvn``
every MVN layer of the IR, by type (LayerNorm, GroupNorm: the ONNX frontend builds them under names of its own, so
a mark by ONNX node name misses them). ``islands`` the FP32 islands of the f16 path
(``dtop_export.engines.openvino.fp32_islands``), marked by ONNX node name. A measurement, not a test; on 2 cores
about 20 s per variant for the small preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

PROJECTIONS = ("model.global_branch.fc.", "model.local_branch.fc.", "model.head.fc.", "whiten.")
LAYER_TYPES = ("Convolution", "FullyConnected", "MVN", "Eltwise", "Subgraph")


def edge_nodes(onnx_path: Path) -> tuple[str, list[str]]:
    """(the first convolution, the projections to descriptor space) of a dtop-export ONNX, by node name."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    pixels = graph.input[0].name
    first = next(n.name for n in graph.node if n.op_type == "Conv" and n.input[0] == pixels)
    projections = [n.name for n in graph.node if n.op_type == "Gemm" and n.input[1].startswith(PROJECTIONS)]
    return first, projections


def projections_as_convolutions(model: Any, projections: list[str]) -> int:
    """Rewrite each projection's MatMul (x [B, C] times constant W) as Reshape -> 1x1 Convolution -> Reshape, in
    place, the new layers named ``<node>/...`` so that a mark by node name reaches them. Returns how many."""
    import openvino.opset13 as ops

    from dtop_export.engines.openvino import from_node

    done = 0
    for op in list(model.get_ops()):
        name = op.get_friendly_name()
        if op.get_type_name() != "MatMul" or not from_node(name, set(projections)):
            continue
        assert not op.get_attributes()["transpose_a"], name
        w = op.input_value(1).get_node().get_data()
        w = w if op.get_attributes()["transpose_b"] else w.T  # [D, C]
        d, c = w.shape
        x = ops.reshape(op.input_value(0), ops.constant(np.array([-1, c, 1, 1], np.int64)), special_zero=False)
        conv = ops.convolution(x, ops.constant(w.reshape(d, c, 1, 1).astype(np.float32)), [1, 1], [0, 0], [0, 0],
                               [1, 1])  # fmt: skip
        y = ops.reshape(conv, ops.constant(np.array([-1, d], np.int64)), special_zero=False)
        for node, part in ((x, "to_4d"), (conv, "conv1x1"), (y, "to_2d")):
            node.set_friendly_name(f"{name}/{part}")
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(y.output(0))
        done += 1
    model.validate_nodes_and_infer_types()
    return done


def mark_types(xml: Path, types: set[str]) -> int:
    """Mark every layer of the IR ``xml`` whose type is in ``types`` (once); returns how many it marked."""
    from dtop_export.engines.openvino import keep_fp32

    tree = ET.parse(xml)
    marked = sum(keep_fp32(layer) for layer in tree.getroot().iter("layer") if layer.get("type") in types)
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    return marked


def variant_ir(onnx_path: Path, parts: set[str], xml: Path) -> dict[str, int]:
    """Write the IR of a variant to ``xml``; the counts of what was rewritten and marked."""
    import onnx
    import openvino as ov

    from dtop_export.engines.openvino import fp32_islands, mark_fp32_islands

    model = ov.Core().read_model(str(onnx_path))
    first, projections = edge_nodes(onnx_path)
    nodes: set[str] = set()
    tensors: set[str] = set()
    counts = {"rewritten": 0}
    if "edges" in parts:
        counts["rewritten"] = projections_as_convolutions(model, projections)
        nodes |= {first, *projections}
    if "adds" in parts:
        nodes |= {n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Add"}
    if "islands" in parts:
        isl_nodes, tensors = fp32_islands(onnx_path)
        nodes |= isl_nodes
    ov.save_model(model, str(xml), compress_to_fp16=False)
    counts["marked"] = mark_fp32_islands(xml, nodes, tensors)
    if "mvn" in parts:
        counts["marked"] += mark_types(xml, {"MVN"})
    return counts


def runtime_precisions(engine: Any) -> dict[str, dict[str, int]]:
    """layer type -> runtime precision -> count, in the compiled model, for the types that matter here."""
    c: Counter[tuple[str, str]] = Counter()
    for op in engine.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        c[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    out: dict[str, dict[str, int]] = {}
    for (t, p), n in sorted(c.items()):
        if t in LAYER_TYPES:
            out.setdefault(t, {})[p] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--onnx", type=Path, default=None, help="its ONNX (default: exported into a temporary folder)")
    ap.add_argument("--dataset", default="sample")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--variants", default="none,edges,edges+adds,edges+adds+mvn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from dtop_export.bench.harness import cpu_features, machine_info
    from dtop_export.engines.openvino import OpenVinoEngine
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.parity import parity
    from dtop_export.retrieval.datasets import resolve_dataset

    with tempfile.TemporaryDirectory(prefix="ov-bf16-") as tmp:
        onnx_path = args.onnx or Path(tmp) / "model.onnx"
        if args.onnx is None:
            cmd = [sys.executable, "-m", "dtop_export", "onnx", str(args.checkpoint), "-o", str(onnx_path)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        engines, built = [], []
        for variant in args.variants.split(","):
            parts = {p for p in variant.split("+") if p != "none"}
            xml = Path(tmp) / f"{variant}.xml"
            counts = variant_ir(onnx_path, parts, xml)
            engine = OpenVinoEngine(xml, precision="bf16", threads=args.threads)
            engine.name = f"openvino-bf16[{variant}]"
            engines.append(engine)
            built.append({"variant": variant, **counts, "runtime": runtime_precisions(engine)})
        ds = resolve_dataset(args.dataset, args.data_root)
        report = parity(TorchEngine.from_checkpoint(args.checkpoint), engines, ds, progress=False).to_dict()
    rows = []
    print(f"{args.checkpoint}, OpenVINO bf16 hint, {ds.name}: parity against PyTorch fp32 with these layers marked")
    print("| marked | cos min | cos mean | ΔmAP E / M / H | contract | runtime f32 / bf16: FC, MVN, Eltwise |")
    print("|---|---:|---:|---|---|---|")
    for b, r in zip(built, report["engines"]):
        row = {**b, **{k: r[k] for k in ("cosine_min", "cosine_mean", "map_delta", "passed")}}
        rows.append(row)
        rt = b["runtime"]
        kinds = ", ".join(f"{rt.get(t, {}).get('f32', 0)}/{rt.get(t, {}).get('bf16', 0)}"
                          for t in ("FullyConnected", "MVN", "Eltwise"))  # fmt: skip
        d = r["map_delta"]
        print(f"| {b['variant']} | {r['cosine_min']:.6f} | {r['cosine_mean']:.7f} | {d['easy']:+.2f} / "
              f"{d['medium']:+.2f} / {d['hard']:+.2f} | {'PASS' if r['passed'] else 'FAIL'} | {kinds} |")  # fmt: skip
    if args.json:
        import openvino as ov

        machine = f"{machine_info()['cpu']} [{', '.join(cpu_features())}]; OpenVINO {ov.get_version()}"
        doc = {"checkpoint": str(args.checkpoint), "dataset": ds.name, "machine": machine, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
