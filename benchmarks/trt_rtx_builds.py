"""TensorRT-RTX plans built on this GPU-less CPU: build time and plan size per preset x precision x target.

For each preset: a random-init checkpoint (with a whitening) exported once, then ``dtop-export trt`` for every
precision with all targets at once (the network is parsed once, built per target). Build times include the
parse on the first target only. The parsed network's precision check (FP32 islands FP32, the rest FP16) is
part of every build. Nothing runs the plans: that needs a GPU of each architecture.

    python benchmarks/trt_rtx_builds.py --presets small,r50-vitb16 --targets sm86,sm89,sm120 \
        --json benchmarks/results/cpu-epyc/trt_rtx_builds.json

The default profile is the toolkit's (1x3x224² / 1x3x512² / 8x3x1024²).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,r50-vitb16")
    ap.add_argument("--targets", default="sm86,sm89,sm120")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--workdir", type=Path, default=Path("trt-rtx-builds"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workspace", type=float, default=4.0, help="builder workspace GiB (the CLI's default)")
    ap.add_argument("--retry-workspace", type=float, default=16.0, help="after an out-of-memory refusal")
    args = ap.parse_args()

    import tensorrt_rtx

    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.targets import parse_targets, plan_paths
    from dtop_export.errors import DToPError
    from dtop_export.export import export_onnx

    targets = parse_targets(args.targets)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        onnx_path = args.workdir / f"{preset}.onnx"
        if not onnx_path.exists():
            t0 = time.perf_counter()
            ckpt = random_checkpoint(preset, args.workdir / f"{preset}.pt", source="trt_rtx_builds.py")
            export_onnx(ckpt, onnx_path)
            print(f"{preset}: exported in {time.perf_counter() - t0:.0f} s", flush=True)
        for precision in args.precisions.split(","):
            plans = plan_paths(args.workdir / f"{preset}.{precision}.plan", targets)
            for p in plans:
                p.unlink(missing_ok=True)
            workspace, refused = args.workspace, None
            while True:
                t0 = time.perf_counter()
                try:
                    results = build_engines(
                        onnx_path,
                        plans,
                        targets=targets,
                        fp16=precision == "fp16",
                        workspace_gb=workspace,
                        fp16_onnx_path=args.workdir / f"{preset}.fp16.onnx",
                        on_build=lambda text, preset=preset: print(f"  {preset} {text}", flush=True),
                    )
                    break
                except DToPError as e:  # the builder's scratch for the largest shape over --workspace: say so, retry
                    if "OutOfMemory" not in str(e) or workspace >= args.retry_workspace:
                        raise
                    refused = f"--workspace {workspace:g}: {str(e).split(': ', 1)[-1][:160]}"
                    print(f"  {preset} {precision}: {refused}; again with --workspace {args.retry_workspace:g}")
                    workspace = args.retry_workspace
            wall = time.perf_counter() - t0
            for r in results:
                net = r.info.precision["network"]
                row = {
                    "preset": preset,
                    "precision": precision,
                    "target": r.info.gpu["target"],
                    "seconds": round(r.seconds, 2),
                    "parse_seconds": r.info.build["parse_seconds"],
                    "plan_mib": round(r.size_bytes / 2**20, 1),
                    "fp16_layers": net["fp16_layers"],
                    "fp32_layers": net["fp32_layers"],
                    "fp32_island_nodes": len(r.info.precision["fp32_nodes"]),
                    "violations": len(net["violations"]),
                    "workspace_gb": workspace,
                    "refused_first": refused,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"  {preset} {precision}: {len(results)} plans in {wall:.1f} s", flush=True)
    out = {
        "tensorrt_rtx": tensorrt_rtx.__version__,
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "profile": "1x3x224x224 / 1x3x512x512 / 8x3x1024x1024",
        "load_average": __import__("os").getloadavg(),
        "rows": rows,
        "command": "python benchmarks/trt_rtx_builds.py "
        f"--presets {args.presets} --targets {args.targets} --precisions {args.precisions} "
        f"--workspace {args.workspace:g}",
    }
    print("| preset | precision | target | build s | plan MiB | FP16 / FP32 layers | workspace GiB |")
    print("|---|---|---|---:|---:|---|---:|")
    for r in rows:
        layers = f"{r['fp16_layers']} / {r['fp32_layers']}"
        cells = f"{r['preset']} | {r['precision']} | {r['target']} | {r['seconds']:.1f} | {r['plan_mib']:.1f}"
        print(f"| {cells} | {layers} | {r['workspace_gb']:g} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
