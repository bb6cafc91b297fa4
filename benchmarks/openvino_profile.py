"""Where an OpenVINO model spends its time on this CPU: per-operation times from OpenVINO's own profiler
(``PERF_COUNT``), grouped by operation type and the precision the kernel ran in (``i8`` or ``f32``).

    python benchmarks/openvino_profile.py model.int8.xml --size 512 --threads 2 --runs 5

Prints the wall time of one inference (median of ``--runs`` after two warm-ups) and the table; ``--json`` keeps
it. Use it to see what an INT8 model still runs in float (the ceiling of quantising more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def precision_of(exec_type: str) -> str:
    """``brgemm_avx512_I8`` -> ``i8``; ``jit_avx512_FP32`` -> ``f32`` (OpenVINO's kernel names)."""
    low = exec_type.lower()
    if "i8" in low or "u8" in low:
        return "i8"
    if "f32" in low or "fp32" in low:
        return "f32"
    if "bf16" in low:
        return "bf16"
    return low.rsplit("_", 1)[-1] or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help=".xml or .onnx")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import openvino as ov

    from dtop_export.bench.harness import machine_info
    from dtop_export.engines.openvino import read_model

    compiled = ov.Core().compile_model(
        read_model(args.model),
        "CPU",
        {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32",
         "PERFORMANCE_HINT": "LATENCY"},
    )  # fmt: skip
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    for _ in range(2):
        request.infer({0: x})
    walls, groups = [], defaultdict(list)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        request.infer({0: x})
        walls.append(time.perf_counter() - t0)
        run: dict[tuple[str, str], float] = defaultdict(float)
        for p in request.profiling_info:
            run[(p.node_type, precision_of(p.exec_type))] += p.real_time.total_seconds()
        for k, v in run.items():
            groups[k].append(v)
    per_op = {k: statistics.median(v) for k, v in groups.items()}
    total = sum(per_op.values())
    by_precision: dict[str, float] = defaultdict(float)
    for (_, prec), v in per_op.items():
        by_precision[prec] += v
    m = machine_info()
    print(
        f"{args.model.name}, {args.size}², batch 1, {args.threads} threads, {m['cpu']} ({', '.join(m['cpu_features'])})"
    )
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_precision.items(), key=lambda kv: -kv[1]))
    wall = statistics.median(walls) * 1000
    print(f"wall {wall:.0f} ms (median of {args.runs}); layers sum {total * 1000:.0f} ms; {shares}")
    print("| operation | kernel precision | ms | share |\n|---|---|---:|---:|")
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    for (op, prec), v in rows[: args.top]:
        print(f"| {op} | {prec} | {v * 1000:.1f} | {100 * v / total:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(args.model), "size": args.size, "threads": args.threads, "machine": m,
            "wall_ms": statistics.median(walls) * 1000,
            "ops": [{"op": op, "precision": prec, "ms": v * 1000} for (op, prec), v in rows],
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
