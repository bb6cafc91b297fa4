"""``dtop-export trt --self-test [--full]``: the one-command acceptance of a machine's TensorRT path.

Prints the environment (the TensorRT flavour and the CUDA it was built for, the driver's CUDA, PyTorch's CUDA
runtime, the GPU, ONNX Runtime's providers), then on a random-init small model, with a GPU: builds FP32 (TF32
off) and strongly typed FP16, checks I/O names and dtypes and the profile shapes, parity against ONNX Runtime
(``dtop_export.parity`` with the FP32 or FP16 contract), reads the engine inspector to confirm the FP32 islands
run FP32, rebuilds with the timing cache and with a corrupt one (TensorRT; must fall back, with a warning) or
saves, reloads and corrupts the runtime cache (TensorRT-RTX), and checks out-of-profile and empty batches.
``--full`` adds r50-vitb16 at the default profile (up to 8x3x1024x1024), its parity and its latency against ONNX
Runtime CUDA (when onnxruntime-gpu is installed) and PyTorch CUDA.

Without a usable GPU but with TensorRT-RTX, the build half runs for real: the real ONNX parser, FP32 and FP16
plans for two named targets (sm86, sm89; ``--full`` adds r50-vitb16 FP16 for sm86), the parsed network's FP32
islands, the sidecars, the runner's refusal; every step that needs a GPU is reported "built, not run: needs a
GPU". Ends with one PASS/FAIL line and a JSON report. Exit codes: 0 everything passed, 1 something failed,
2 nothing could be tested (no TensorRT flavour, or TensorRT without a GPU), 3 everything that could run here
passed but the GPU steps did not run.

Modules: ``report`` (the checks, verdict, exit code and the shared steps), ``gpu`` (the steps that run engines),
``build_only`` (the GPU-less TensorRT-RTX steps). They import the engines, the exporter and the parity comparator
inside their functions, so importing this package is cheap.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.pipeline.trt_selftest.build_only import build_only_checks
from dtop_export.pipeline.trt_selftest.gpu import full_checks, small_checks
from dtop_export.pipeline.trt_selftest.report import BUILD_ONLY_TARGETS, EXIT_MISSING, NOT_RUN, SelfTestReport


def run_self_test(
    full: bool = False,
    device: int = 0,
    report_path: Path | None = None,
    console: Any = None,
    keep: Path | None = None,
    backend: str = "auto",
) -> int:
    """Run the self-test; prints as it goes and returns the exit code (0 PASS, 1 FAIL, 2 nothing to test with,
    3 built but not run: no usable GPU)."""
    from dtop_export.engines.tensorrt.install import environment, require_tensorrt_and_gpu, resolve_flavour

    def say(text: str) -> None:
        if console is not None:
            console.print(text, soft_wrap=True, markup=False, highlight=False)
        else:
            print(text)

    try:
        flavour = resolve_flavour(backend)
        trt, _ = require_tensorrt_and_gpu(device, flavour)
        no_gpu = None
    except DToPError as e:
        no_gpu = str(e)
        flavour = None
        with contextlib.suppress(DToPError):
            flavour = resolve_flavour(backend)
        if flavour is None or not flavour.named_targets:  # nothing here can build without a GPU
            say(f"self-test cannot run: {e}")
            return EXIT_MISSING
        from dtop_export.engines.tensorrt.install import import_tensorrt

        try:
            trt = import_tensorrt(flavour)
        except DToPError as e2:
            say(f"self-test cannot run: {e2}")
            return EXIT_MISSING
    report = SelfTestReport(environment(trt, device, flavour), full)
    say(json.dumps(report.environment, indent=1))
    if no_gpu is not None:
        say(f"{flavour.label} without a usable GPU ({no_gpu}): building for {BUILD_ONLY_TARGETS}; GPU steps: {NOT_RUN}")
    with tempfile.TemporaryDirectory(prefix="dtop-trt-selftest-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if no_gpu is None:
            small_checks(report, trt, flavour, work, device)
            if full:
                full_checks(report, flavour, work, device)
        else:
            build_only_checks(report, trt, flavour, work, no_gpu, full)
    say(report.table())
    if report_path is not None:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        say(f"wrote {report_path}")
    say(report.verdict())
    return report.exit_code()
