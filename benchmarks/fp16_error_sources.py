"""Where the FP16 preview's error comes from, and whether the whitening's shrinkage changes it.

For each demo folder (``dtop-export demo --seed S`` or ``benchmarks/fp16_whitening.py``'s ``seedS/demo``):

1. **Error sources**: the exported ONNX emulated in FP16 three ways on the embedded evaluation set -- FP16
   weights and activations (what ``check --fp16-audit`` runs), FP16 weights only (activations float32), FP16
   activations only (weights float32), and both with the ViT's residual adds kept FP32 -- and the similarity
   error of each against FP32 (rms over all query × database pairs).
2. **Shrinkage sweep**: the descriptors *before* the whitening (FP32 and emulated FP16) and the training
   pairs' FP32 descriptors; the supervised Lw whitening is learned again for every α (``exact`` = cirtorch's
   Lw, ``auto`` = Ledoit-Wolf, numbers = fixed α) and applied to both, giving per α: cond(P), FP32 mAP,
   FP16 cosine min, the similarity error (absolute and relative to the spread of FP32 similarities), ΔmAP
   and the FP16 contract (cos >= 0.999, |ΔmAP| <= 0.2).

    python benchmarks/fp16_error_sources.py fp16-seeds/seed{0,1,2,3,4}/demo --alphas exact,auto,0.1,0.2,0.3,0.5 \
        --json benchmarks/results/fp16_error_sources.json

About 1 minute per demo folder on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def _cut_before_whitening(model: Any) -> Any:
    """A copy of ``model`` with its output ``descriptors`` taken from the input of the whitening (the
    L2-normalised descriptor before it); the whitening and the final norm are left dangling."""
    from onnx import helper

    from dtop_export.contract import OUTPUT_NAME
    from dtop_export.fp16.convert import l2_norm_nodes, whitening_nodes
    from dtop_export.onnx_graph import copy_model

    model = copy_model(model)
    names = whitening_nodes(model, l2_norm_nodes(model))
    if not names:
        raise SystemExit("this model has no whitening to cut before")
    nodes = list(model.graph.node)
    first = next(n for n in nodes if n.name in names)
    src = first.input[0]
    for n in nodes:
        n.output[:] = [f"{OUTPUT_NAME}_whitened" if o == OUTPUT_NAME else o for o in n.output]
    k = next(i for i, n in enumerate(nodes) if src in n.output)
    nodes.insert(k + 1, helper.make_node("Identity", [src], [OUTPUT_NAME], name="cut_before_whitening"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _residual_adds(model: Any) -> list[str]:
    """Pre-norm residual adds: ``Add`` of two activations, one of which also feeds a ``LayerNormalization``."""
    from dtop_export.onnx_graph import constant_names, consumers

    const, users = constant_names(model), consumers(model)
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Add"
        and not any(i in const for i in n.input)
        and any(c.op_type == "LayerNormalization" for i in n.input for c in users.get(i, []))
    ]


def _variants(model: Any) -> dict[str, Any]:
    """The FP16 emulations: both, weights only, activations only, both with the residual adds in FP32."""
    from dtop_export.fp16.convert import DEFAULT_KEEP_FP32_OPS, convert_to_fp16
    from dtop_export.fp16.emulate import emulate_fp16
    from dtop_export.onnx_graph import FLOAT, FLOAT16, copy_model

    both = emulate_fp16(convert_to_fp16(model, DEFAULT_KEEP_FP32_OPS, []))
    residual = emulate_fp16(convert_to_fp16(model, DEFAULT_KEEP_FP32_OPS, _residual_adds(model)))
    weights = copy_model(both)  # every FP16 round trip of an activation made a float32 no-op
    for n in weights.graph.node:
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == FLOAT16:
                    a.i = FLOAT
    acts = copy_model(both)  # the float32 weights back in place of the rounded ones
    original = {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}
    for t in acts.graph.initializer:
        if t.name in original:
            t.CopyFrom(original[t.name])
    return {
        "weights+activations": both,
        "weights only": weights,
        "activations only": acts,
        "residual adds FP32": residual,
    }


def _extract(model: Any, ds: Any, pp: Any) -> tuple[np.ndarray, np.ndarray]:
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.retrieval.extract import extract_many

    e = OnnxRuntimeEngine(model, graph_optimization="basic")
    q = extract_many([e], ds.queries, pp, (1.0,), ds.bboxes, image_size=ds.image_size, progress=False)[0]
    d = extract_many([e], ds.images, pp, (1.0,), None, image_size=ds.image_size, progress=False)[0]
    return q, d


def _map(d: np.ndarray, q: np.ndarray, ds: Any) -> dict[str, float]:
    from dtop_export.retrieval.metrics import evaluate_descriptors

    return evaluate_descriptors(d, q, ds.gnd)["map"]


def load_demo(demo: Path) -> tuple[Any, Any, Any]:
    """The demo's embedded evaluation set, its exported ONNX (nodes named) and the ONNX's preprocessing."""
    from dtop_export.contract import load_onnx, metadata_of, preprocess_from_metadata
    from dtop_export.fp16.convert import name_nodes
    from dtop_export.retrieval.datasets import resolve_dataset

    ds = resolve_dataset(str(demo / "data" / "sample"))
    model = load_onnx(demo / "model.onnx")
    name_nodes(model)
    return ds, model, preprocess_from_metadata(metadata_of(model))


def error_sources(model: Any, variants: dict[str, Any], ds: Any, pp: Any) -> dict[str, float]:
    """Similarity error rms of each FP16 emulation against FP32 (whitened descriptors, as deployed)."""
    q32, d32 = _extract(model, ds, pp)
    s32 = d32 @ q32.T
    out = {}
    for name, m in variants.items():
        q, d = _extract(m, ds, pp)
        out[name] = float(np.sqrt(((d @ q.T - s32) ** 2).mean()))
    return out


def shrinkage_sweep(demo: Path, model: Any, fp16: Any, ds: Any, pp: Any, alphas: list[str]) -> list[dict[str, Any]]:
    """Per α: the whitening learned from the demo's training pairs, applied to the descriptors before the
    whitening of ``model`` (FP32) and ``fp16`` (its FP16 emulation)."""
    import torch

    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.training.embed import embed_paths
    from dtop_export.training.whitening import condition_number, learn_lw, read_pairs

    q32, d32 = _extract(_cut_before_whitening(model), ds, pp)
    q16, d16 = _extract(_cut_before_whitening(fp16), ds, pp)
    ckpt = load_checkpoint(demo / "train" / "final.pt")
    pairs = read_pairs(demo / "data" / "train-sample")
    order = sorted(set(pairs.qidxs) | set(pairs.pidxs))
    index = {i: k for k, i in enumerate(order)}
    X = embed_paths(ckpt.build_model(), [pairs.paths[i] for i in order], ckpt.preprocess, ds.image_size or 256)
    rows = []
    for a in alphas:
        shrink: float | str = 0.0 if a == "exact" else a if a == "auto" else float(a)
        m, P, alpha = learn_lw(X, [index[i] for i in pairs.qidxs], [index[i] for i in pairs.pidxs], None, shrink)
        mean, proj = m.numpy(), P.numpy()

        def whiten(x: np.ndarray, mean: np.ndarray = mean, proj: np.ndarray = proj) -> np.ndarray:
            y = (x - mean) @ proj.T
            return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

        wq32, wd32, wq16, wd16 = whiten(q32), whiten(d32), whiten(q16), whiten(d16)
        s32 = wd32 @ wq32.T
        err = float(np.sqrt(((wd16 @ wq16.T - s32) ** 2).mean()))
        cos = float(min((wq16 * wq32).sum(1).min(), (wd16 * wd32).sum(1).min()))
        map32, map16 = _map(wd32, wq32, ds), _map(wd16, wq16, ds)
        delta = {k: map16[k] - map32[k] for k in map32}
        rows.append(
            {
                "alpha": a,
                "shrinkage": float(alpha),
                "condition_number": condition_number(torch.from_numpy(proj)),
                "map_fp32": map32,
                "cosine_min": cos,
                "similarity_error_rms": err,
                "relative_error": err / float(s32.std()),
                "map_delta": delta,
                "passed": cos >= 0.999 and max(abs(v) for v in delta.values()) <= 0.2,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demos", nargs="+", type=Path, help="demo output folders (model.onnx, data/, train/final.pt)")
    ap.add_argument("--alphas", default="exact,auto,0.1,0.2,0.3,0.5", help="shrinkage values to sweep")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    alphas = [a.strip() for a in args.alphas.split(",") if a.strip()]
    results = []
    for demo in args.demos:
        ds, model, pp = load_demo(demo)
        variants = _variants(model)
        src = error_sources(model, variants, ds, pp)
        print(f"\n{demo}: similarity error rms  " + ", ".join(f"{k} {v:.2e}" for k, v in src.items()))
        rows = shrinkage_sweep(demo, model, variants["weights+activations"], ds, pp, alphas)
        print("| α | cond(P) | FP32 mAP E/M/H | FP16 cos min | sim. error rms (relative) | ΔmAP E/M/H | contract |")
        print("|---|---:|---|---:|---|---|---|")
        for r in rows:
            print(
                f"| {r['alpha']} ({r['shrinkage']:.3f}) | {r['condition_number']:.1f} | "
                + " / ".join(f"{v:.2f}" for v in r["map_fp32"].values())
                + f" | {r['cosine_min']:.6f} | {r['similarity_error_rms']:.2e} ({r['relative_error']:.2e}) | "
                + " / ".join(f"{v:+.2f}" for v in r["map_delta"].values())
                + f" | {'PASS' if r['passed'] else 'FAIL'} |"
            )
        results.append({"demo": str(demo), "error_sources": src, "shrinkage": rows})
    if args.json:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
