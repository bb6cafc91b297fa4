"""Feeding the GPU (issue 31): everything one lent GPU session measures, in one run, within a deadline.

    bash benchmarks/gpu_feed.sh OUT                    # on the GPU machine: install, unpack Ray, run this
    python benchmarks/gpu_feed.py --out OUT [--budget-s 470] [--phases model,corpus]
    python benchmarks/gpu_feed.py --cpu-dry-run --out /tmp/dry      # every phase on the CPU, tiny: a script check

Phases, in this order (what a session short of time needs most first; each writes OUT/<phase>.json when it ends;
a phase, or a cell, that would not finish before the deadline is skipped and listed as such, so a run cut short
still leaves its results; a phase that fails writes OUT/<phase>-error.json and the next phases run):

env       GPU, driver, torch/CUDA/torchvision/Ray versions, CPU cores.
peaks     the matmul ceiling per precision (square GEMMs, ``dtop_export.bench.peak``), the "% of peak" denominators.
profile   ``torch.profiler`` of the fp16 forward at 512² b64: CUDA time by kernel family (GEMM, attention, conv,
          norm, elementwise) and the top kernels: where the model's time goes.
graphs    whether the eager forward waits on the host (``eager_graphs.py``): fp16 512² b1/8/32/64, the time to issue
          a forward from Python against its total, and the same forward replayed from a CUDA graph.
compiled  ``torch.compile`` cells (fp16/bf16 at 512 then 1024, batch 64; ``--compile-mode``, default
          ``default,max-autotune``: Inductor's fusions, then its autotuned GEMMs + CUDA graphs), compile time and
          img/s, while the deadline allows and leaves ``--later-s`` to the phases after it (the model
          phase fills what is left: its eager figures were measured before, Inductor's never).
parity    fp16 and bf16 autocast (and ``half()``) against fp32 on the embedded set: the parity contracts.
photos    ``--photos`` JPEGs of 1024 px with camera aspect ratios (4:3, 3:4, 3:2, 2:3, 16:9), written here.
corpus    ``embed_corpus`` end to end at 512 and 1024 px, fp16, batch ``--batch``: in-process with a thread pool,
          a process pool (the default on a GPU), ``--gpu-decode``; Ray with one GPU actor; and the code before issue
          31 (``.before/``, carried: see gpu_feed.sh) on fewer photos. Start-up, feed statistics.
decode    nvJPEG decode + device resize (``--gpu-decode``): its parity contract (cos >= 0.9999 per image vs the
          CPU decoder) at 512 and 1024 px, and decode throughput on the device vs the CPU pool.
model     the model alone, r50-vitb16 random init, eager: first the old ways at 512² b8 (``half()`` and autocast on
          float32 input) for the before/after, then fp16/bf16 autocast x 384/512/1024 x batch 8/32/64 on
          device-resident uint8 batches (``embed_pixels_stream``, pipelined; at the largest batch also from host
          uint8, pinned copies included), batch 1, cuDNN's heuristics instead of its autotuner, and fp32 at 512:
          img/s, GFLOP/s and % of the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
# in order of what a session short of time needs most: where the time goes, what Inductor makes of it (the lever for
# the model's target, never measured), the contracts, the end-to-end job; the eager sweep, last, fills the rest (it
# runs while more than --reserve-s is left: a phase after it would never run)
PHASES = ("env", "peaks", "profile", "graphs", "compiled", "parity", "photos", "corpus", "decode", "model")
# the phases that --later-s keeps time for (parity ~100 s, the corpus jobs' first figures: last session's timings)
LATER = ("parity", "corpus", "decode")


ASPECTS = [(4, 3), (3, 4), (3, 2), (2, 3), (16, 9)]


def default_later_s(phases: list[str], budget_s: float, dry: bool) -> float:
    """The seconds ``compiled`` leaves to the phases after it by default: 200, at most half the budget (a short
    run, e.g. gpu_feed.sh's ``--phases corpus,compiled --budget-s 200``, compiled nothing), none in a dry run or when
    none of :data:`LATER` is asked for (``--phases compiled``: the compile cells may take every second)."""
    return 0.0 if dry or not set(LATER) & set(phases) else min(200.0, budget_s / 2)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def save(out: Path, name: str, data: Any) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {out / name}.json", flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(engine: Any, batches: list[Any], seconds: float, device: str) -> tuple[float, int]:
    """img/s of ``engine.embed_pixels_stream`` over ``batches`` repeated for about ``seconds`` (after one pass)."""
    n = sum(len(b) for b in batches)
    for _ in engine.embed_pixels_stream(batches):
        pass
    sync(device)
    t0 = time.perf_counter()
    images = 0
    while True:
        for _ in engine.embed_pixels_stream(batches):
            pass
        images += n
        if time.perf_counter() - t0 >= seconds:
            break
    sync(device)
    return images / (time.perf_counter() - t0), images


def in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread: its result, or its exception raised here. cuDNN's plan cache is per thread
    (PyTorch's Conv_v8.cpp: ``thread_local BenchmarkCache``) and is looked up whatever ``cudnn.benchmark`` says, so
    heuristics timed on a thread that autotuned the same shapes before (this one: the profile phase and the cell
    before, fp16 512² b64) would time the autotuned plans."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="fresh-cudnn-cache")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def model_phase(args: Any, ckpt: Path, dl: Deadline, peaks: dict[str, float]) -> dict[str, Any]:
    import torch

    from dtop_export.bench.harness import model_gflops
    from dtop_export.engines.pytorch import TorchEngine

    dev = args.device
    gflops = model_gflops(ckpt, sorted({c[1] for c in args.model_cells}), device=dev)
    rows, skipped, legacy = [], [], []
    rng = np.random.default_rng(0)
    size, b = args.legacy_shape  # the before/after first: the old ways, float32 input
    for label, kw in (("fp16 half() + float32 embed (before)", {"precision": "fp16", "cast": "half"}),
                      ("fp16 autocast + float32 embed", {"precision": "fp16"})):  # fmt: skip
        if dl.left() < args.reserve_s or (not dev.startswith("cuda") and kw.get("cast") == "half"):
            continue
        engine = TorchEngine.from_checkpoint(ckpt, device=dev, **kw)
        x = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        for _ in range(3):
            engine.embed(x)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            engine.embed(x)
            times.append(time.perf_counter() - t0)
        legacy.append({"what": label, "size": size, "batch": b, "images_per_s": b / statistics.median(times)})
        print(f"model {label} {size}² b{b}: {legacy[-1]['images_per_s']:.1f} img/s", flush=True)
        del engine
    engines: dict[str, Any] = {}
    for precision, size, b, host_too, cudnn_benchmark in args.model_cells:
        if dl.left() < args.reserve_s:
            skipped.append(f"{precision} {size} b{b}")
            continue
        if precision not in engines:
            engines[precision] = TorchEngine.from_checkpoint(ckpt, device=dev, precision=precision)
        engine, peak = engines[precision], peaks.get(f"{dev} {precision}")
        host = [rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for _ in range(2)]
        on_dev = [torch.from_numpy(h).to(dev) for h in host] if dev.startswith("cuda") else host
        torch.backends.cudnn.benchmark = cudnn_benchmark  # the engine turns it on; False: cuDNN's heuristics

        def measure(engine: Any = engine, on_dev: list[Any] = on_dev, host: list[Any] = host,
                    host_too: bool = host_too) -> tuple[float, int, float | None]:  # fmt: skip
            device_rate, n = rate(engine, on_dev, args.cell_seconds, dev)
            host_rate = rate(engine, host, args.cell_seconds, dev)[0] if host_too and dev.startswith("cuda") else None
            return device_rate, n, host_rate

        try:
            t0 = time.perf_counter()
            device_rate, n, host_rate = measure() if cudnn_benchmark else in_fresh_thread(measure)
        except torch.cuda.OutOfMemoryError as e:  # a size x batch this GPU cannot hold: say so, go on
            skipped.append(f"{precision} {size} b{b}: out of memory ({str(e).splitlines()[0]})")
            torch.cuda.empty_cache()
            continue
        finally:
            torch.backends.cudnn.benchmark = True
        g = gflops[size] * device_rate
        row = {"precision": precision, "size": size, "batch": b, "cudnn_benchmark": cudnn_benchmark,
               "images_per_s": device_rate, "host_uint8_images_per_s": host_rate, "images_timed": n,
               "gflops_per_s": g, "peak_pct": 100 * g / peak if peak else None,
               "cell_s": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        save(args.out, "model", {"gflops_per_image": gflops, "rows": rows, "legacy": legacy, "skipped": skipped,
                                 "cell_seconds": args.cell_seconds, "partial": True})  # fmt: skip
        pct = f"{row['peak_pct']:.1f}% of peak" if peak else "no peak"
        host_text = f", {host_rate:.1f} from host uint8" if host_rate else ""
        how = "" if cudnn_benchmark else " cudnn heuristics"
        print(f"model {precision} {size}² b{b}{how}: {device_rate:.1f} img/s on device{host_text}, "
              f"{g / 1e3:.1f} TFLOP/s, {pct} ({row['cell_s']:.0f} s)", flush=True)  # fmt: skip
    for engine in engines.values():
        engine.close()
    return {"gflops_per_image": gflops, "rows": rows, "legacy": legacy, "skipped": skipped,
            "cell_seconds": args.cell_seconds}  # fmt: skip


def parity_phase(args: Any, ckpt: Path) -> dict[str, Any]:
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.parity import parity
    from dtop_export.retrieval.datasets import resolve_dataset

    ds = resolve_dataset("sample", args.work / "data")
    trained = Path(args.trained)
    done: dict[str, Any] = {}
    if trained.is_file():  # first (seconds): a trained, whitened checkpoint, where the contracts mean something
        ref = TorchEngine.from_checkpoint(trained, device=args.device)
        engines = [TorchEngine.from_checkpoint(trained, device=args.device, precision=p) for p in ("fp16", "bf16")]
        report = parity(ref, engines, ds, progress=False)
        print(f"trained checkpoint {trained}:\n{report.table()}", flush=True)
        done["trained"] = {"checkpoint": str(trained), **report.to_dict()}
        save(args.out, "parity", done)  # kept if the random model's comparison outlives the session's command
    else:
        done["trained"] = f"not run: no {trained} (carry it: see gpu_carry.sh)"
    ref = TorchEngine.from_checkpoint(ckpt, device=args.device)
    engines = [TorchEngine.from_checkpoint(ckpt, device=args.device, precision=p) for p in ("fp16", "bf16")]
    if args.device.startswith("cuda"):
        half = TorchEngine.from_checkpoint(ckpt, device=args.device, precision="fp16", cast="half")
        half.name = "pytorch-half"
        engines.append(half)
    report = parity(ref, engines, ds, batch_size=8, progress=False, image_size=args.parity_size)
    print(report.table(), flush=True)
    return {**report.to_dict(), **done}


def photos_phase(args: Any) -> list[Path]:
    from cpp_client import write_photos

    folder = args.work / f"photos-{args.photos}"
    if not (folder.is_dir() and len(list(folder.glob("*.jpg"))) == args.photos):
        write_photos(folder, args.photos, ASPECTS, workers=os.cpu_count() or 1)
    return sorted(folder.glob("*.jpg"))


def decode_phase(args: Any, ckpt: Path, photos: list[Path], dl: Deadline) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from dtop_export.corpus.feed import decode_item
    from dtop_export.corpus.gpu_decode import DeviceJpegDecoder, decoder_parity, inspect_jpeg
    from dtop_export.corpus.pool import default_workers
    from dtop_export.engines.pytorch import TorchEngine

    engine = TorchEngine.from_checkpoint(ckpt, device=args.device, precision="fp16" if args.device != "cpu" else "fp32")
    out: dict[str, Any] = {"workers": default_workers()}
    sample = [str(p) for p in photos[: args.parity_photos]]
    for size in args.corpus_sizes:
        if dl.left() < args.reserve_s:
            out[f"parity_{size}"] = "skipped: deadline"
            continue
        r = decoder_parity(engine, sample, size, device=args.device)
        out[f"parity_{size}"] = {k: v for k, v in r.items() if k != "per_image"}
        print(f"decode parity {size} px: cos min {r['cosine_min']:.6f}, passed {r['passed']}", flush=True)
        dec = DeviceJpegDecoder(engine.preprocess, size, (1.0,), args.device)
        paths = [str(p) for p in photos]
        with ThreadPoolExecutor(default_workers()) as pool:
            t0 = time.perf_counter()
            encoded = list(pool.map(inspect_jpeg, paths))
            inspect_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(0, len(encoded), 64):
                dec.decode([e for e in encoded[i : i + 64] if e is not None])
            sync(args.device)
            device_s = time.perf_counter() - t0
            fn = partial(
                decode_item, preprocess=engine.preprocess.to_dict(), image_size=size, scales=(1.0,), decode=None
            )
            t0 = time.perf_counter()
            list(pool.map(fn, paths, chunksize=8))
            cpu_s = time.perf_counter() - t0
        out[f"throughput_{size}"] = {"images": len(paths), "header_inspect_images_per_s": len(paths) / inspect_s,
                                     "device_decode_resize_images_per_s": len(paths) / device_s,
                                     "cpu_pool_decode_resize_images_per_s": len(paths) / cpu_s}  # fmt: skip
        n = len(paths)
        print(f"decode {size} px: device {n / device_s:.0f} img/s (headers on the CPU {n / inspect_s:.0f} img/s), "
              f"CPU pool {n / cpu_s:.0f} img/s", flush=True)  # fmt: skip
    return out


def corpus_jobs(args: Any, ckpt: Path) -> list[tuple[str, int, dict[str, Any]]]:
    dev, cpu = args.device, not args.device.startswith("cuda")
    model = f"{ckpt}:device={dev}"
    jobs = []
    for size in args.corpus_sizes:
        base = {"model": model, "image_size": size, "batch_size": args.batch, "precision": args.corpus_precision,
                "progress": False, "shard_size": 1000}  # fmt: skip
        jobs += [
            (f"in-process threads {size}", size, {**base, "decode_pool": "thread"}),
            (f"in-process processes {size}", size, {**base, "decode_pool": "process"}),
            (f"in-process gpu-decode {size}", size, {**base, "gpu_decode": True}),
            (f"ray 1 actor x 1 GPU {size}", size, {**base, "use_ray": True, "gpus_per_actor": 0 if cpu else 1}),
            (f"before (e02e813) in-process {size}", size, {**base, "before": True}),
        ]  # fmt: skip
    return jobs


def corpus_phase(args: Any, ckpt: Path, photos: list[Path], dl: Deadline) -> dict[str, Any]:
    import shutil

    from dtop_export.corpus.embed import CorpusJob, embed_corpus
    from dtop_export.errors import DToPError

    src = args.work / "photos.txt"
    src.write_text("\n".join(str(p) for p in photos) + "\n")
    few = args.work / "photos-before.txt"
    few.write_text("\n".join(str(p) for p in photos[: args.before_photos]) + "\n")
    out: dict[str, Any] = {"photos": len(photos), "aspects": [f"{w}:{h}" for w, h in ASPECTS], "jobs": {}}
    ray_ok = True
    try:
        import ray  # noqa: F401

        from dtop_export.corpus.cluster import connect

        t0 = time.perf_counter()
        connect(None, num_cpus=os.cpu_count(), logging_level="ERROR")
        out["ray_start_s"] = time.perf_counter() - t0
    except ImportError:
        ray_ok = False
        out["ray"] = "not importable: Ray jobs skipped (carry .raypkg, see gpu_feed.sh)"
    for name, _, kw in corpus_jobs(args, ckpt):
        if dl.left() < args.reserve_s:
            out["jobs"][name] = "skipped: deadline"
            continue
        dest = args.work / "out" / name.replace(" ", "_")
        shutil.rmtree(dest, ignore_errors=True)
        if kw.pop("before", False):
            before = Path(args.before).resolve() if args.before else None
            if before is None or not (before / "dtop_export").is_dir():
                out["jobs"][name] = f"skipped: no old code at {args.before} (gpu_feed.sh carries .before/)"
                continue
            from cpu_feed import run_job

            kw = {k: v for k, v in kw.items() if k not in ("decode_pool", "gpu_decode")}
            kw.update(source=str(few), output=str(dest))
            try:
                summary = run_job(before, kw, timeout=max(30, dl.left()))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                out["jobs"][name] = f"failed: {str(e)[-800:]}"
                continue
        else:
            if kw.get("use_ray") and not ray_ok:
                out["jobs"][name] = "skipped: Ray not importable"
                continue
            try:
                summary = embed_corpus(CorpusJob(source=str(src), output=dest, **kw)).to_dict()
            except DToPError as e:  # e.g. --gpu-decode refused on a CPU dry run
                out["jobs"][name] = f"refused: {e}"
                print(f"corpus {name}: refused: {e}", flush=True)
                continue
        keep = ("images", "processed", "wall_s", "images_per_s", "steady_images_per_s", "first_result_s", "startup",
                "feed", "actors", "code")  # fmt: skip
        out["jobs"][name] = {k: summary.get(k) for k in keep}
        steady, first = summary.get("steady_images_per_s") or 0, summary.get("first_result_s") or 0
        print(f"corpus {name}: {summary['processed']} images, {summary['images_per_s']:.1f} img/s end to end, "
              f"{steady:.1f} after a start-up of {first:.1f} s; feed {summary.get('feed')}", flush=True)  # fmt: skip
        save(args.out, "corpus", out)
    return out


# a kernel's family by its name, the first that matches: attention and convolution before GEMMs, whose patterns their
# names hold (flash attention's cutlass::half_t template arguments, cuDNN's sm90_xmma_fprop_implicit_gemm_*); cuBLAS's
# Hopper GEMMs are nvjet_* kernels; "bilinear" is a resize
KERNEL_FAMILIES = {
    "attention": r"flash|attention|sdpa|fmha",
    "conv": r"conv(?!ert)|cudnn|implicit|fprop|dgrad|wgrad",
    "gemm": r"gemm|matmul|addmm|(?<!bi)linear|\bmm\b|mm_|cutlass|sm90|nvjet|wgmma",
    "norm": r"norm|moments",
    "copy/cast": r"copy|memcpy|memset|cast|to_|contiguous",
}


def kernel_family(name: str) -> str:
    """The family of a profiled kernel (or, on the CPU, op) ``name``: a key of :data:`KERNEL_FAMILIES`, else
    ``elementwise/other``."""
    import re

    return next((f for f, rx in KERNEL_FAMILIES.items() if re.search(rx, name, re.I)), "elementwise/other")


def profile_phase(args: Any, ckpt: Path) -> dict[str, Any]:

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dtop_export.engines.pytorch import TorchEngine

    dev = args.device
    size, b = args.profile_shape
    engine = TorchEngine.from_checkpoint(ckpt, device=dev, precision="fp16" if dev != "cpu" else "bf16")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8)).to(dev)
    for _ in engine.embed_pixels_stream([x, x]):
        pass
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in engine.embed_pixels_stream([x] * 5):
            pass
        sync(dev)
    attr = "device_time_total" if dev.startswith("cuda") else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    share: dict[str, float] = {}
    kernels = [e for e in events if not e.key.startswith("aten::")] if dev.startswith("cuda") else events
    total = sum(getattr(e, attr) for e in kernels) or 1.0
    for e in kernels:
        fam = kernel_family(e.key)
        share[fam] = share.get(fam, 0.0) + getattr(e, attr) / total
    top = sorted(kernels, key=lambda e: -getattr(e, attr))[:20]
    print("profile by family:", {k: f"{v:.1%}" for k, v in sorted(share.items(), key=lambda kv: -kv[1])}, flush=True)
    return {"shape": [size, b], "time_attr": attr, "family_share": share,
            "top": [{"name": e.key[:120], "us": getattr(e, attr), "calls": e.count} for e in top]}  # fmt: skip


def compiled_phase(args: Any, ckpt: Path, dl: Deadline, peaks: dict[str, float]) -> dict[str, Any]:
    import torch

    from dtop_export.bench.harness import model_gflops
    from dtop_export.engines.pytorch import TorchEngine

    dev = args.device
    # size-major, then the cheapest mode first: a run cut short by the deadline still has a compiled figure per
    # precision at the first size; max-autotune (GEMM autotuning) starts only with twice the reserve left
    modes = [m.strip() for m in args.compile_mode.split(",") if m.strip()]
    cells = [(m, p, s, b) for s in args.compile_sizes for m in modes for p in args.compile_precisions
             for b in args.compile_batches]  # fmt: skip
    gflops = model_gflops(ckpt, sorted({s for _, _, s, _ in cells}), device=dev)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    result = {"rows": rows, "skipped": skipped}
    rng = np.random.default_rng(0)
    for mode, precision, size, b in cells:
        if dl.left() - args.later_s < args.compile_reserve_s * (2 if "autotune" in mode else 1):
            skipped.append(f"{mode} {precision} {size} b{b}: deadline")
            continue
        try:  # a cell whose compile fails (one mode, one precision) leaves the others their turn
            engine = TorchEngine.from_checkpoint(ckpt, device=dev, precision=precision, compile=mode,
                                                 dynamic=False, fixed_batch=b)  # fmt: skip
            x = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            batches = [torch.from_numpy(x).to(dev)] * 2 if dev.startswith("cuda") else [x] * 2
            t0 = time.perf_counter()
            engine.embed_pixels(batches[0])
            sync(dev)
            first = time.perf_counter() - t0
            r, n = rate(engine, batches, args.cell_seconds, dev)
        except Exception as e:  # noqa: BLE001 - the failure is the cell's result
            skipped.append(f"{mode} {precision} {size} b{b}: failed: {type(e).__name__}: {str(e)[:300]}")
            print(f"compiled {skipped[-1]}", flush=True)
            continue
        finally:
            engine = batches = None
            torch._dynamo.reset()
        peak = peaks.get(f"{dev} {precision}")
        g = gflops[size] * r
        rows.append({"precision": precision, "size": size, "batch": b, "mode": mode, "first_call_s": first,
                     "images_per_s": r, "gflops_per_s": g, "peak_pct": 100 * g / peak if peak else None})  # fmt: skip
        print(
            f"compiled {mode} {precision} {size}² b{b}: first call {first:.0f} s, {r:.1f} img/s, {g / 1e3:.1f} TFLOP/s",
            flush=True,
        )
        save(args.out, "compiled", result)  # a compile that outlives the session's command keeps the cells before it
    return result


def env_phase(args: Any) -> dict[str, Any]:
    import importlib

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
                            "command": " ".join(sys.argv)}  # fmt: skip
    from dtop_export.bench.harness import machine_info

    info["machine"] = machine_info()
    for mod in ("torchvision", "ray", "onnxruntime", "PIL"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - what is missing is the information
            info[mod] = f"not importable: {type(e).__name__}"
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                       "multiprocessors": p.multi_processor_count}  # fmt: skip
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dtop-gpu-feed"))
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--budget-s", type=float, default=470.0, help="Seconds for every phase together.")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="Skip a cell or job with less time left.")
    ap.add_argument("--cell-seconds", type=float, default=1.0, help="Timed seconds per model cell.")
    ap.add_argument("--photos", type=int, default=1024)
    ap.add_argument("--before-photos", type=int, default=192, help="Photos for the slow pre-issue-31 job.")
    ap.add_argument("--batch", type=int, default=64, help="Corpus jobs' batch size.")
    ap.add_argument("--before", default=".before", help="Folder holding e02e813's dtop_export (gpu_feed.sh).")
    ap.add_argument("--compile-mode", default="default,max-autotune", help="torch.compile modes, comma-separated.")
    ap.add_argument("--later-s", type=float, default=None, help="Seconds compiled leaves to the phases after it.")
    ap.add_argument("--trained", default=".trained/model.pt", help="A trained checkpoint for the parity phase.")
    ap.add_argument("--cpu-dry-run", action="store_true", help="Every phase on the CPU with the small preset, tiny.")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    args.device = "cpu" if dry else "cuda"
    args.preset = "small" if dry else "r50-vitb16"
    # (precision, size, batch, also from host uint8, cudnn.benchmark): fp16/bf16 x 384/512/1024 x 8/32/64, batch 1 and
    # cuDNN's heuristics (no per-shape autotuning: what an odd batch size costs) at 512, fp32 at 512 for reference
    sizes, batches = ([64, 96], [2]) if dry else ([384, 512, 1024], [8, 32, 64])
    lows = ["bf16"] if dry else ["fp16", "bf16"]
    args.model_cells = [(p, s, b, b == batches[-1], True) for p in lows for s in sizes for b in batches]
    args.model_cells += [(lows[0], sizes[1], 1, True, True), (lows[0], sizes[1], batches[-1], False, False),
                         ("fp32", sizes[1], batches[-1], False, True)]  # fmt: skip
    args.legacy_shape = (sizes[0], 2) if dry else (512, 8)
    args.precisions = ["bf16", "fp32"] if dry else ["fp16", "bf16", "fp32"]
    args.corpus_sizes = [96] if dry else [512, 1024]
    args.corpus_precision = "bf16" if dry else "fp16"
    args.parity_size = 96 if dry else None
    args.parity_photos = 8 if dry else 128
    args.profile_shape = (96, 2) if dry else (512, 64)
    args.graph_cells = [("bf16", 64, 1), ("bf16", 64, 2)] if dry else [("fp16", 512, b) for b in (1, 8, 32, 64)]
    args.compile_precisions = ["bf16"] if dry else ["fp16", "bf16"]
    args.compile_sizes = [64] if dry else [512, 1024]
    args.compile_batches = [2] if dry else [64]
    args.compile_reserve_s = 0.0 if dry else 75.0
    if dry:
        args.photos, args.before_photos, args.batch, args.cell_seconds = min(args.photos, 24), 8, 4, 0.2
        args.compile_mode = "default"
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}: choose from {', '.join(PHASES)}")
    if args.later_s is None:
        args.later_s = default_later_s(phases, args.budget_s, dry)
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run this on a GPU machine, or --cpu-dry-run to check the script")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    dl = Deadline(args.budget_s)
    from dtop_export.checkpoint import random_checkpoint

    ckpt = args.work / f"{args.preset}.pt"
    if not ckpt.exists():
        random_checkpoint(args.preset, ckpt, seed=0, source="bench")
    peaks_file = args.out / "peaks.json"
    peaks: dict[str, float] = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    photos: list[Path] = []
    timings: dict[str, float] = {}
    for phase in PHASES:
        if phase not in phases and not (phase == "photos" and {"decode", "corpus"} & set(phases)):
            continue
        if dl.left() < args.reserve_s and phase != "photos":
            print(f"phase {phase}: skipped, {dl.left():.0f} s left", flush=True)
            timings[phase] = -1.0
            continue
        t0 = time.perf_counter()
        print(f"--- {phase} ({dl.left():.0f} s left)", flush=True)
        try:
            photos = run_phase(phase, args, ckpt, dl, peaks, photos)
        except Exception as e:  # noqa: BLE001 - one phase failing must not cost the session the others
            import traceback

            print(f"phase {phase} FAILED: {type(e).__name__}: {e}", flush=True)
            save(args.out, f"{phase}-error", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        timings[phase] = time.perf_counter() - t0
    save(args.out, "timings", {"phases_s": timings, "budget_s": args.budget_s, "left_s": dl.left()})


def run_phase(
    phase: str, args: Any, ckpt: Path, dl: Deadline, peaks: dict[str, float], photos: list[Path]
) -> list[Path]:
    """Run one phase, save its JSON; the photos (made by the photos phase) pass on to the next phases."""
    dry = args.cpu_dry_run
    t0 = time.perf_counter()
    if phase == "env":
        save(args.out, "env", env_phase(args))
    elif phase == "peaks":
        from dtop_export.bench.peak import matmul_peak

        for p in args.precisions:
            peaks[f"{args.device} {p}"] = matmul_peak(args.device, p, n=512 if dry else None)
        print("matmul peaks GFLOP/s:", {k: round(v) for k, v in peaks.items()}, flush=True)
        save(args.out, "peaks", peaks)
    elif phase == "model":
        save(args.out, "model", model_phase(args, ckpt, dl, peaks))
    elif phase == "parity":
        save(args.out, "parity", parity_phase(args, ckpt))
    elif phase == "photos":
        photos = photos_phase(args)
        print(f"{len(photos)} photos in {time.perf_counter() - t0:.1f} s", flush=True)
    elif phase == "decode":
        save(args.out, "decode", decode_phase(args, ckpt, photos, dl))
    elif phase == "corpus":
        save(args.out, "corpus", corpus_phase(args, ckpt, photos, dl))
    elif phase == "profile":
        save(args.out, "profile", profile_phase(args, ckpt))
    elif phase == "graphs":
        from eager_graphs import graphs_phase

        save(args.out, "graphs", graphs_phase(ckpt, args.device, args.graph_cells))
    elif phase == "compiled":
        save(args.out, "compiled", compiled_phase(args, ckpt, dl, peaks))
    return photos


if __name__ == "__main__":
    main()
