"""The CPU paths of a DToP model, side by side: PyTorch eager fp32, bf16 (eager and ``torch.compile``d),
ONNX Runtime fp32 (plain export and ``optimize``d) and INT8 (``quantize``), and OpenVINO on the same fp32 and
INT8 files (with a bf16 hint where the CPU has native bf16). Produces the tables in ``benchmarks/README.md``.

    python benchmarks/cpu_paths.py --preset r50-vitb16 --sizes 384,512 --batch 1,8 --runs 3 --out bench-out

``--no-compile`` leaves out ``torch.compile`` (a minute of compilation per shape; it pays only with AMX).
``--paths bf16`` re-measures one row in its own output folder (PyTorch eager fp32, the reference, always runs; the
others by name: bf16, bf16-compiled, onnx, optimized, int8, openvino; openvino runs the onnx and int8 files built).

1. Builds a benchmark checkpoint: the preset with random weights, then biases, norm parameters and BN
   statistics perturbed and a random whitening added. (Random init has zero biases and unit norms,
   which the export's clean-up folds away; a trained model has neither, and the graphs must match.)
2. Derives the artifacts with their build times (``dtop_export.bench.derive_specs``).
3. ``dtop_export.bench.run_bench``: interleaved timings, memory, GFLOP/s -> bench.md/json/png.
4. Accuracy on the embedded sample set (when ``dtop_export.retrieval.evaluate`` is available): per-image cosine
   against PyTorch fp32 and Easy/Medium/Hard mAP of every engine at ``--eval-size`` -> accuracy.md/json.
   The sample set has many image shapes, so compiled engines run there with dynamic shapes (one graph)
   instead of the benchmark's one static graph per shape; the benchmark's "cos min" column covers those.

A measurement, not a test: run it on a quiet machine (it prints the load average) and quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

PATHS = ("bf16", "bf16-compiled", "onnx", "optimized", "int8", "openvino")


def accuracy(specs: list, threads: int, size: int, out_dir: Path) -> dict:
    """Per-image cosine vs the first spec (PyTorch fp32) and mAP of every engine on the sample set."""
    from dtop_export.engines import load_engine
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.extract import extract_many
    from dtop_export.retrieval.metrics import evaluate_descriptors

    ds = resolve_dataset("sample")
    # compiled engines: one dynamic-shape graph for the set's many shapes, not one compile per shape
    opts = [{**s.options, "dynamic": None} if s.options.get("compile") else s.options for s in specs]
    engines = [load_engine(s.path, threads=threads, **o) for s, o in zip(specs, opts)]
    labels = [
        f"{e.name} {e.precision} · {s.path.name}" + (" [compiled]" if s.options.get("compile") else "")
        for e, s in zip(engines, specs)
    ]
    t0 = time.perf_counter()
    qs = extract_many(engines, ds.queries, bboxes=ds.bboxes, image_size=size, description="queries")
    dbs = extract_many(engines, ds.images, image_size=size, description="database")
    rows = []
    for label, q, db in zip(labels, qs, dbs):
        cos = np.concatenate([np.sum(q * qs[0], axis=1), np.sum(db * dbs[0], axis=1)])
        m = evaluate_descriptors(db, q, ds.gnd)["map"]
        rows.append({"engine": label, "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "map": m})
    ref = rows[0]["map"]
    for r in rows:
        r["map_delta"] = {k: r["map"][k] - ref[k] for k in ref}
    lines = [
        f"Sample set: {ds.n_queries} queries, {ds.n_images} database images, longer side {size}, single scale; "
        f"reference {labels[0]}; {time.perf_counter() - t0:.0f} s.",
        "",
        "| engine | cos min | cos mean | mAP E / M / H | ΔmAP E / M / H |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m, d = r["map"], r["map_delta"]
        lines.append(
            f"| {r['engine']} | {r['cos_min']:.5f} | {r['cos_mean']:.5f} | "
            f"{' / '.join(f'{m[k]:.2f}' for k in ('easy', 'medium', 'hard'))} | "
            f"{' / '.join(f'{d[k]:+.2f}' for k in ('easy', 'medium', 'hard'))} |"
        )
    text = "\n".join(lines) + "\n"
    (out_dir / "accuracy.md").write_text(text)
    (out_dir / "accuracy.json").write_text(json.dumps({"size": size, "rows": rows}, indent=2))
    print(text)
    return {"rows": rows}


def openvino_specs(specs: list) -> list:
    """OpenVINO on the plain fp32 export and on the INT8 file (+ a bf16 hint on the export where the CPU has native
    bf16, by the same rule as ``bench --recommend``)."""
    from dtop_export.bench.harness import cpu_features
    from dtop_export.bench.recommend import native_bf16
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.contract import read_metadata

    bf16 = native_bf16(cpu_features())
    out = []
    for s in specs:
        if s.path.suffix != ".onnx":
            continue
        meta = read_metadata(s.path)  # what the file is, not what it is called
        if meta.get("dtop.precision", "fp32") == "int8" or "dtop.optimized" not in meta:  # INT8, or the plain export
            out.append(EngineSpec(s.path, {"runtime": "openvino"}, None, s.build_seconds, s.derived_from))
            if bf16 and meta.get("dtop.precision", "fp32") == "fp32":
                out.append(EngineSpec(s.path, {"runtime": "openvino", "precision": "bf16"}, None, s.build_seconds))
    return out


def main() -> None:
    from dtop_export.host import usable_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--sizes", default="384,512")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--eval-size", type=int, default=384)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (pays only with AMX)")
    ap.add_argument("--paths", default=",".join(PATHS), help="the paths beside eager fp32 (default: all)")
    args = ap.parse_args()

    from dtop_export.bench.harness import run_bench
    from dtop_export.bench.spec import EngineSpec, parse_int_list
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.logs import quiet_ort_logs
    from dtop_export.pipeline.artefacts import derive_specs

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / f"{args.preset}.pt"
    with quiet_ort_logs():
        if not ckpt.exists():
            random_checkpoint(args.preset, ckpt, source=f"benchmarks/cpu_paths.py --preset {args.preset}")
        manifest = args.out / "artifacts.json"
        if manifest.exists():
            specs = [
                EngineSpec(Path(d["path"]), d["options"], None, d["build_seconds"], d["derived_from"])
                for d in json.loads(manifest.read_text())
            ]
        else:
            paths = [p.strip() for p in args.paths.split(",") if p.strip()]
            if unknown := sorted(set(paths) - set(PATHS)):
                raise SystemExit(f"unknown --paths {unknown}: choose from {', '.join(PATHS)}")
            if args.no_compile and "bf16-compiled" in paths:
                paths.remove("bf16-compiled")
            specs = [
                EngineSpec(ckpt),
                *derive_specs(ckpt, [p for p in paths if p != "openvino"], args.out, on_stage=print),
            ]
            if "openvino" in paths:  # on the plain export and the INT8 file, those of them --paths built
                specs += openvino_specs(specs)
            manifest.write_text(
                json.dumps(
                    [
                        {
                            "path": str(s.path),
                            "options": s.options,
                            "build_seconds": s.build_seconds,
                            "derived_from": s.derived_from,
                        }
                        for s in specs
                    ],
                    indent=2,
                )
            )
        if not args.skip_bench:
            print(f"load average before: {os.getloadavg()}")
            report = run_bench(
                specs,
                parse_int_list(args.sizes, "--sizes"),
                parse_int_list(args.batch, "--batch"),
                runs=args.runs,
                warmup=args.warmup,
                threads=args.threads,
                progress=lambda d, n: print(f"  {d}", flush=True) if n == 0 else None,
            )
            text = report.to_markdown()
            (args.out / "bench.md").write_text(text)
            report.write_json(args.out / "bench.json")
            report.write_plot(args.out / "bench.png")
            print(text)
        if not args.skip_accuracy:
            try:
                import dtop_export.retrieval.evaluate  # noqa: F401
            except ImportError:
                print("dtop_export.retrieval.evaluate not available: accuracy skipped")
                return
            accuracy(specs, args.threads, args.eval_size, args.out)


if __name__ == "__main__":
    main()
