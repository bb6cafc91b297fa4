"""Per-GPU embedding rate of the paper's model, for the R1M estimate of a GPU corpus job (run on a GPU machine).

Measures the PyTorch engine on CUDA (what a Ray actor with ``--gpus-per-actor 1`` and ``MODEL.pt:device=cuda``
runs) on random inputs: r50-vitb16, fp32 and fp16, 512² and 1024², batch 1 and 8; median of ``--runs`` after
3 warm-ups (``embed`` returns host arrays, so every run ends synchronised). Then, if pyarrow is importable,
the in-process corpus job end to end on ``--images`` JPEGs at 1024 px (decode + preprocess in one CPU process
feeding the GPU), and with ray importable the same job through the Ray pipeline with one GPU actor.

    python benchmarks/gpu_corpus_rate.py --json OUT/gpu_corpus_rate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
R1M = 1_001_001


def model_rates(ckpt: Path, sizes: list[int], batches: list[int], runs: int) -> list[dict[str, Any]]:
    from dtop_export.engines.pytorch import TorchEngine

    out = []
    for precision in ("fp32", "fp16"):
        engine = TorchEngine.from_checkpoint(ckpt, device="cuda", precision=precision)
        for size in sizes:
            for b in batches:
                x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
                for _ in range(3):
                    engine.embed(x)
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    engine.embed(x)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                row = {"precision": precision, "size": size, "batch": b, "median_s": med, "images_per_s": b / med}
                print(f"{precision} {size}² batch {b}: {med * 1000:.1f} ms, {b / med:.1f} img/s", flush=True)
                out.append(row)
        engine.close()
    return out


def corpus_rates(ckpt: Path, n_images: int, work: Path) -> dict[str, Any]:
    from cpp_client import write_photos

    from dtop_export.corpus.embed import CorpusJob, embed_corpus

    photos = write_photos(work / "photos", n_images)[0].parent
    out: dict[str, Any] = {}
    modes = {"in-process": {}}
    try:
        import ray  # noqa: F401

        modes["ray 1 GPU actor"] = {"use_ray": True, "actors": 1, "gpus_per_actor": 1.0}
    except ImportError:
        out["ray"] = "not importable: Ray mode not run"
    for name, kw in modes.items():
        for precision in ("fp32", "fp16"):
            job = CorpusJob(f"{ckpt}:device=cuda", str(photos), work / f"out-{name}-{precision}", image_size=1024,
                            precision=precision, batch_size=4, progress=False, **kw)  # fmt: skip
            s = embed_corpus(job)
            out[f"{name} {precision}"] = {"wall_s": s.wall_s, "images_per_s": s.images_per_s,
                                          "actors": [a.__dict__ for a in s.actors]}  # fmt: skip
            print(f"corpus {name} {precision} 1024 px: {s.images_per_s:.2f} img/s end to end", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from dtop_export.checkpoint import random_checkpoint

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run this on a GPU machine")
    work = Path(tempfile.mkdtemp(prefix="dtop-gpu-rate-"))
    ckpt = random_checkpoint("r50-vitb16", work / "r50.pt", seed=0, source="bench")
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
    }
    report["model"] = model_rates(
        ckpt, [int(s) for s in args.sizes.split(",")], [int(b) for b in args.batches.split(",")], args.runs
    )
    best = {}
    for r in report["model"]:
        key = f"{r['precision']} {r['size']}"
        best[key] = max(best.get(key, 0.0), r["images_per_s"])
    report["r1m_hours_per_gpu_model_only"] = {k: R1M / v / 3600 for k, v in best.items()}
    try:
        import pyarrow  # noqa: F401

        report["corpus"] = corpus_rates(ckpt, args.images, work)
    except ImportError:
        report["corpus"] = "pyarrow not importable: corpus job not run"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
