"""Real FP16 on a CPU: OpenVINO's f16 hint against PyTorch fp32, per training seed, with and without FP32 islands.

On a CPU with native FP16 (AVX512-FP16 or AMX-FP16, e.g. a Sapphire Rapids Xeon) OpenVINO runs an f16 hint in
FP16 arithmetic: the closest a CPU gets to the arithmetic of a TensorRT FP16 engine. Takes the work folder of
``fp16_whitening.py`` (per seed: the exact-Lw and Ledoit-Wolf checkpoints and their ONNX) and runs the parity
contract (``dtop_export.parity``, the embedded set) for each checkpoint with

* ``islands``: ``FILE.onnx:openvino,fp16`` as shipped (the FP32 islands of the FP16 ONNX marked: whitening,
  L2 norms, LayerNorm, Softmax run f32);
* ``no islands``: the same with the marking switched off (what OpenVINO does by itself: everything in f16);
* ``bf16``: ``FILE.onnx:openvino,bf16`` (OpenVINO 2026.4 ignores the marks under bf16: the whitening runs bf16).

    python benchmarks/openvino_fp16.py --workdir fp16-seeds --seeds 0,1,2,3,4 \
        --json benchmarks/results/cpu-amx/openvino_fp16.json

About 3 minutes per seed on 2 cores. Needs the seeds' folders (run ``fp16_whitening.py`` first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VARIANTS = {"exact Lw (shrinkage 0)": "lw-exact", "Ledoit-Wolf (default)": "lw-auto"}
MODES = ("islands", "no islands", "bf16")


def engine(onnx_path: Path, mode: str) -> Any:
    import dtop_export.engines.openvino as ov_engine

    if mode == "bf16":
        return ov_engine.OpenVinoEngine(onnx_path, precision="bf16")
    if mode == "islands":
        return ov_engine.OpenVinoEngine(onnx_path, precision="fp16")
    keep = ov_engine.with_fp32_islands
    ov_engine.with_fp32_islands = lambda model, _path: (model, 0)  # OpenVINO's own f16: nothing kept FP32
    try:
        return ov_engine.OpenVinoEngine(onnx_path, precision="fp16")
    finally:
        ov_engine.with_fp32_islands = keep


def run_seed(seed: int, workdir: Path) -> dict[str, Any]:
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.parity import parity
    from dtop_export.retrieval.datasets import resolve_dataset

    work = workdir / f"seed{seed}"
    ds = resolve_dataset("sample", work / "demo" / "data")
    out: dict[str, Any] = {"seed": seed, "variants": {}}
    for name, stem in VARIANTS.items():
        ckpt, onnx_path = work / f"{stem}.pt", work / f"{stem}.onnx"
        if not onnx_path.is_file():
            raise SystemExit(f"{onnx_path} missing: run benchmarks/fp16_whitening.py --workdir {workdir} first")
        engines = [engine(onnx_path, m) for m in MODES]
        report = parity(TorchEngine.from_checkpoint(ckpt), engines, ds, progress=False)
        out["variants"][name] = {
            mode: {
                "cosine_min": e.cosine_min,
                "cosine_mean": e.cosine_mean,
                "map_delta": e.map_delta,
                "passed": e.passed,
                "fp32_islands": eng.fp32_islands,
            }
            for mode, e, eng in zip(MODES, report.engines, engines)
        }
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | whitening | OpenVINO | FP32 islands | cos min | cos mean | ΔmAP E / M / H | contract |",
        "|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        for name, modes in r["variants"].items():
            for mode, v in modes.items():
                d = v["map_delta"]
                lines.append(
                    f"| {r['seed']} | {name} | {'bf16' if mode == 'bf16' else 'fp16, ' + mode} | {v['fp32_islands']} "
                    f"| {v['cosine_min']:.6f} | {v['cosine_mean']:.6f} "
                    f"| {d.get('easy', 0):+.2f} / {d.get('medium', 0):+.2f} / {d.get('hard', 0):+.2f} "
                    f"| {'PASS' if v['passed'] else 'FAIL'} |"
                )
    return "\n".join(lines)


def main() -> None:
    from fp16_whitening import seed_arguments  # the sibling script (benchmarks/ is on sys.path when run)

    args = seed_arguments(__doc__)
    import openvino as ov

    from dtop_export.bench.harness import machine_info

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "FP16" not in caps:
        raise SystemExit(f"this CPU has no native FP16 ({', '.join(caps)}): OpenVINO would run f16 in f32")
    rows = []
    for s in args.seeds:
        rows.append(run_seed(s, args.workdir))
        print("\n".join(table(rows[-1:]).splitlines()[2:]), flush=True)
    print(table(rows))
    if args.json:
        payload = {"machine": machine_info(), "openvino": ov.get_version(), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
