"""FP16 preview per training seed, whitening learned with and without Ledoit-Wolf shrinkage.

For each seed: ``dtop-export demo --seed S`` (train on the embedded set, Lw whitening with the default
Ledoit-Wolf shrinkage, export, CPU-emulated FP16 audit, parity, evaluation), then the same trained
checkpoint whitened with cirtorch's exact Lw (``--shrinkage 0``), exported and audited the same way.
Reports per seed and variant: shrinkage α, condition number of P, FP16 cosine min, ΔmAP E/M/H, the FP32
mAP after whitening and whether the FP16 contract (cos >= 0.999, |ΔmAP| <= 0.2) holds.

    python benchmarks/fp16_whitening.py --seeds 0,1,2,3,4 --workdir fp16-seeds \
        --json benchmarks/results/fp16_whitening.json

About 8 minutes per seed on 2 CPU cores (training is 5 of them); finished seeds are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any


def audit_variant(
    trained: Path, train_root: Path, data_root: Path, out: Path, shrinkage: float | str
) -> dict[str, Any]:
    """Whiten ``trained`` with ``shrinkage``, export it, run the FP16 audit on the embedded set."""
    from dtop_export.export import export_onnx
    from dtop_export.fp16.audit import fp16_audit
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.training.whitening import whiten_checkpoint

    ds = resolve_dataset("sample", data_root)
    _, wh = whiten_checkpoint(
        trained, out, pairs=train_root, size=ds.image_size or 256, progress=False, shrinkage=shrinkage
    )
    onnx_path = out.with_suffix(".onnx")
    export_onnx(out, onnx_path)
    res = fp16_audit(onnx_path, ds)
    final = res.final
    return {
        "shrinkage": wh.info["shrinkage"],
        "condition_number": wh.info["condition_number"],
        "cosine_min": final.cosine_min,
        "map_delta": final.map_delta,
        "map_fp32": res.map_fp32,
        "passed": res.passed,
    }


def run_seed(seed: int, workdir: Path) -> dict[str, Any]:
    from dtop_export.pipeline.demo import DemoSettings, run_demo

    t0 = time.perf_counter()
    work = workdir / f"seed{seed}"
    cached = work / "fp16_whitening.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    demo = run_demo(DemoSettings(workdir=work / "demo", seed=seed, progress=False))
    root = work / "demo"
    trained, train_root, data_root = root / "train" / "final.pt", root / "data" / "train-sample", root / "data"
    row = {
        "seed": seed,
        "demo_passed": demo.passed,
        "variants": {
            "exact Lw (shrinkage 0)": audit_variant(trained, train_root, data_root, work / "lw-exact.pt", 0.0),
            "Ledoit-Wolf (default)": audit_variant(trained, train_root, data_root, work / "lw-auto.pt", "auto"),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    cached.write_text(json.dumps(row, indent=1) + "\n")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| seed | whitening | α | cond(P) | FP16 cos min | ΔmAP E | ΔmAP M | ΔmAP H | FP32 mAP E/M/H "
        "| FP16 contract |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [head]
    for r in rows:
        for name, v in r["variants"].items():
            d, m = v["map_delta"], v["map_fp32"]
            lines.append(
                f"| {r['seed']} | {name} | {v['shrinkage']:.3f} | {v['condition_number']:.0f} | {v['cosine_min']:.6f} "
                f"| {d.get('easy', 0):+.2f} | {d.get('medium', 0):+.2f} | {d.get('hard', 0):+.2f} "
                f"| {m.get('easy', 0):.2f} / {m.get('medium', 0):.2f} / {m.get('hard', 0):.2f} "
                f"| {'PASS' if v['passed'] else 'FAIL'} |"
            )
    return "\n".join(lines)


def seed_arguments(doc: str | None) -> argparse.Namespace:
    """``--seeds``, ``--workdir``, ``--json``: the command line of the per-seed FP16 benchmarks (this one and
    ``openvino_fp16.py``, which reads this one's work folder); sets up warning-level logging."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--workdir", type=Path, default=Path("fp16-seeds"))
    ap.add_argument("--json", type=Path, default=None, help="Write the rows (and the machine) here.")
    args = ap.parse_args()
    args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args


def main() -> None:
    args = seed_arguments(__doc__)
    from dtop_export.bench.harness import machine_info

    rows = []
    for s in args.seeds:
        rows.append(run_seed(s, args.workdir))
        print(table(rows[-1:]).splitlines()[-2], flush=True)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
