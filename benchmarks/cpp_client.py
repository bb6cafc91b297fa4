"""C++ client (``dtop-embed``, OpenVINO) vs Python (``dtop-export embed``, ONNX Runtime), end to end.

Both commands run as a user runs them (a process each: start-up, model load, JPEG decode, EXIF, resize,
normalise, inference, writing .npy + .json) on the same ONNX file and the same photos, with the same thread
count, interleaved (C++, Python, C++, Python, ...) so that the shared machine's noise hits both. Reported per
preset x size: the median wall time for 1 image (start-up + one image) and for N images, images/s end to end
(N / wall) and in steady state ((N - 1) / (wall_N - wall_1)), the C++/Python ratio, and the descriptor
cosine between the two outputs. Also the build time and the binary size.

    python benchmarks/cpp_client.py --presets small,r50-vitb16 --sizes 384,512 --images 16 --repeats 3 \
        --threads 2 --json benchmarks/results/cpp_client.json

The photos: the scikit-image ones, upscaled to a 1024 px longer side and saved as JPEG q90 (a typical
deployment input; decoding is part of the measurement). Random-init weights (speed does not depend on them).
About 15 minutes on 2 cores with the full model (its export alone is ~1 min).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "camera", "cat")


def write_photos(folder: Path, n: int, aspects: list[tuple[int, int]] | None = None, workers: int = 1) -> list[Path]:
    """``n`` JPEGs (q90, longer side 1024, cycling through scikit-image's photos with different crops); with
    ``aspects`` (width:height pairs, cycled) each crop is cut to the next aspect instead, as a camera's are.
    ``workers`` > 1: written by that many processes (the same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        return [write_photo(folder, i, aspects) for i in range(n)]
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(partial(write_photo, folder, aspects=aspects), range(n), chunksize=16))


def write_photo(folder: Path, i: int, aspects: list[tuple[int, int]] | None = None) -> Path:
    """Photo number ``i`` of :func:`write_photos`."""
    import skimage
    from PIL import Image

    base = Path(skimage.data.__file__).parent
    sources = [p for name in PHOTOS for p in base.glob(f"{name}.*")]
    img = Image.open(sources[i % len(sources)]).convert("RGB")
    w, h = img.size
    crop = img.crop((i % 3 * w // 20, i % 2 * h // 20, w - i % 4 * w // 30, h))  # vary sizes/aspects
    if aspects:
        aw, ah = aspects[i % len(aspects)]
        cw, ch = crop.size
        cw, ch = (cw, round(cw * ah / aw)) if cw * ah <= ch * aw else (round(ch * aw / ah), ch)
        crop = crop.crop((0, 0, cw, ch))
    f = 1024 / max(crop.size)
    crop = crop.resize((round(crop.width * f), round(crop.height * f)), Image.Resampling.BICUBIC)
    path = folder / f"photo_{i:03d}.jpg"
    crop.save(path, quality=90)
    return path


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed: {r.stderr.strip()[-500:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,r50-vitb16")
    ap.add_argument("--sizes", default="384,512")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep models/photos/build here (reused).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from dtop_export.bench.harness import machine_info
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.cpp import build
    from dtop_export.export import export_onnx

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dtop-cpp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "build", ignore_errors=True)  # a cold build: its time is part of the report
    t0 = time.perf_counter()
    built = build(work / "build", jobs=args.threads)
    cold = time.perf_counter() - t0
    tool = built.embed_tool
    photos = write_photos(work / "photos", args.images)
    py_cli = [sys.executable, "-m", "dtop_export", "embed"]
    results: dict[str, Any] = {
        "machine": machine_info(),
        "threads": args.threads,
        "images": args.images,
        "repeats": args.repeats,
        "build": {
            **built.timings,
            "wall_s": round(cold, 2),
            "binary_bytes": tool.stat().st_size,
            "library_bytes": built.library.stat().st_size,
            "openvino": built.openvino_version,
        },  # fmt: skip
        "rows": [],
    }
    print(f"build: {results['build']}", flush=True)
    for preset in args.presets.split(","):
        onnx_path = work / f"{preset}.onnx"
        if not onnx_path.exists():
            ckpt = random_checkpoint(preset, work / f"{preset}.pt", seed=0, source="benchmarks/cpp_client.py")
            export_onnx(ckpt, onnx_path)
        for size in (int(s) for s in args.sizes.split(",")):
            common = ["--image-size", str(size), "--threads", str(args.threads), "--no-progress"]
            cmds = {
                "cpp": [str(tool), str(onnx_path), "--force"],
                "python": [*py_cli, str(onnx_path), "--force"],  # each round rewrites its .npy
            }
            walls: dict[str, dict[str, list[float]]] = {k: {"one": [], "all": []} for k in cmds}
            every = [str(p) for p in photos]
            for rep in range(args.repeats + 1):  # the first round warms the page cache and is dropped
                for kind, head in cmds.items():
                    one = timed([*head, *every[:1], "-o", str(work / f"{kind}1.npy"), *common])
                    full = timed([*head, *every, "-o", str(work / f"{kind}.npy"), *common])
                    if rep:
                        walls[kind]["one"].append(one)
                        walls[kind]["all"].append(full)
            cpp, py = np.load(work / "cpp.npy"), np.load(work / "python.npy")
            row: dict[str, Any] = {"preset": preset, "size": size, "cosine_min": float((cpp * py).sum(1).min())}
            for kind, w in walls.items():
                one, full = statistics.median(w["one"]), statistics.median(w["all"])
                row[kind] = {
                    "wall_1_s": round(one, 3),
                    "wall_n_s": round(full, 3),
                    "images_per_s": round(args.images / full, 3),
                    "steady_images_per_s": round((args.images - 1) / max(full - one, 1e-9), 3),
                    "runs_n_s": [round(v, 3) for v in w["all"]],
                }
            row["speedup_end_to_end"] = round(row["python"]["wall_n_s"] / row["cpp"]["wall_n_s"], 3)
            row["speedup_steady"] = round(row["cpp"]["steady_images_per_s"] / row["python"]["steady_images_per_s"], 3)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

    m = results["machine"]
    print(f"\n{m.get('cpu')} ({', '.join(m.get('cpu_features', []))}), {args.threads} threads, {args.images} photos")
    print(
        "| model | size | C++ img/s (steady) | Python img/s (steady) | C++ / Python | 1 image C++ / Python | cos min |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        c, p = r["cpp"], r["python"]
        print(
            f"| {r['preset']} | {r['size']} | {c['images_per_s']:.2f} ({c['steady_images_per_s']:.2f}) | "
            f"{p['images_per_s']:.2f} ({p['steady_images_per_s']:.2f}) | {r['speedup_end_to_end']:.2f}× "
            f"({r['speedup_steady']:.2f}×) | {c['wall_1_s']:.2f} s / {p['wall_1_s']:.2f} s | {r['cosine_min']:.7f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
