"""Export a preset (random weights) and report export time, file size, ORT-vs-PyTorch parity per shape
and latency, as a Markdown table (and JSON with --json).

    python benchmarks/export_report.py --preset r50-vitb16 --latency-sizes 384 512 --runs 3

Parity uses the same random input for both engines; latency is interleaved (PyTorch, ORT, PyTorch, ...)
with the same thread count, median of --runs after one warm-up. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dtop_export.checkpoint import new_provenance, save_checkpoint
from dtop_export.engines import load_engine
from dtop_export.export import export_onnx
from dtop_export.model import build_model, get_preset
from dtop_export.preprocess import default_preprocess

SHAPES = [(224, 224), (384, 384), (384, 512), (512, 384), (640, 384), (768, 1024), (1024, 1024)]


def main() -> None:
    from dtop_export.host import usable_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--latency-sizes", type=int, nargs="+", default=[384, 512])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dtop-export-report-"))
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).eval()
    ckpt = save_checkpoint(
        work / "m.pt",
        model,
        default_preprocess(model.cfg.backbone, model.stride),
        provenance=new_provenance("export_report"),
    )
    res = export_onnx(ckpt, work / "m.onnx")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.stage_seconds.items())
    print(
        f"export {args.preset}: {res.seconds:.1f} s ({stages}),"
        f" {res.size_bytes / 2**20:.1f} MiB, {res.nodes} nodes, load {os.getloadavg()[0]:.2f}"
    )
    ref = load_engine(ckpt, threads=args.threads)
    ort = load_engine(res.path, threads=args.threads)
    rows = []
    print("\n| shape | batch | min cosine | max-abs |\n|---|---|---|---|")
    for b in args.batches:
        for h, w in SHAPES:
            x = np.random.default_rng(h * w + b).standard_normal((b, 3, h, w)).astype(np.float32)
            a, o = ref.embed(x), ort.embed(x)
            cos = float((a * o).sum(1).min())
            mab = float(np.abs(a - o).max())
            rows.append({"h": h, "w": w, "batch": b, "min_cosine": cos, "max_abs": mab})
            print(f"| {h}x{w} | {b} | {cos:.7f} | {mab:.2e} |")
    lat = []
    print("\n| size | PyTorch s | ORT s | speed-up |\n|---|---|---|---|")
    for s in args.latency_sizes:
        x = np.random.default_rng(s).standard_normal((1, 3, s, s)).astype(np.float32)
        ref.embed(x), ort.embed(x)
        t_ref, t_ort = [], []
        for _ in range(args.runs):
            for eng, acc in ((ref, t_ref), (ort, t_ort)):
                t0 = time.perf_counter()
                eng.embed(x)
                acc.append(time.perf_counter() - t0)
        m_ref, m_ort = statistics.median(t_ref), statistics.median(t_ort)
        lat.append({"size": s, "pytorch_s": m_ref, "ort_s": m_ort})
        print(f"| {s}² | {m_ref:.3f} | {m_ort:.3f} | {m_ref / m_ort:.2f}x |")
    print(f"\n{args.threads} threads, load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"export_s": res.seconds, "size_bytes": res.size_bytes, "parity": rows, "latency": lat}, indent=2
            )
        )


if __name__ == "__main__":
    main()
