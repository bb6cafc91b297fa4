"""Benchmark harness: every engine side by side, interleaved, in one process (``dtop-export bench``).

Per engine: latency p50/p90 and images/s per (size, batch), speed ratio against PyTorch eager fp32,
achieved GFLOP/s (FLOPs counted once with ``torch.utils.flop_counter``), cosine against the reference
engine's output on the same input, first-call time (load + first forward), peak memory, and for
exported files their size and build time. Reports: Markdown, JSON, PNG (latency vs size).

How it measures (so the numbers can be trusted on a shared, noisy machine):

1. *Load pass*, one engine at a time: free the allocator's cached memory (``malloc_trim``), read RSS,
   load, run once at every (size, batch) while a sampler thread records the process RSS every 2 ms.
   Peak memory = the highest RSS seen minus the RSS before loading, i.e. weights plus the largest
   working set. This pass also warms every engine at every shape.
2. *Timed pass*: for each (size, batch), ``warmup`` + ``runs`` rounds; in each round every engine runs
   once, in turn (interleaved), so drifting load hits all engines alike. Same thread count everywhere.

The load average before and after is recorded: numbers taken with load above the core count are noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export._io import atomic_path, atomic_write_text
from dtop_export.errors import DToPError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DERIVE_KINDS = ("bf16", "bf16-compiled", "onnx", "optimized", "int8")


# specs -----------------------------------------------------------------------------------------------


@dataclass
class EngineSpec:
    """One engine to benchmark: a file plus engine options (``PATH[:opt,key=value,...]`` on the CLI)."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    build_seconds: float | None = None
    derived_from: str | None = None
    build_note: str | None = None

    @property
    def kind(self) -> str:
        s = self.path.suffix.lower()
        return "checkpoint" if s in (".pt", ".pth", ".ckpt") else s.lstrip(".")


def parse_spec(text: str) -> EngineSpec:
    """``model.pt``, ``model.pt:bf16``, ``model.onnx:threads=1,label=ort`` -> :class:`EngineSpec`.

    A bare option is a precision (fp32, bf16, fp16); ``key=value`` options go to the engine's constructor
    (ints and floats are converted), except ``label``, which names the row.
    """
    path_text, opts_text = text, ""
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if "/" not in tail and "\\" not in tail and head:
            path_text, opts_text = head, tail
    options: dict[str, Any] = {}
    label = None
    for item in filter(None, (o.strip() for o in opts_text.split(","))):
        if "=" in item:
            k, v = (p.strip() for p in item.split("=", 1))
            if k == "label":
                label = v
                continue
            options[k] = _coerce(v)
        elif item in PRECISIONS:
            options["precision"] = item
        else:
            raise DToPError(f"cannot read engine option {item!r} in {text!r}: use a precision or key=value")
    path = Path(path_text)
    if not path.exists():
        raise DToPError(f"model file {path} not found")
    return EngineSpec(path=path, options=options, label=label)


def _coerce(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_int_list(text: str, what: str) -> list[int]:
    """``"224,384,512"`` -> [224, 384, 512]; a one-line DToPError otherwise."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DToPError(f"cannot read {what} {text!r}: write comma-separated positive integers, e.g. 384,512")
    return values


# measurement helpers ---------------------------------------------------------------------------------


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


def model_gflops(checkpoint: Path, sizes: Sequence[int]) -> dict[int, float]:
    """Forward GFLOPs per image at each square size (matmuls and convs, attention included), counted with
    ``torch.utils.flop_counter`` on the checkpoint's model with explicit (non-fused) attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dtop_export.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).build_model().eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # F.scaled_dot_product_attention on CPU is invisible to the counter
    out = {}
    with torch.inference_mode():
        for s in sizes:
            with FlopCounterMode(display=False) as fc:
                model(torch.zeros(1, 3, s, s))
            out[s] = fc.get_total_flops() / 1e9
    return out


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the report header."""
    import psutil

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    for mod in ("torch", "onnxruntime", "numpy"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# results ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Latency of one engine at one (size, batch)."""

    size: int
    batch: int
    times_s: list[float]
    p50_s: float
    p90_s: float
    images_per_s: float
    speedup: float | None = None
    gflops_per_s: float | None = None
    cosine_min: float | None = None


@dataclass
class EngineResult:
    """Everything measured for one engine."""

    label: str
    name: str
    precision: str
    file: str
    kind: str
    options: dict[str, Any]
    load_s: float
    first_call_s: float
    load_rss_mb: float
    peak_rss_mb: float
    file_mb: float
    build_seconds: float | None
    derived_from: str | None
    timings: list[Timing] = field(default_factory=list)

    def timing(self, size: int, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.size == size and t.batch == batch), None)


@dataclass
class BenchReport:
    """A benchmark run: settings, machine, load, per-engine results."""

    sizes: list[int]
    batches: list[int]
    runs: int
    warmup: int
    threads: int
    reference: str
    machine: dict[str, Any]
    load_before: list[float]
    load_after: list[float]
    gflops_per_image: dict[int, float]
    engines: list[EngineResult]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gflops_per_image"] = {str(k): v for k, v in self.gflops_per_image.items()}
        d["format"] = "dtop-export/bench"
        d["format_version"] = 1
        return d

    def to_markdown(self) -> str:
        """Two tables: latency per engine and shape, then per-engine load/memory/file facts."""
        m = self.machine
        lines = [
            f"{m.get('cpu')}, {m.get('cores')} cores, {self.threads} threads; torch {m.get('torch')}, "
            f"onnxruntime {m.get('onnxruntime')}; load average before {_fmt_load(self.load_before)}, "
            f"after {_fmt_load(self.load_after)}; median of {self.runs} runs after {self.warmup} warm-up "
            f"(+1 in the load pass), interleaved. Speed-up is images/s against {self.reference}.",
            "",
            "| engine | size | batch | p50 ms | p90 ms | images/s | speed-up | GFLOP/s | cos min vs ref |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b in self.batches:
            for s in self.sizes:
                for e in self.engines:
                    t = e.timing(s, b)
                    if t is None:
                        continue
                    lines.append(
                        f"| {e.label} | {s}² | {b} | {t.p50_s * 1e3:.0f} | {t.p90_s * 1e3:.0f} | "
                        f"{t.images_per_s:.2f} | {_fmt(t.speedup, '{:.2f}×')} | {_fmt(t.gflops_per_s, '{:.0f}')} | "
                        f"{_fmt(t.cosine_min, '{:.5f}')} |"
                    )
        lines += [
            "",
            "| engine | file | file MB | build s | load s | first call s | load RSS MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in self.engines:
            build = _fmt(e.build_seconds, "{:.1f}")
            if e.derived_from:
                build += f" (from {e.derived_from})"
            lines.append(
                f"| {e.label} | {Path(e.file).name} | {e.file_mb:.1f} | {build} | {e.load_s:.2f} | "
                f"{e.first_call_s:.2f} | {e.load_rss_mb:.0f} | {e.peak_rss_mb:.0f} |"
            )
        if self.gflops_per_image:
            per = ", ".join(f"{s}²: {g:.1f}" for s, g in sorted(self.gflops_per_image.items()))
            lines += ["", f"Forward GFLOP per image (torch.utils.flop_counter): {per}."]
        return "\n".join(lines) + "\n"

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def write_plot(self, path: str | Path) -> None:
        """PNG: p50 latency vs image size, one line per engine, one panel per batch size."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_rows = len(self.engines)
        fig, axes = plt.subplots(
            1, len(self.batches), figsize=(6 * len(self.batches), 4.5 + 0.22 * n_rows), squeeze=False
        )
        for ax, b in zip(axes[0], self.batches):
            for e in self.engines:
                pts = [(t.size, t.p50_s * 1e3) for t in sorted(e.timings, key=lambda t: t.size) if t.batch == b]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=e.label)
            ax.set_title(f"batch {b}")
            ax.set_xlabel("image size (square side, px)")
            ax.set_ylabel("p50 latency per batch (ms)")
            ax.set_xticks(self.sizes)
            if len(self.sizes) > 1:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        # one legend under the plots, so no curve is hidden behind it
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
        fig.suptitle(f"dtop-export bench: {self.machine.get('cpu')}, {self.threads} threads", fontsize=10)
        fig.tight_layout(rect=(0, 0.04 * n_rows, 1, 1))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


def _fmt(v: float | None, pattern: str) -> str:
    return "—" if v is None else pattern.format(v)


def _fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "n/a"


# the run ---------------------------------------------------------------------------------------------


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
    with contextlib.suppress(Exception):
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(spec.path), load_external_data=False).metadata_props}
        b = meta.get("dtop.build_seconds")
        return (float(b) if b else None), meta.get("dtop.derived_from")
    return None, None


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
    from engines import load_engine

    if not specs:
        raise DToPError("give at least one model to benchmark")
    if runs < 1 or warmup < 0:
        raise DToPError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
            engine = load_engine(spec.path, **{"threads": threads, **spec.options})
            load_s = time.perf_counter() - t0
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
                file_mb=spec.path.stat().st_size / 2**20,
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
    ckpt = next((sp.path for sp in specs if sp.kind == "checkpoint"), None)
    if count_flops and ckpt is not None:
        gflops = model_gflops(ckpt, sizes)
        for res in results:
            for t in res.timings:
                t.gflops_per_s = gflops[t.size] * t.images_per_s
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
        engines=results,
        seconds=time.perf_counter() - t_start,
    )


def bench_steps(n_engines: int, n_shapes: int, runs: int, warmup: int) -> int:
    """Forward passes a :func:`run_bench` call makes (for a progress bar's total)."""
    return n_engines * n_shapes * (1 + warmup + runs)


def _reference_index(results: Sequence[EngineResult]) -> int:
    """PyTorch eager fp32 if present, else the first engine."""
    for i, r in enumerate(results):
        if r.name == "pytorch" and r.precision == "fp32":
            return i
    return 0


# derived artifacts -----------------------------------------------------------------------------------


def derive_specs(
    checkpoint: Path,
    kinds: Sequence[str],
    workdir: Path,
    *,
    calib_paths: Sequence[Path] | None = None,
    calib_source: str = "",
    calib_sizes: Sequence[int] = (320, 512),
    calib_count: int = 16,
    on_stage: Callable[[str], None] | None = None,
) -> list[EngineSpec]:
    """Build the artifacts a deployer would use from ``checkpoint`` and return their specs, timing each
    build: ``bf16`` (PyTorch deployment path, nothing to build), ``bf16-compiled`` (the same through
    ``torch.compile(mode="max-autotune")``, one static graph per shape, compiled on the first call),
    ``onnx`` (export), ``optimized`` (ORT CPU graph rewrites), ``int8`` (static quantisation of the
    optimized model, else the plain export)."""
    from dtop_export.export import export_onnx

    bad = sorted(set(kinds) - set(DERIVE_KINDS))
    if bad:
        raise DToPError(f"unknown --derive kind(s) {', '.join(bad)}: choose from {', '.join(DERIVE_KINDS)}")
    say = on_stage or (lambda _s: None)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = checkpoint.stem
    specs: list[EngineSpec] = []
    if "bf16" in kinds:
        specs.append(EngineSpec(checkpoint, {"precision": "bf16"}))
    if "bf16-compiled" in kinds:
        specs.append(EngineSpec(checkpoint, {"precision": "bf16", "compile": "max-autotune", "dynamic": False}))
    onnx_path = workdir / f"{stem}.onnx"
    need_onnx = any(k in kinds for k in ("onnx", "optimized", "int8"))
    if need_onnx:
        say(f"exporting {onnx_path.name}")
        res = export_onnx(checkpoint, onnx_path)
        if "onnx" in kinds:
            specs.append(EngineSpec(onnx_path, build_seconds=res.seconds, derived_from=checkpoint.name))
    parent = onnx_path
    if "optimized" in kinds or "int8" in kinds:
        from dtop_export.optimize import optimize_onnx

        opt_path = workdir / f"{stem}.opt.onnx"
        say(f"optimising {opt_path.name}")
        ores = optimize_onnx(onnx_path, opt_path)
        if "optimized" in kinds:
            specs.append(EngineSpec(opt_path, build_seconds=ores.seconds, derived_from=onnx_path.name))
        parent = opt_path
    if "int8" in kinds:
        from dtop_export.quantize import calibration_tensors, default_calibration_images, quantize_int8
        from engines.ort import OnnxRuntimeEngine

        if calib_paths is None:
            calib_paths, calib_source = default_calibration_images()
        pp = OnnxRuntimeEngine(parent).preprocess
        calib = calibration_tensors(calib_paths, pp, calib_sizes, calib_count)
        int8_path = workdir / f"{parent.stem}.int8.onnx"
        say(f"quantising {int8_path.name} ({len(calib)} calibration images)")
        qres = quantize_int8(parent, int8_path, calib, calibration_source=calib_source)
        specs.append(EngineSpec(int8_path, build_seconds=qres.seconds, derived_from=parent.name))
    return specs


@contextlib.contextmanager
def quiet_ort_logs() -> Iterator[None]:
    """Silence ONNX Runtime's C++ warnings (e.g. NCHWc serialisation notes) while benchmarking."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)
