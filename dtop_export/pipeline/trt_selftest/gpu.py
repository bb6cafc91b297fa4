"""The self-test with a GPU: build, run and inspect FP32 and FP16 engines of the small model (parity with ONNX
Runtime, I/O and profiles, the FP32 islands in the engine inspector), the timing cache (TensorRT) or runtime cache
(TensorRT-RTX), batch edge cases, and with ``--full`` r50-vitb16's build, parity and latency."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.pipeline.trt_selftest.report import (
    SMALL_PROFILE,
    SelfTestReport,
    captured_warnings,
    export_step,
    sample_images,
    step,
)


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
    from dtop_export.engines.tensorrt.network import layer_owner

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


def parity_check(engine: Any, reference: Any, images: Sequence[np.ndarray]) -> tuple[str, str, dict[str, Any]]:
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


def median_ms(fn: Callable[[], Any], sync: Callable[[], None], runs: int = 20, warmup: int = 3) -> float:
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


def small_checks(report: SelfTestReport, trt: Any, flavour: Any, work: Path, device: int) -> None:
    from dtop_export.contract import load_onnx
    from dtop_export.engines.tensorrt.builder import build_engine
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.runner import TensorRTEngine
    from dtop_export.fp16.convert import name_nodes

    profiles = make_profiles([SMALL_PROFILE[0]], [SMALL_PROFILE[1]], [SMALL_PROFILE[2]])
    state: dict[str, Any] = {}
    if not export_step(report, work, state):
        return
    onnx_path = state["onnx"]

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
                backend=flavour.key,
            )
            engine = TensorRTEngine(plan, device=device, **runtime_cache_option(name))
            state[name] = (r, engine)
            facts = io_facts(engine.engine, trt)
            problems = check_io(facts, profiles)
            data = {"build_seconds": round(r.seconds, 2), "size_mib": round(r.size_bytes / 2**20, 2), **facts}
            if problems:
                return "fail", "; ".join(problems), data
            return "pass", f"built in {r.seconds:.1f} s, I/O and profile shapes as requested", data

        return run

    def parity(name: str) -> Callable[[], tuple[str, str, dict[str, Any]]]:
        return lambda: parity_check(state[name][1], state["ref"], state["images"])

    def runtime_cache_option(name: str) -> dict[str, Any]:
        return {} if flavour.timing_cache else {"runtime_cache": work / f"{name}.rtxcache"}

    cache = work / "timing.cache" if flavour.timing_cache else None
    if step(report, "build FP32 (TF32 off)", build("fp32", False)).status == "pass":
        step(report, "FP32 parity vs ONNX Runtime", parity("fp32"))
    fp16_name = "build FP16 strongly typed" + (" (+ timing cache)" if cache else "")
    if step(report, fp16_name, build("fp16", True, cache)).status != "pass":
        return
    step(report, "FP16 parity vs ONNX Runtime", parity("fp16"))

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

    step(report, "FP32 islands run FP32 (engine inspector)", islands)
    if cache is None:  # TensorRT-RTX: the runtime cache of JIT kernels instead of the timing cache
        runtime_cache_checks(report, state, work, device)
    else:
        timing_cache_checks(report, state, onnx_path, profiles, cache, work)
    shape_checks(report, state)


def runtime_cache_checks(report: SelfTestReport, state: dict[str, Any], work: Path, device: int) -> None:
    """TensorRT-RTX: the kernels compiled by the first run are saved on close, loaded by a second engine (same
    descriptors), and a corrupt cache is ignored with a warning and rewritten."""
    from dtop_export.engines.tensorrt.runner import TensorRTEngine

    def saved_and_reused() -> tuple[str, str, dict[str, Any]]:
        engine = state["fp16"][1]
        x = np.stack(state["images"][:2])
        first = engine.embed(x)
        engine.close()  # saves the runtime cache
        path = engine.runtime_cache
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return "fail", f"no runtime cache written to {path}", {}
        t0 = time.perf_counter()
        again = TensorRTEngine(state["fp16"][0].plan, device=device, runtime_cache=path)
        second = again.embed(x)
        seconds = time.perf_counter() - t0
        again.close()
        state["fp16"] = (state["fp16"][0], again)
        if not np.allclose(first, second, atol=1e-6):
            return "fail", "a second engine with the cache gave other descriptors", {}
        data = {"cache_bytes": path.stat().st_size, "reload_seconds": round(seconds, 2)}
        return "pass", f"{path.stat().st_size / 2**20:.1f} MiB cache saved; reloaded and ran in {seconds:.1f} s", data

    step(report, "runtime cache saved and reused", saved_and_reused)

    def corrupt() -> tuple[str, str, dict[str, Any]]:
        bad = work / "corrupt.rtxcache"
        garbage = b"not a runtime cache" * 64
        bad.write_bytes(garbage)
        with captured_warnings() as warned:
            engine = TensorRTEngine(state["fp16"][0].plan, device=device, runtime_cache=bad)
            engine.embed(np.stack(state["images"][:1]))
            engine.close()
        rewritten = bad.read_bytes() != garbage
        ok = rewritten and any("runtime cache" in w for w in warned)
        detail = "ignored with a warning, kernels compiled again, cache rewritten" if ok else f"warnings {warned[:2]}"
        return ("pass" if ok else "fail"), detail, {"warnings": warned[:3], "cache_rewritten": rewritten}

    step(report, "corrupt runtime cache falls back", corrupt)


def timing_cache_checks(
    report: SelfTestReport, state: dict[str, Any], onnx_path: Path, profiles: Sequence[Any], cache: Path, work: Path
) -> None:
    """TensorRT: a rebuild reads the timing cache; a corrupt one is replaced with a warning."""
    from dtop_export.engines.tensorrt.builder import build_engine

    def rebuild_cached() -> tuple[str, str, dict[str, Any]]:
        first = state["fp16"][0].seconds
        if not cache.is_file() or cache.stat().st_size == 0:
            return "fail", "the first build wrote no timing cache", {}
        r = build_engine(onnx_path, work / "fp16-cached.plan", fp16=True, profiles=profiles, timing_cache=cache)
        data = {"first_seconds": round(first, 2), "cached_seconds": round(r.seconds, 2)}
        return "pass", f"rebuilt in {r.seconds:.1f} s with the cache ({first:.1f} s without)", data

    step(report, "rebuild with the timing cache", rebuild_cached)

    def corrupt_cache() -> tuple[str, str, dict[str, Any]]:
        bad = work / "corrupt.cache"
        garbage = b"not a timing cache" * 64
        bad.write_bytes(garbage)
        with captured_warnings() as warned:
            build_engine(onnx_path, work / "fp16-badcache.plan", fp16=True, profiles=profiles, timing_cache=bad)
        rewritten = bad.read_bytes() != garbage
        ok = rewritten and any("timing cache" in w for w in warned)
        detail = "fell back to a fresh cache with a warning and saved it" if ok else f"warnings {warned[:2]}"
        return ("pass" if ok else "fail"), detail, {"warnings": warned[:3], "cache_rewritten": rewritten}

    step(report, "corrupt timing cache falls back", corrupt_cache)


def shape_checks(report: SelfTestReport, state: dict[str, Any]) -> None:
    from dtop_export.errors import ShapeError

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

    step(report, "batches: empty, split, out-of-profile", shapes)


def full_checks(report: SelfTestReport, flavour: Any, work: Path, device: int) -> None:
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
        r = build_engine(work / "r50.onnx", work / "r50.plan", fp16=True, device=device, backend=flavour.key)
        state["plan"], state["ckpt"] = r.plan, ckpt
        return "pass", f"r50-vitb16 FP16 at {r.info.profiles[0]['max']} in {r.seconds:.0f} s", {"seconds": r.seconds}

    if step(report, "full: build r50-vitb16 FP16 (default profile)", build_big).status != "pass":
        return
    engine = TensorRTEngine(state["plan"], device=device)
    ref = OnnxRuntimeEngine(work / "r50.onnx")
    images = sample_images(ref.preprocess, (512,), 2)

    step(report, "full: r50-vitb16 FP16 parity vs ONNX Runtime", lambda: parity_check(engine, ref, images))

    def latency() -> tuple[str, str, dict[str, Any]]:
        x = np.stack(images[:1])
        sync = torch.cuda.synchronize
        data = {"shape": list(x.shape), "trt_fp16_ms": median_ms(lambda: engine.embed(x), sync)}
        torch_engine = TorchEngine.from_checkpoint(state["ckpt"], device=f"cuda:{device}")
        data["torch_cuda_fp32_ms"] = median_ms(lambda: torch_engine.embed(x), sync)
        if "CUDAExecutionProvider" in report.environment.get("onnxruntime_providers", []):
            ort_cuda = OnnxRuntimeEngine(work / "r50.onnx", provider="cuda")
            data["ort_cuda_fp32_ms"] = median_ms(lambda: ort_cuda.embed(x), sync)
        else:
            data["ort_cuda_fp32_ms"] = None
        parts = [f"TensorRT FP16 {data['trt_fp16_ms']:.2f} ms"]
        parts.append(f"PyTorch CUDA fp32 {data['torch_cuda_fp32_ms']:.2f} ms")
        if data["ort_cuda_fp32_ms"] is not None:
            parts.append(f"ORT CUDA fp32 {data['ort_cuda_fp32_ms']:.2f} ms")
        else:
            parts.append("ORT CUDA: onnxruntime-gpu not installed")
        return "pass", "median of 20 at 1x3x512x512: " + ", ".join(parts), data

    step(report, "full: latency vs ONNX Runtime CUDA and PyTorch", latency)
