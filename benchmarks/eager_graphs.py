"""Is the eager bf16/fp16 forward bound by the host? Per (size, batch): the time to issue one forward of the
PyTorch engine's deployment network (``TorchEngine(cast="autocast").model``) from Python, the time until its result
is ready, and on CUDA the same forward replayed from a CUDA graph (one launch, no Python, no dispatch).

An eager bf16 forward of r50-vitb16 issues ~620 top-level ATen ops, the small preset's ~270; at ~20-30 us of host
work each (``--device cpu --preset small --cells bf16:16:1``, where compute is nil: AMD EPYC Zen 4, 1-2 threads)
that is 12-19 ms a forward whatever the batch, like the 10-20 ms fixed cost per forward the H200's eager rows show
(b1 46 img/s, b8 272 img/s at 512²). If issue time ~ total time, the GPU waits on Python, and a CUDA graph (or
``compile=reduce-overhead``) is the lever at small batches; at large batches the GPU's own time dominates and only
fusion (``torch.compile``) helps.

    python benchmarks/eager_graphs.py --device cuda --preset r50-vitb16 --cells fp16:512:1,fp16:512:8,fp16:512:64
    python benchmarks/eager_graphs.py --device cpu --preset small --cells bf16:64:1      # a script check

Run by ``gpu_feed.py``'s ``graphs`` phase. Descriptors from the graph are checked against eager's (max-abs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def top_level_ops(model: Any, x: Any) -> int:
    """ATen ops one forward issues from Python (``torch.profiler``: ``aten::`` events without an ATen parent)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(1 for ev in prof.events() if ev.name.startswith("aten::") and ev.cpu_parent is None)


def graph_cell(engine: Any, size: int, batch: int, device: str, reps: int = 20) -> dict[str, Any]:
    """One (size, batch): eager issue and total ms per forward (median of ``reps``), and on CUDA the graph replay's."""
    import torch

    model = engine.model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    out: dict[str, Any] = {"size": size, "batch": batch}
    with torch.no_grad():
        for _ in range(3):
            ref = model(x)
        _sync(device)
        issue, total = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            ref = model(x)
            t1 = time.perf_counter()
            _sync(device)
            issue.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        out["eager_issue_ms"] = 1e3 * statistics.median(issue)
        out["eager_ms"] = 1e3 * statistics.median(total)
        out["ops_per_forward"] = top_level_ops(model, x)
        out["issue_us_per_op"] = 1e3 * out["eager_issue_ms"] / out["ops_per_forward"]
        out["eager_images_per_s"] = batch / statistics.median(total)
        if not device.startswith("cuda"):
            return out
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch's docs do
                for _ in range(3):
                    model(x)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                static_out = model(x)
            graph.replay()
            _sync(device)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                graph.replay()
                _sync(device)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a capture failure is a finding, not the end of the run
            out["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return out
        out["graph_ms"] = 1e3 * statistics.median(times)
        out["graph_images_per_s"] = batch / statistics.median(times)
        out["graph_speedup"] = out["eager_ms"] / out["graph_ms"]
        out["graph_max_abs_vs_eager"] = float((static_out.float() - ref.float()).abs().max())
    return out


def graphs_phase(ckpt: Path, device: str, cells: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Every cell; engines built once per precision."""
    from dtop_export.engines.pytorch import TorchEngine

    engines: dict[str, Any] = {}
    rows = []
    for precision, size, batch in cells:
        if precision not in engines:
            engines[precision] = TorchEngine.from_checkpoint(ckpt, device=device, precision=precision, cast="autocast")
        row = {"precision": precision, **graph_cell(engines[precision], size, batch, device)}
        rows.append(row)
        graph = row.get("graph_error", "")
        if "graph_ms" in row:
            diff = row["graph_max_abs_vs_eager"]
            graph = f", graph {row['graph_ms']:.1f} ms ({row['graph_speedup']:.2f}x, max-abs {diff:.1e})"
        print(f"graphs {precision} {size}² b{batch}: eager issue {row['eager_issue_ms']:.1f} ms of "
              f"{row['eager_ms']:.1f} ms ({row['ops_per_forward']} ops, {row['issue_us_per_op']:.1f} us each){graph}",
              flush=True)  # fmt: skip
    for engine in engines.values():
        engine.close()
    return {"rows": rows}


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    """``fp16:512:1,fp16:512:8`` -> [("fp16", 512, 1), ("fp16", 512, 8)]."""
    cells = []
    for item in text.split(","):
        precision, size, batch = item.strip().split(":")
        cells.append((precision, int(size), int(batch)))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: a random-init one of --preset")
    ap.add_argument("--cells", default="fp16:512:1,fp16:512:8,fp16:512:64")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import tempfile

    from dtop_export.checkpoint import random_checkpoint

    with tempfile.TemporaryDirectory(prefix="eager-graphs-") as tmp:
        ckpt = args.checkpoint or random_checkpoint(args.preset, Path(tmp) / "model.pt", seed=0, source="bench")
        result = graphs_phase(Path(ckpt), args.device, parse_cells(args.cells))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
