"""The self-test without a usable GPU (TensorRT-RTX): the build half for real, for two named targets, and every
GPU step reported "built, not run: needs a GPU"."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.pipeline.trt_selftest.report import (
    BUILD_ONLY_TARGETS,
    NOT_RUN,
    SMALL_PROFILE,
    Check,
    SelfTestReport,
    export_step,
    step,
)


def build_only_checks(report: SelfTestReport, trt: Any, flavour: Any, work: Path, no_gpu: str, full: bool) -> None:
    """TensorRT-RTX without a usable GPU: everything up to a plan, for real, for two named targets."""
    from dtop_export.contract import load_onnx
    from dtop_export.digest import file_sha256
    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.lint import real_parser_issues
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.runner import TensorRTEngine
    from dtop_export.engines.tensorrt.sidecar import read_sidecar
    from dtop_export.engines.tensorrt.targets import parse_targets, plan_paths
    from dtop_export.fp16.convert import fp32_nodes_of

    targets = parse_targets(BUILD_ONLY_TARGETS)
    report.targets = [t.sm for t in targets]
    profiles = make_profiles([SMALL_PROFILE[0]], [SMALL_PROFILE[1]], [SMALL_PROFILE[2]])
    state: dict[str, Any] = {}
    if not export_step(report, work, state):
        return
    onnx_path = state["onnx"]

    def parse() -> tuple[str, str, dict[str, Any]]:
        run = real_parser_issues(onnx_path)
        if not run.parser:
            return "fail", "no parser could run: " + "; ".join(run.skipped), {}
        if run.issues:
            return "fail", f"{run.parser}: " + "; ".join(i.line() for i in run.issues[:3]), {}
        return "pass", f"{run.parser}: no errors", {"parser": run.parser}

    step(report, "real ONNX parser", parse)

    def build(name: str, fp16: bool) -> Callable[[], tuple[str, str, dict[str, Any]]]:
        def run() -> tuple[str, str, dict[str, Any]]:
            plans = plan_paths(work / f"{name}.plan", targets)
            results = build_engines(
                onnx_path, plans, targets=targets, fp16=fp16, profiles=profiles, tf32=False, workspace_gb=2,
                fp16_onnx_path=work / "small.fp16.onnx",
            )  # fmt: skip
            state[name] = results
            net = results[0].info.precision["network"]
            sizes = ", ".join(
                f"{r.info.gpu['target']} {r.size_bytes / 2**20:.1f} MiB in {r.seconds:.1f} s" for r in results
            )
            data = {r.info.gpu["target"]: {"seconds": round(r.seconds, 2), "size_mib": round(r.size_bytes / 2**20, 2)}
                    for r in results}  # fmt: skip
            data["network"] = net
            return "pass", f"{sizes}; network {net['fp16_layers']} FP16 / {net['fp32_layers']} FP32 layers", data

        return run

    fp32_ok = step(report, f"build FP32 for {BUILD_ONLY_TARGETS} (no GPU)", build("fp32", False)).status == "pass"
    fp16_ok = step(report, f"build FP16 for {BUILD_ONLY_TARGETS} (no GPU)", build("fp16", True)).status == "pass"

    def islands() -> tuple[str, str, dict[str, Any]]:
        r = state["fp16"][0]
        net = r.info.precision["network"]
        model = load_onnx(r.built_onnx)
        want = fp32_nodes_of(model)
        ops = Counter(n.op_type for n in model.graph.node if n.name in set(want))
        if net["violations"]:
            return "fail", f"{len(net['violations'])} layer(s) in the wrong precision: {net['violations'][:2]}", net
        if net["islands_seen"] != len(want) or not net["fp16_layers"]:
            return (
                "fail",
                f"{net['islands_seen']} of {len(want)} island nodes seen, {net['fp16_layers']} FP16 layers",
                net,
            )
        detail = (
            f"all {len(want)} island nodes FP32 ({net['island_layers']} layers; "
            + ", ".join(f"{op} x{k}" for op, k in ops.most_common())
            + f"), the other {net['fp16_layers']} compute layers FP16"
        )
        return "pass", detail, net

    if fp16_ok:
        step(report, "FP32 islands in the parsed network (INetworkDefinition)", islands)

    def sidecars() -> tuple[str, str, dict[str, Any]]:
        problems = []
        digest = file_sha256(onnx_path)
        for name in ("fp32", "fp16"):
            for r in state.get(name, []):
                info = read_sidecar(r.plan)
                if info.backend != flavour.key or info.tensorrt_version != trt.__version__:
                    problems.append(f"{r.plan.name}: backend {info.backend} {info.tensorrt_version}")
                if info.gpu.get("target") not in report.targets or info.gpu.get("name") is not None:
                    problems.append(f"{r.plan.name}: target {info.gpu}")
                if info.onnx.get("sha256") != digest or not info.profiles:
                    problems.append(f"{r.plan.name}: ONNX hash or profiles missing")
                if name == "fp16" and not info.precision.get("fp32_nodes"):
                    problems.append(f"{r.plan.name}: no FP32 islands recorded")
        if problems:
            return "fail", "; ".join(problems[:3]), {}
        return "pass", "backend + version, target, profiles, FP32 islands and the ONNX's SHA-256 recorded", {}

    if fp32_ok or fp16_ok:
        step(report, "sidecars", sidecars)

    def runner_refuses() -> tuple[str, str, dict[str, Any]]:
        plan = (state.get("fp16") or state["fp32"])[0].plan
        try:
            TensorRTEngine(plan)
        except DToPError as e:
            text = str(e)
            ok = "\n" not in text and flavour.label in text
            return ("pass" if ok else "fail"), f"one line: {text[:200]}", {}
        return "fail", "the runner opened a plan without a usable GPU", {}

    if fp32_ok or fp16_ok:
        step(report, "runner refuses it here, in one line", runner_refuses)

    if full:

        def build_big() -> tuple[str, str, dict[str, Any]]:
            from dtop_export.checkpoint import random_checkpoint
            from dtop_export.export import export_onnx

            ckpt = random_checkpoint("r50-vitb16", work / "r50.pt", source="dtop-export trt --self-test --full")
            export_onnx(ckpt, work / "r50.onnx")
            r = build_engines(work / "r50.onnx", [work / "r50.plan"], targets=targets[:1], fp16=True)[0]
            net = r.info.precision["network"]
            detail = (
                f"r50-vitb16 FP16 for {targets[0].sm} at the default profile: {r.size_bytes / 2**20:.0f} MiB in "
                f"{r.seconds:.0f} s, network {net['fp16_layers']} FP16 / {net['fp32_layers']} FP32 layers"
            )
            status = "pass" if not net["violations"] else "fail"
            return status, detail, {"seconds": r.seconds, "size_mib": r.size_bytes / 2**20, "network": net}

        step(report, f"full: build r50-vitb16 FP16 for {targets[0].sm} (no GPU)", build_big)

    gpu_steps = [
        "FP32 parity vs ONNX Runtime",
        "FP16 parity vs ONNX Runtime",
        "FP32 islands run FP32 (engine inspector)",
    ]
    gpu_steps += ["runtime cache saved and reused", "batches: empty, split, out-of-profile"]
    if full:
        gpu_steps += ["full: r50-vitb16 FP16 parity", "full: latency"]
    for name in gpu_steps:
        report.checks.append(Check(name, "notrun", f"{NOT_RUN} ({no_gpu.split(':')[0]})"))
