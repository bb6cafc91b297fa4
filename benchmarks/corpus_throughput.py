"""Corpus embedding throughput: in-process vs Ray Data with 1 and 2 actors, end to end, and an R1M estimate.

Each mode runs ``embed_corpus`` (what ``dtop-export embed MODEL SOURCE -o DIR [--ray]`` runs) on the same JPEG
photos into a fresh shard folder; the Ray modes share one local cluster started once (its start-up is reported
separately, it is paid once per job). Per mode: wall seconds, images/s end to end, per-actor images/s while
embedding (inference time only), and the Parquet shard size per image. Modes are interleaved over ``--repeats``
and the medians reported; the scaling ratio is Ray 2 actors / Ray 1 actor with the same total threads.

    python benchmarks/corpus_throughput.py --preset r50-vitb16 --size 512 --images 24 --repeats 2 \\
        --json benchmarks/results/corpus_throughput.json

The R1M estimate divides 1,001,001 images by the measured per-actor rate (``--size`` px; the paper's 1024 px
costs more, see the note in the JSON) times the number of actors a node of C cores runs. Random-init weights
(speed does not depend on them). About 10 minutes on 2 cores with the full model (its export is ~1 min).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from cpp_client import write_photos  # noqa: E402 - the same 1024 px JPEG photos as the C++ benchmark

R1M = 1_001_001


def run_mode(model: Path, photos: Path, out: Path, size: int, mode: str) -> dict[str, Any]:
    from dtop_export.corpus.embed import CorpusJob, embed_corpus

    shutil.rmtree(out, ignore_errors=True)
    kw: dict[str, Any] = {"image_size": size, "shard_size": 8, "progress": False}
    if mode == "local (2 threads)":
        job = CorpusJob(str(model), str(photos), out, threads=2, **kw)
    elif mode == "ray 1 actor x 1 thread":
        job = CorpusJob(str(model), str(photos), out, use_ray=True, actors=1, **kw)
    elif mode == "ray 1 actor x 2 threads":
        job = CorpusJob(str(model), str(photos), out, use_ray=True, actors=1, threads=2, **kw)
    elif mode == "ray 2 actors x 1 thread":
        job = CorpusJob(str(model), str(photos), out, use_ray=True, actors=2, **kw)
    else:
        raise ValueError(mode)
    s = embed_corpus(job)
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.parquet"))
    return {
        "wall_s": s.wall_s,
        "images_per_s": s.images_per_s,
        "actors": [{"name": a.name, "images": a.images, "images_per_s": a.images_per_s} for a in s.actors],
        "shard_bytes_per_image": shard_bytes / max(s.embedded, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--modes", default="local (2 threads),ray 1 actor x 1 thread,ray 1 actor x 2 threads,ray 2 actors x 1 thread"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the model/photos here (reused).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from dtop_export.bench.harness import machine_info
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.export import export_onnx

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dtop-corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.preset}.onnx"
    if not model.exists():
        export_onnx(random_checkpoint(args.preset, work / f"{args.preset}.pt", seed=0, source="bench"), model)
    photos = work / "photos"
    if not photos.exists():
        write_photos(photos, args.images)
    t0 = time.perf_counter()
    ray.init(num_cpus=None, include_dashboard=False, logging_level="ERROR")
    ray_start = time.perf_counter() - t0
    modes = [m.strip() for m in args.modes.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        for rep in range(args.repeats):
            for m in modes:
                r = run_mode(model, photos, work / "out", args.size, m)
                runs[m].append(r)
                print(f"[{rep + 1}/{args.repeats}] {m}: {r['wall_s']:.1f} s, {r['images_per_s']:.3f} img/s", flush=True)
    finally:
        ray.shutdown()
    rows = {}
    for m, rs in runs.items():
        rows[m] = {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "per_actor_images_per_s": statistics.median(
                statistics.mean(a["images_per_s"] for a in r["actors"]) for r in rs
            ),
            "shard_bytes_per_image": rs[-1]["shard_bytes_per_image"],
            "runs": rs,
        }
    one, two = rows.get("ray 1 actor x 1 thread"), rows.get("ray 2 actors x 1 thread")
    scaling = two["images_per_s"] / one["images_per_s"] if one and two else None
    best = max(rows.items(), key=lambda kv: kv[1]["images_per_s"])
    estimate = {
        "basis": f"{best[0]} at {args.size} px: {best[1]['images_per_s']:.3f} images/s per 2-core node",
        "r1m_hours_per_2core_node": R1M / best[1]["images_per_s"] / 3600,
        "r1m_hours_on_N_nodes": {
            n: R1M / (best[1]["images_per_s"] * n) / 3600 for n in (1, 10, 100)
        },  # linear in nodes: Ray Data's actors do not talk to each other
    }
    report = {
        "machine": machine_info(),
        "preset": args.preset,
        "size": args.size,
        "images": args.images,
        "repeats": args.repeats,
        "ray_start_s": ray_start,
        "modes": rows,
        "scaling_2_over_1_actor": scaling,
        "estimate": estimate,
        "command": " ".join(sys.argv),
    }
    print(f"\n{args.preset}, {args.size} px, {args.images} JPEGs (1024 px), medians of {args.repeats}:")
    print(f"{'mode':<26} {'wall s':>8} {'img/s':>8} {'per actor':>10} {'shard B/img':>12}")
    for m, r in rows.items():
        print(
            f"{m:<26} {r['wall_s']:8.1f} {r['images_per_s']:8.3f} {r['per_actor_images_per_s']:10.3f} "
            f"{r['shard_bytes_per_image']:12.0f}"
        )
    if scaling:
        print(f"scaling ray 2 actors / 1 actor: {scaling:.2f}x; ray start {ray_start:.1f} s")
    print(f"R1M: {estimate['r1m_hours_per_2core_node']:.0f} h on one node like this ({estimate['basis']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
