"""The matmul ceiling a row of ``dtop-export bench`` is read against: square GEMMs timed on the engine's device in
the precision it computes in, the same run (a GPU's, e.g. an H200's ~790 TFLOP/s dense bf16, is what its img/s
should be held to; a CPU's fp32 GEMM, what eager and ONNX Runtime fp32 can reach). torch is imported inside."""

from __future__ import annotations

import statistics
import time
from typing import Any

# The precisions torch can run a dense GEMM in on each device type (CPU fp16 GEMMs are reference loops on CPUs
# without AVX512-FP16: no ceiling worth the name; int8 engines are read against none). ``tf32``: float32 GEMMs on the
# tensor cores (TF32 inputs), what a TensorRT fp32 plan built with TF32 allowed (TensorRT's default) computes in.
DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "tf32", "bf16", "fp16")}


def peak_key(device: str, precision: str, tf32: bool = False) -> str | None:
    """``cuda:0 fp16``: the ceiling an engine on ``device`` computing in ``precision`` is read against (None: none).
    ``tf32``: the engine's float32 matmuls may run in TF32 (a TensorRT plan's ``tf32`` record): on a GPU, an fp32
    engine is then read against the TF32 ceiling (``cuda:0 tf32``), several times the strict fp32 one."""
    kind = str(device).split(":")[0]
    if precision == "fp32" and tf32 and kind == "cuda":
        precision = "tf32"
    return f"{device} {precision}" if precision in DTYPES.get(kind, ()) else None


def matmul_peak(device: str, precision: str, n: int | None = None, runs: int = 5, threads: int | None = None) -> float:
    """GFLOP/s of ``n`` x ``n`` x ``n`` matmuls (2 flops per multiply-add) on ``device`` in ``precision``: median of
    ``runs`` after two warm-ups. Default ``n``: 8192 on a GPU, 2048 on a CPU. CUDA fp32 is read with TF32 off
    (PyTorch's default for matmuls), as the fp32 engine runs; ``tf32``, float32 with TF32 on. ``threads``: torch's
    CPU threads while measuring (the engines' count, ``bench --threads``). Process-wide settings are put back after."""
    import torch

    f32 = torch.float32
    dtype = {"fp32": f32, "tf32": f32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = n or (8192 if cuda else 2048)
    if cuda:
        matmul = torch.backends.cuda.matmul
        before_tf32 = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            return _gemm_gflops(dev, dtype, n, runs)
        finally:
            matmul.allow_tf32 = before_tf32
    before = torch.get_num_threads()
    if not threads or threads == before:
        return _gemm_gflops(dev, dtype, n, runs)
    torch.set_num_threads(threads)
    try:
        return _gemm_gflops(dev, dtype, n, runs)
    finally:
        torch.set_num_threads(before)


def _gemm_gflops(dev: Any, dtype: Any, n: int, runs: int) -> float:
    import torch

    cuda = dev.type == "cuda"
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                a @ b
                dt = time.perf_counter() - t0
            if i >= 2:
                times.append(dt)
    return 2 * n**3 / statistics.median(times) / 1e9
