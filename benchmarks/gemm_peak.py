"""GEMM throughput of this CPU: the ceiling each precision can reach, to read a model's GFLOP/s against.

    python benchmarks/gemm_peak.py --runs 5

Times ``torch.matmul`` in fp32 and bf16 (oneDNN; AMX where the CPU has it) and ONNX Runtime's
``MatMulInteger`` (u8 x s8, VNNI/AMX kernels) on the shapes a ViT-B/16 forward at 512² spends its time in
(tokens x 768 x 3072 and square 2048). Reports the median GFLOP/s (2 flops per multiply-add) per shape.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

SHAPES = [(1025, 768, 3072), (1025, 3072, 768), (1025, 768, 768), (2048, 2048, 2048), (8200, 768, 3072)]


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_gemm(m: int, k: int, n: int, dtype: str, runs: int) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    with torch.inference_mode():
        s = _median_seconds(lambda: a @ b, runs)
    return 2 * m * k * n / s / 1e9


def ort_int8_gemm(m: int, k: int, n: int, runs: int, threads: int) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, (m, k), dtype=np.uint8)
    s = _median_seconds(lambda: sess.run(None, {"a": a}), runs)
    return 2 * m * k * n / s / 1e9


def main() -> None:
    from dtop_export.host import usable_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; torch {torch.__version__}; median of {args.runs} after a warm-up; GFLOP/s")
    print("| M x K x N | torch fp32 | torch bf16 | ORT u8s8 int8 |")
    print("|---|---:|---:|---:|")
    for m, k, n in SHAPES:
        f32 = torch_gemm(m, k, n, "fp32", args.runs)
        b16 = torch_gemm(m, k, n, "bf16", args.runs)
        i8 = ort_int8_gemm(m, k, n, args.runs, args.threads)
        print(f"| {m} x {k} x {n} | {f32:.0f} | {b16:.0f} | {i8:.0f} |", flush=True)


if __name__ == "__main__":
    main()
