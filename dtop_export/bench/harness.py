"""The benchmark run: every engine side by side, interleaved, in one process (``dtop-export bench``).

Per engine: latency p50/p90 and images/s per (size, batch), speed ratio against PyTorch eager fp32,
achieved GFLOP/s (FLOPs counted once with ``torch.utils.flop_counter`` on the first checkpoint's model; only the
rows of that model, the checkpoint or a file exported from it, have them), cosine against the reference
engine's output on the same input, first-call time (load + first forward), peak memory, and for
exported files their size and build time. Reports: Markdown, JSON, PNG (latency vs size).

How it measures (so the numbers can be trusted on a shared, noisy machine):

1. *Load pass*, one engine at a time: free the allocator's cached memory (``malloc_trim``), read RSS,
   load, run once at every (size, batch) while a sampler thread records the process RSS every 2 ms.
   Peak memory = the highest RSS seen minus the RSS before loading, i.e. weights plus the largest
   working set. This pass also warms every engine at every shape.
2. *Timed pass*: for each (size, batch), ``warmup`` + ``runs`` rounds; in each round every engine runs
   once, in turn (interleaved), so drifting load hits all engines alike. Same thread count everywhere unless a
   spec sets its own (``MODEL:threads=1``); a PyTorch engine sets torch's process-wide count before each call.

The load average before and after is recorded: numbers taken with load above the core count are noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.bench.report import BenchReport, EngineResult, Timing
from dtop_export.bench.spec import EngineSpec
from dtop_export.contract import read_metadata
from dtop_export.errors import DToPError
from dtop_export.host import usable_cpus


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim() -> None:
    """Give the C allocator's free memory back to the OS, so the next RSS delta is the next engine's."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """Track the process's peak RSS from a background thread (native allocations included)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        import psutil

        proc = psutil.Process()
        self.peak = int(proc.memory_info().rss)

        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, int(proc.memory_info().rss))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())


def model_gflops(checkpoint: Path, sizes: Sequence[int], device: str = "cpu") -> dict[int, float]:
    """Forward GFLOPs per image at each square size (matmuls and convs, attention included), counted with
    ``torch.utils.flop_counter`` on the checkpoint's model with explicit (non-fused) attention, run on ``device``
    (a GPU counts the full model at 1024² in a second)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dtop_export.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).build_model().eval().to(device)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # F.scaled_dot_product_attention on CPU is invisible to the counter
    out = {}
    with torch.inference_mode():
        for s in sizes:
            with FlopCounterMode(display=False) as fc:
                model(torch.zeros(1, 3, s, s, device=device))
            out[s] = fc.get_total_flops() / 1e9
    return out


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the report header."""
    import psutil

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_features": cpu_features(),
        "cores": usable_cpus(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    for mod in ("torch", "onnxruntime", "numpy"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


# The CPU features that decide which path is fastest (bf16 pays only with AMX; int8 needs VNNI or AMX).
SPEED_FEATURES = {
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16",
    "avx512_vnni": "VNNI",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "avx512_fp16": "AVX512-FP16",
    "amx_fp16": "AMX-FP16",
}


def cpu_features() -> list[str]:
    """The :data:`SPEED_FEATURES` this CPU has (from ``/proc/cpuinfo``; empty where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [name for flag, name in SPEED_FEATURES.items() if flag in flags]
    return []


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def model_files(path: Path) -> list[Path]:
    """The files a model is: an OpenVINO IR is its .xml and .bin."""
    weights = path.with_suffix(".bin")
    return [path, weights] if path.suffix.lower() == ".xml" and weights.is_file() else [path]


def _label(engine: Any, spec: EngineSpec) -> str:
    if spec.label:
        return spec.label
    extra = ",".join(f"{k}={v}" for k, v in spec.options.items() if k not in ("precision", "threads"))
    return f"{engine.name} {engine.precision} · {spec.path.name}" + (f" [{extra}]" if extra else "")


def _inputs(size: int, batch: int, stride: int) -> np.ndarray:
    if size % stride:
        raise DToPError(f"size {size} is not a multiple of the model stride {stride}")
    rng = np.random.default_rng(size * 1000 + batch)
    return rng.standard_normal((batch, 3, size, size), dtype=np.float32)


def _file_build_seconds(spec: EngineSpec) -> tuple[float | None, str | None]:
    """Build time and parent recorded in an ONNX file's metadata by ``optimize``/``quantize``."""
    if spec.build_seconds is not None or spec.kind != "onnx":
        return spec.build_seconds, spec.derived_from
    with contextlib.suppress(DToPError, ValueError):
        meta = read_metadata(spec.path)
        b = meta.get("dtop.build_seconds")
        return (float(b) if b else None), meta.get("dtop.derived_from")
    return None, None


def _refuse_other_sizes(engine: Any, path: Path, sizes: Sequence[int]) -> None:
    """One line, before this engine runs, when it takes one input size (an ExecuTorch program, a ``--static``
    export) and ``--sizes`` asks for others (the first pass failed there, after the engines before it had run)."""
    hw = getattr(engine, "static_hw", None)
    other = [s for s in sizes if hw is not None and (s, s) != tuple(hw)]
    if other:
        engine.close()
        fix = f"--sizes {hw[0]}" if hw[0] == hw[1] else "a square export (bench times S x S inputs)"
        raise DToPError(f"{path} runs {hw[0]}x{hw[1]} inputs only, not {other[0]}x{other[0]}: bench it with {fix}")


def run_bench(
    specs: Sequence[EngineSpec],
    sizes: Sequence[int],
    batches: Sequence[int],
    *,
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    count_flops: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> BenchReport:
    """Benchmark ``specs`` at every (size, batch). ``progress(description, steps_done)`` is called after
    each forward pass (``steps_done`` = 1), for progress bars; :func:`bench_steps` gives the total."""
    from dtop_export.engines import load_engine
    from dtop_export.suffixes import PLAN_SUFFIXES

    if not specs:
        raise DToPError("give at least one model to benchmark")
    if runs < 1 or warmup < 0:
        raise DToPError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    if not threads:
        threads = usable_cpus()
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())
    shapes = [(s, b) for b in batches for s in sizes]
    step = progress or (lambda _d, _n: None)

    # 1. load pass: one engine at a time, memory sampled.
    engines: list[Any] = []
    results: list[EngineResult] = []
    outputs: dict[tuple[int, int], list[np.ndarray]] = {sh: [] for sh in shapes}
    for spec in specs:
        _trim()
        rss0 = _rss()
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            cpu = {} if spec.path.suffix.lower() in PLAN_SUFFIXES else {"threads": threads}  # a plan has no threads
            engine = load_engine(spec.path, **{**cpu, **spec.options})
            load_s = time.perf_counter() - t0
            _refuse_other_sizes(engine, spec.path, sizes)
            rss_loaded = _rss()
            label = _label(engine, spec)
            first_call = None
            for s, b in shapes:
                step(f"load pass: {label} {s}² ×{b}", 0)
                t1 = time.perf_counter()
                outputs[(s, b)].append(engine.embed(_inputs(s, b, engine.stride)))
                if first_call is None:
                    first_call = load_s + time.perf_counter() - t1
                step(f"load pass: {label} {s}² ×{b}", 1)
        build_s, parent = _file_build_seconds(spec)
        engines.append(engine)
        results.append(
            EngineResult(
                label=label,
                name=engine.name,
                precision=engine.precision,
                file=str(spec.path),
                kind=spec.kind,
                options=dict(spec.options),
                load_s=load_s,
                first_call_s=first_call or load_s,
                load_rss_mb=(rss_loaded - rss0) / 2**20,
                peak_rss_mb=(sampler.peak - rss0) / 2**20,
                file_mb=sum(p.stat().st_size for p in model_files(spec.path)) / 2**20,
                build_seconds=build_s,
                derived_from=parent,
            )
        )
    ref = _reference_index(results)
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise DToPError("two engines have the same label: give one a name with PATH:label=NAME")

    # 2. timed pass: interleaved rounds.
    for s, b in shapes:
        x = _inputs(s, b, engines[0].stride)
        times: list[list[float]] = [[] for _ in engines]
        for r in range(warmup + runs):
            for i, engine in enumerate(engines):
                step(f"timing {s}² ×{b}: {results[i].label}", 0)
                t0 = time.perf_counter()
                engine.embed(x)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[i].append(dt)
                step(f"timing {s}² ×{b}: {results[i].label}", 1)
        for i, res in enumerate(results):
            ts = times[i]
            p50 = statistics.median(ts)
            p90 = float(np.percentile(ts, 90)) if len(ts) > 1 else ts[0]
            a, r_ = outputs[(s, b)][i], outputs[(s, b)][ref]
            cos = None
            if a.shape == r_.shape:
                cos = float(np.min(np.sum(a * r_, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(r_, axis=1))))
            res.timings.append(Timing(s, b, ts, p50, p90, b / p50, cosine_min=cos))
    for s, b in shapes:
        base = results[ref].timing(s, b)
        for res in results:
            t = res.timing(s, b)
            if t is not None and base is not None:
                t.speedup = t.images_per_s / base.images_per_s

    gflops: dict[int, float] = {}
    peaks: dict[str, float] = {}
    ckpt = next((sp.path for sp in specs if sp.kind == "checkpoint"), None)
    if count_flops and ckpt is not None:
        from dtop_export.bench.peak import matmul_peak

        gflops = model_gflops(ckpt, sizes)
        counted = _same_model(ckpt)
        for spec, res, engine in zip(specs, results, engines):
            if not counted(spec.path):  # another model: these FLOPs are not its own
                continue
            key, own = ceiling_key(engine), spec.options.get("threads") or threads
            if key is not None and key.startswith("cpu") and own != threads:  # a spec's threads=: its own ceiling
                key = f"{key} threads={own}"
            if key is not None and key not in peaks:
                peaks[key] = matmul_peak(*key.split()[:2], threads=own)  # the engine's threads, not torch's last
            for t in res.timings:
                t.gflops_per_s = gflops[t.size] * t.images_per_s
                t.peak_pct = 100 * t.gflops_per_s / peaks[key] if key is not None else None
    for e in engines:
        e.close()
    return BenchReport(
        sizes=list(sizes),
        batches=list(batches),
        runs=runs,
        warmup=warmup,
        threads=threads,
        reference=results[ref].label,
        machine=machine_info(),
        load_before=load_before,
        load_after=list(os.getloadavg()),
        gflops_per_image=gflops,
        flops_model=ckpt.name if gflops and ckpt is not None else None,
        engines=results,
        seconds=time.perf_counter() - t_start,
        matmul_peaks=peaks,
    )


def _same_model(checkpoint: Path) -> Callable[[Path], bool]:
    """Whether a model file is ``checkpoint`` or was exported from it (the checkpoint's sha256, which every export
    records as ``dtop.checkpoint_sha256``: ONNX, OpenVINO IR, ExecuTorch program, TensorRT plan sidecar); a file
    that records none is not."""
    from dtop_export.identity import checkpoint_of

    digests: dict[Path, str | None] = {}

    def digest(path: Path) -> str | None:
        key = path.resolve()
        if key not in digests:
            try:
                digests[key] = checkpoint_of(path)
            except (DToPError, OSError, ValueError):
                digests[key] = None
        return digests[key]

    mine = digest(checkpoint)
    return lambda path: mine is not None and digest(path) == mine


def ceiling_key(engine: Any) -> str | None:
    """The matmul ceiling ``engine``'s GFLOP/s is read against (:func:`~dtop_export.bench.peak.peak_key`): its device
    and precision, and for an fp32 engine whose description says ``tf32`` (a TensorRT plan built with TF32 allowed,
    TensorRT's default) the TF32 one: its float32 matmuls run on the tensor cores."""
    from dtop_export.bench.peak import peak_key

    tf32 = engine.precision == "fp32" and str(engine.device).startswith("cuda") and bool(engine.describe().get("tf32"))
    return peak_key(engine.device, engine.precision, tf32=tf32)


def bench_steps(n_engines: int, n_shapes: int, runs: int, warmup: int) -> int:
    """Forward passes a :func:`run_bench` call makes (for a progress bar's total)."""
    return n_engines * n_shapes * (1 + warmup + runs)


def _reference_index(results: Sequence[EngineResult]) -> int:
    """PyTorch eager fp32 if present, else the first engine."""
    for i, r in enumerate(results):
        if r.name == "pytorch" and r.precision == "fp32":
            return i
    return 0
