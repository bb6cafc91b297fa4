"""``dtop-export trt --self-test [--full]``: the one-command acceptance of a machine's TensorRT path.

Prints the environment (TensorRT and the CUDA it was built for, the driver's CUDA, PyTorch's CUDA runtime, the
GPU, ONNX Runtime's providers), then on a random-init small model: builds FP32 (TF32 off) and strongly typed
FP16, checks I/O names and dtypes and the profile shapes, parity against ONNX Runtime (``dtop_export.parity``
with the FP32 or FP16 contract), reads the engine inspector to confirm the FP32 islands run FP32,
rebuilds with the timing cache, rebuilds with a corrupt cache (must fall back, with a warning), and checks
out-of-profile and empty batches. ``--full`` adds r50-vitb16 at the default profile (up to 8x3x1024x1024),
its parity and its latency against ONNX Runtime CUDA (when onnxruntime-gpu is installed) and PyTorch CUDA.
Ends with one PASS/FAIL line and a JSON report. Without TensorRT or a GPU: one line naming what is missing,
exit code 2.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.errors import DToPError

log = logging.getLogger("dtop_export.engines.tensorrt")  # the builder's warnings are read from this logger

EXIT_MISSING = 2
SMALL_PROFILE = ("1x3x128x128", "2x3x256x256", "4x3x384x384")


@dataclass
class Check:
    """One self-test step: ``status`` is ``pass``, ``fail`` or ``skip`` (with the reason in ``detail``)."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfTestReport:
    environment: dict[str, Any]
    full: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """At least one check ran and none failed."""
        return any(c.status == "pass" for c in self.checks) and not any(c.status == "fail" for c in self.checks)

    def verdict(self) -> str:
        """The last line: ``self-test PASS: 9 passed, 0 failed, 1 skipped (TensorRT 10.13 on NVIDIA H100)``."""
        n = {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip")}
        env = self.environment
        where = f"TensorRT {env.get('tensorrt', '?')} on {env.get('gpu', {}).get('name', '?')}"
        word = "PASS" if self.passed else "FAIL"
        return f"self-test {word}: {n['pass']} passed, {n['fail']} failed, {n['skip']} skipped ({where})"

    def table(self) -> str:
        """Markdown: one row per check."""
        lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
        for c in self.checks:
            mark = {"pass": "PASS", "fail": "**FAIL**", "skip": "skip"}[c.status]
            lines.append(f"| {c.name} | {mark} | {c.seconds:.1f} | {c.detail} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "full": self.full,
            "passed": self.passed,
            "verdict": self.verdict(),
            "checks": [asdict(c) for c in self.checks],
        }


def missing_requirement(device: int = 0) -> str | None:
    """None when TensorRT and CUDA device ``device`` are usable, else the one line saying which is missing."""
    from dtop_export.engines.tensorrt.install import require_tensorrt_and_gpu

    try:
        require_tensorrt_and_gpu(device)
    except DToPError as e:
        return str(e)
    return None


def _step(report: SelfTestReport, name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> Check:
    """Run one check; an exception is a failed check with its one-line message (the log has the rest)."""
    t0 = time.perf_counter()
    try:
        status, detail, data = fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a row of the report
        log.debug("self-test step %s failed", name, exc_info=True)
        status, detail, data = "fail", f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}", {}
    check = Check(name, status, detail, round(time.perf_counter() - t0, 2), data)
    report.checks.append(check)
    return check


def io_facts(engine: Any, trt: Any) -> dict[str, Any]:
    """Names, modes and dtypes of an ICudaEngine's I/O tensors and its profiles' input shapes."""
    tensors = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors[name] = {"mode": mode, "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1]}
    inputs = [n for n, t in tensors.items() if t["mode"] == "input"]
    profiles = [
        [list(map(int, s)) for s in engine.get_tensor_profile_shape(inputs[0], k)]
        for k in range(engine.num_optimization_profiles)
    ]
    return {"tensors": tensors, "profiles": profiles}


def check_io(facts: dict[str, Any], profiles: Sequence[Any]) -> list[str]:
    """Problems with :func:`io_facts` of a dtop-export engine built with ``profiles`` (empty: all good)."""
    want = {"images": ("input", "FLOAT"), "descriptors": ("output", "FLOAT")}
    problems = []
    for name, (mode, dtype) in want.items():
        got = facts["tensors"].get(name)
        if got is None:
            problems.append(f"no tensor {name!r} (has {sorted(facts['tensors'])})")
        elif got["mode"] != mode or got["dtype"].upper() != dtype:
            problems.append(f"{name} is {got['mode']} {got['dtype']}, expected {mode} {dtype}")
    expect = [[list(p.min), list(p.opt), list(p.max)] for p in profiles]
    if facts["profiles"] != expect:
        problems.append(f"profiles {facts['profiles']} != requested {expect}")
    return problems


def island_precisions(inspector_json: str, islands: Sequence[str], node_names: Sequence[str]) -> dict[str, Any]:
    """Read the engine inspector's JSON (built with detailed profiling): every engine layer made only of
    FP32-island nodes must have FP32 outputs. Layers inside Myelin regions (``ForeignNode``) do not show
    their members' precision and are counted as opaque."""
    from dtop_export.engines.tensorrt.builder import layer_owner

    info = json.loads(inspector_json)
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    keep = set(islands)
    checked, wrong, opaque = [], [], 0
    for layer in layers:
        if not isinstance(layer, dict):  # names only: built without detailed profiling
            continue
        name = str(layer.get("Name", ""))
        if "ForeignNode" in name:
            opaque += 1
            continue
        parts = [p.strip() for p in name.split(" + ") if p.strip()]
        owners = [layer_owner(p, node_names) for p in parts]
        if not parts or not all(o in keep for o in owners):
            continue
        formats = [str(o.get("Format/Datatype", "")) for o in layer.get("Outputs", []) if isinstance(o, dict)]
        checked.append(name)
        if not formats or not all("FP32" in f or "Float" in f for f in formats):
            wrong.append(f"{name}: {formats}")
    return {"layers": len(layers), "checked": len(checked), "wrong": wrong, "opaque": opaque}


def _parity(engine: Any, reference: Any, images: Sequence[np.ndarray]) -> tuple[str, str, dict[str, Any]]:
    """A check row for ``engine`` against ``reference`` over same-size batches of ``images``, judged by
    :func:`dtop_export.parity.compare` and the contract of the engine's precision (descriptor checks only:
    finite, cosine, max-abs where the contract has one)."""
    from dtop_export.parity import compare, contract_for

    refs, outs = [], []
    for shape in sorted({x.shape for x in images}):
        x = np.stack([i for i in images if i.shape == shape])
        refs.append(reference.embed(x))
        outs.append(engine.embed(x))
    ref, out = np.concatenate(refs), np.concatenate(outs)
    none = np.zeros((0, ref.shape[1]), np.float32)
    res = compare((ref, none), (out, none), None, contract_for(engine.precision), None, engine.label)
    detail = f"cos min {res.cosine_min:.6f} (>= {res.contract.cosine_min}), max-abs {res.max_abs:.2e}"
    if not res.passed:
        detail += ": " + "; ".join(res.failures())
    data = {"cosine_min": res.cosine_min, "max_abs": res.max_abs, "contract_cosine": res.contract.cosine_min}
    return ("pass" if res.passed else "fail"), detail, data


PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "hubble_deep_field.jpg", "camera.png")


def _images(preprocess: Any, sizes: Sequence[int], n: int) -> list[np.ndarray]:
    """``n`` photos that scikit-image ships, decoded and prepared like every engine's input at each of
    ``sizes`` (no downloads)."""
    from dtop_export.preprocess import load_image, prepare
    from dtop_export.retrieval.sample_data import skimage_data_dir

    photos = [load_image(skimage_data_dir() / name) for name in PHOTOS[:n]]
    return [prepare(img, preprocess, size) for size in sizes for img in photos]


def _median_ms(fn: Callable[[], Any], sync: Callable[[], None], runs: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_self_test(
    full: bool = False, device: int = 0, report_path: Path | None = None, console: Any = None, keep: Path | None = None
) -> int:
    """Run the self-test; prints as it goes and returns the exit code (0 PASS, 1 FAIL, 2 missing)."""

    def say(text: str) -> None:
        if console is not None:
            console.print(text, soft_wrap=True, markup=False, highlight=False)
        else:
            print(text)

    missing = missing_requirement(device)
    if missing is not None:
        say(f"self-test cannot run: {missing}")
        return EXIT_MISSING
    from dtop_export.engines.tensorrt.install import environment, require_tensorrt_and_gpu

    trt, _ = require_tensorrt_and_gpu(device)
    report = SelfTestReport(environment(trt, device), full)
    say(json.dumps(report.environment, indent=1))
    with tempfile.TemporaryDirectory(prefix="dtop-trt-selftest-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        _small_checks(report, trt, work, device)
        if full:
            _full_checks(report, work, device)
    say(report.table())
    if report_path is not None:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        say(f"wrote {report_path}")
    say(report.verdict())
    return 0 if report.passed else 1


def _small_checks(report: SelfTestReport, trt: Any, work: Path, device: int) -> None:
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.contract import load_onnx
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.engines.tensorrt.builder import build_engine
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.runner import TensorRTEngine
    from dtop_export.errors import ShapeError
    from dtop_export.export import export_onnx
    from dtop_export.fp16.convert import name_nodes

    onnx_path = work / "small.onnx"
    profiles = make_profiles([SMALL_PROFILE[0]], [SMALL_PROFILE[1]], [SMALL_PROFILE[2]])
    state: dict[str, Any] = {}

    def export() -> tuple[str, str, dict[str, Any]]:
        export_onnx(random_checkpoint("small", work / "small.pt", source="dtop-export trt --self-test"), onnx_path)
        ref = OnnxRuntimeEngine(onnx_path)
        state["ref"] = ref
        state["images"] = _images(ref.preprocess, (256, 384), 3)
        return "pass", f"random-init small preset -> {onnx_path.name}", {}

    if _step(report, "export small model", export).status != "pass":
        return

    def build(name: str, fp16: bool, cache: Path | None = None) -> Callable[[], tuple[str, str, dict[str, Any]]]:
        def run() -> tuple[str, str, dict[str, Any]]:
            plan = work / f"{name}.plan"
            r = build_engine(
                onnx_path,
                plan,
                fp16=fp16,
                profiles=profiles,
                timing_cache=cache,
                tf32=False,
                workspace_gb=2,
                device=device,
                detailed_profile=True,
            )
            engine = TensorRTEngine(plan, device=device)
            state[name] = (r, engine)
            facts = io_facts(engine.engine, trt)
            problems = check_io(facts, profiles)
            data = {"build_seconds": round(r.seconds, 2), "size_mib": round(r.size_bytes / 2**20, 2), **facts}
            if problems:
                return "fail", "; ".join(problems), data
            return "pass", f"built in {r.seconds:.1f} s, I/O and profile shapes as requested", data

        return run

    def parity(name: str) -> Callable[[], tuple[str, str, dict[str, Any]]]:
        return lambda: _parity(state[name][1], state["ref"], state["images"])

    cache = work / "timing.cache"
    if _step(report, "build FP32 (TF32 off)", build("fp32", False)).status == "pass":
        _step(report, "FP32 parity vs ONNX Runtime", parity("fp32"))
    if _step(report, "build FP16 strongly typed (+ timing cache)", build("fp16", True, cache)).status != "pass":
        return
    _step(report, "FP16 parity vs ONNX Runtime", parity("fp16"))

    def islands() -> tuple[str, str, dict[str, Any]]:
        r, engine = state["fp16"]
        fp16_model = load_onnx(r.built_onnx)
        name_nodes(fp16_model)
        inspector = engine.engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        res = island_precisions(text, r.info.precision["fp32_nodes"], [n.name for n in fp16_model.graph.node])
        if res["wrong"]:
            return "fail", f"{len(res['wrong'])} island layer(s) not FP32: {res['wrong'][:3]}", res
        if not res["checked"]:
            return "skip", f"no island layer visible ({res['opaque']} Myelin regions hide their precision)", res
        return "pass", f"{res['checked']} island layers FP32 ({res['opaque']} Myelin regions not inspectable)", res

    _step(report, "FP32 islands run FP32 (engine inspector)", islands)

    def rebuild_cached() -> tuple[str, str, dict[str, Any]]:
        first = state["fp16"][0].seconds
        if not cache.is_file() or cache.stat().st_size == 0:
            return "fail", "the first build wrote no timing cache", {}
        r = build_engine(onnx_path, work / "fp16-cached.plan", fp16=True, profiles=profiles, timing_cache=cache)
        data = {"first_seconds": round(first, 2), "cached_seconds": round(r.seconds, 2)}
        return "pass", f"rebuilt in {r.seconds:.1f} s with the cache ({first:.1f} s without)", data

    _step(report, "rebuild with the timing cache", rebuild_cached)

    def corrupt_cache() -> tuple[str, str, dict[str, Any]]:
        bad = work / "corrupt.cache"
        garbage = b"not a timing cache" * 64
        bad.write_bytes(garbage)
        with _captured_warnings() as warned:
            build_engine(onnx_path, work / "fp16-badcache.plan", fp16=True, profiles=profiles, timing_cache=bad)
        rewritten = bad.read_bytes() != garbage
        ok = rewritten and any("timing cache" in w for w in warned)
        detail = "fell back to a fresh cache with a warning and saved it" if ok else f"warnings {warned[:2]}"
        return ("pass" if ok else "fail"), detail, {"warnings": warned[:3], "cache_rewritten": rewritten}

    _step(report, "corrupt timing cache falls back", corrupt_cache)

    def shapes() -> tuple[str, str, dict[str, Any]]:
        engine = state["fp16"][1]
        empty = engine.embed(np.zeros((0, 3, 256, 256), np.float32))
        try:
            engine.embed(np.zeros((1, 3, 512, 512), np.float32))
            outside = "accepted a 512x512 input outside the profile"
        except ShapeError:
            outside = ""
        big = engine.embed(np.stack(state["images"][:3] * 2)[:6])  # 6 > max batch 4: split in two runs
        problems = [p for p in (outside,) if p]
        if empty.shape != (0, engine.descriptor_dim):
            problems.append(f"empty batch gave {empty.shape}")
        if big.shape != (6, engine.descriptor_dim):
            problems.append(f"batch of 6 gave {big.shape}")
        return ("fail", "; ".join(problems), {}) if problems else ("pass", "empty, split and out-of-profile", {})

    _step(report, "batches: empty, split, out-of-profile", shapes)


def _full_checks(report: SelfTestReport, work: Path, device: int) -> None:
    import torch

    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.engines.tensorrt.builder import build_engine
    from dtop_export.engines.tensorrt.runner import TensorRTEngine
    from dtop_export.export import export_onnx

    state: dict[str, Any] = {}

    def build_big() -> tuple[str, str, dict[str, Any]]:
        ckpt = random_checkpoint("r50-vitb16", work / "r50.pt", source="dtop-export trt --self-test --full")
        export_onnx(ckpt, work / "r50.onnx")
        r = build_engine(work / "r50.onnx", work / "r50.plan", fp16=True, device=device)  # default profile
        state["plan"], state["ckpt"] = r.plan, ckpt
        return "pass", f"r50-vitb16 FP16 at {r.info.profiles[0]['max']} in {r.seconds:.0f} s", {"seconds": r.seconds}

    if _step(report, "full: build r50-vitb16 FP16 (default profile)", build_big).status != "pass":
        return
    engine = TensorRTEngine(state["plan"], device=device)
    ref = OnnxRuntimeEngine(work / "r50.onnx")
    images = _images(ref.preprocess, (512,), 2)

    _step(report, "full: r50-vitb16 FP16 parity vs ONNX Runtime", lambda: _parity(engine, ref, images))

    def latency() -> tuple[str, str, dict[str, Any]]:
        x = np.stack(images[:1])
        sync = torch.cuda.synchronize
        data = {"shape": list(x.shape), "trt_fp16_ms": _median_ms(lambda: engine.embed(x), sync)}
        torch_engine = TorchEngine.from_checkpoint(state["ckpt"], device=f"cuda:{device}")
        data["torch_cuda_fp32_ms"] = _median_ms(lambda: torch_engine.embed(x), sync)
        if "CUDAExecutionProvider" in report.environment.get("onnxruntime_providers", []):
            ort_cuda = OnnxRuntimeEngine(work / "r50.onnx", provider="cuda")
            data["ort_cuda_fp32_ms"] = _median_ms(lambda: ort_cuda.embed(x), sync)
        else:
            data["ort_cuda_fp32_ms"] = None
        parts = [f"TensorRT FP16 {data['trt_fp16_ms']:.2f} ms"]
        parts.append(f"PyTorch CUDA fp32 {data['torch_cuda_fp32_ms']:.2f} ms")
        if data["ort_cuda_fp32_ms"] is not None:
            parts.append(f"ORT CUDA fp32 {data['ort_cuda_fp32_ms']:.2f} ms")
        else:
            parts.append("ORT CUDA: onnxruntime-gpu not installed")
        return "pass", "median of 20 at 1x3x512x512: " + ", ".join(parts), data

    _step(report, "full: latency vs ONNX Runtime CUDA and PyTorch", latency)


class _captured_warnings:  # noqa: N801 - used as a context manager
    """Collect WARNING records of the TensorRT logger (the builder's fallbacks)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        lines = self.lines

        class _H(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.WARNING:
                    lines.append(record.getMessage())

        self.handler = _H()
        log.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
