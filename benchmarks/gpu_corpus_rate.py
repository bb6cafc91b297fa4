"""Per-GPU embedding rate of the paper's model, for the R1M estimate of a GPU corpus job (run on a GPU machine).

Measures the PyTorch engine on CUDA (what a Ray actor with ``--gpus-per-actor 1`` and ``MODEL.pt:device=cuda``
runs) on random inputs: r50-vitb16, fp32 and fp16, 512² and 1024², batch 1 and 8; median of ``--runs`` after
3 warm-ups (``embed`` returns host arrays, so every run ends synchronised). Then, if pyarrow is importable,
the in-process corpus job end to end on ``--images`` JPEGs at 1024 px (decode + preprocess in one CPU process
feeding the GPU), and with ray importable the same job through the Ray pipeline: one actor holding the GPU,
and two actors sharing it (``--gpus-per-actor 0.5``), the JPEGs decoded by Ray tasks on the other CPUs.

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


CORPUS_MODES: dict[str, dict[str, Any]] = {
    "in-process": {},
    "ray 1 actor x 1 GPU": {"use_ray": True, "actors": 1, "gpus_per_actor": 1.0},
    "ray 2 actors x 0.5 GPU": {"use_ray": True, "actors": 2, "gpus_per_actor": 0.5},
}


def corpus_rates(
    ckpt: Path,
    n_images: int,
    batch: int,
    modes: list[str],
    precisions: list[str],
    aspects: str,
    repeats: int,
    work: Path,
) -> dict[str, Any]:
    """``embed_corpus`` end to end on ``n_images`` 1024 px JPEGs, per mode and precision. The Ray modes share
    one local cluster started here (its start-up reported once, as ``ray_start_s``, not in the rows)."""
    from cpp_client import write_photos

    from dtop_export.corpus.embed import CorpusJob, embed_corpus
    from dtop_export.corpus.runtime import model_contract
    from dtop_export.preprocess import image_size, model_size

    ratios = [tuple(int(v) for v in a.split(":")) for a in aspects.split(",")] if aspects != "varied" else None
    paths = write_photos(work / "photos", n_images, ratios)  # type: ignore[arg-type]
    photos = paths[0].parent
    cfg = model_contract(str(ckpt)).preprocess
    shapes = {model_size(*image_size(p), cfg, 1024) for p in paths}  # type: ignore[misc]
    out: dict[str, Any] = {"images": n_images, "batch_size": batch, "aspects": aspects, "input_shapes": len(shapes)}
    print(f"{n_images} photos ({aspects}): {len(shapes)} distinct model input shapes at 1024 px", flush=True)
    if any(CORPUS_MODES[m] for m in modes):
        try:
            import ray
        except ImportError:
            out["ray"] = "not importable: Ray modes not run"
            modes = [m for m in modes if not CORPUS_MODES[m]]
        else:
            t0 = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="ERROR")
            out["ray_start_s"] = time.perf_counter() - t0
            out["ray_resources"] = ray.cluster_resources()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(repeats):  # modes interleaved, so drift hits them alike
            for name in modes:
                for precision in precisions:
                    job = CorpusJob(
                        f"{ckpt}:device=cuda",
                        str(photos),
                        work / f"out-{rep}-{name}-{precision}",
                        image_size=1024,
                        precision=precision,
                        batch_size=batch,
                        progress=False,
                        **CORPUS_MODES[name],
                    )
                    s = embed_corpus(job)
                    busy = sum(a.busy_s for a in s.actors)
                    runs.setdefault(f"{name} {precision}", []).append(
                        {
                            "wall_s": s.wall_s,
                            "images_per_s": s.images_per_s,
                            "actors_busy_s": busy,
                            "first_result_s": s.first_result_s,
                            "steady_images_per_s": s.steady_images_per_s,
                            "actors": [a.__dict__ for a in s.actors],
                        }
                    )
                    steady, start = s.steady_images_per_s or 0.0, s.first_result_s or 0.0
                    print(
                        f"[{rep + 1}/{repeats}] corpus {name} {precision} 1024 px, batch {batch}: {s.wall_s:.1f} s, "
                        f"{s.images_per_s:.2f} img/s end to end ({steady:.2f} after a start-up of {start:.1f} s), "
                        f"actors busy {busy:.1f} s",
                        flush=True,
                    )
        for key, rs in runs.items():
            out[key] = {
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "images_per_s": statistics.median(r["images_per_s"] for r in rs),
                "runs": rs,
            }
    finally:
        if "ray_start_s" in out:
            import ray

            ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="Corpus jobs' batch size.")
    ap.add_argument("--modes", default=",".join(CORPUS_MODES), help=f"Corpus modes, of: {', '.join(CORPUS_MODES)}.")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--repeats", type=int, default=1, help="Corpus runs per mode, interleaved; medians reported.")
    ap.add_argument("--aspects", default="varied", help="'varied' crops, or width:height pairs cycled: 4:3,3:4,3:2")
    ap.add_argument("--skip-model", action="store_true", help="Only the corpus jobs.")
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
    sizes, batches = [int(s) for s in args.sizes.split(",")], [int(b) for b in args.batches.split(",")]
    report["model"] = [] if args.skip_model else model_rates(ckpt, sizes, batches, args.runs)
    best = {}
    for r in report["model"]:
        key = f"{r['precision']} {r['size']}"
        best[key] = max(best.get(key, 0.0), r["images_per_s"])
    report["r1m_hours_per_gpu_model_only"] = {k: R1M / v / 3600 for k, v in best.items()}
    try:
        import pyarrow  # noqa: F401

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        report["corpus"] = corpus_rates(
            ckpt, args.images, args.batch_size, modes, precisions, args.aspects, args.repeats, work
        )
    except ImportError:
        report["corpus"] = "pyarrow not importable: corpus job not run"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
