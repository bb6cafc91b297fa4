"""Memory traffic of one forward pass of the PyTorch engine, op by op: what the GPU's eager path pays outside its
matmuls, counted on any machine (a CPU will do: the ops and their tensors are the device's).

    python benchmarks/forward_traffic.py --preset r50-vitb16 --size 512 --precision fp16 --json traffic.json

Each ATen op the engine's network dispatches (batch 1, the deployment path of ``TorchEngine``: autocast with FP32
islands for bf16/fp16) is counted with the bytes of its tensor inputs (weights included) and outputs: a lower
bound of the DRAM traffic of an unfused eager run (a kernel reads each input and writes each output at least once;
caches aside). Views, and ops that return their input (a cast to the same dtype, dropout at inference), move
nothing and are left out. ``--time`` adds the median wall time of the forward on this machine (CPU) for a
before/after comparison; run the script from two checkouts (``PYTHONPATH=…``) for the two sides. A measurement, not
a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unbind", "select", "slice", "expand", "detach",
    "alias", "flatten", "expand_as", "unsqueeze", "squeeze", "as_strided", "split", "chunk", "unflatten",
    "split_with_sizes", "narrow", "diagonal", "unfold", "view_as", "movedim",
}  # fmt: skip
MATMULS = {"convolution", "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "mkldnn_convolution",
           "_convolution", "linear", "conv2d", "scaled_dot_product_attention"}  # as ATen dispatches them  # fmt: skip


def tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors(o)]
    return []


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic(TorchDispatchMode):
    """bytes and counts per op (casts tagged with their dtypes), no-ops left out."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).replace("aten.", "")
        if name in VIEWS:
            return out
        kwargs = dict(kwargs or {})
        written = tensors(kwargs.pop("out", None))  # an out= tensor is written, not read
        ins, outs = tensors([args, kwargs]), tensors(out)
        in_place = name.endswith("_")  # relu_, add_, copy_: reads its other inputs, writes its first
        if in_place and ins:
            ins, outs = ins[1:] + ([ins[0]] if name != "copy_" else []), [ins[0]]
        elif written:
            outs = written
        elif outs and all(any(o is i or o.data_ptr() == i.data_ptr() for i in ins) for o in outs):
            return out  # returned an input (or a view of it): nothing moved
        tag = name
        if name in ("to", "_to_copy", "copy_") and ins and outs:
            tag = f"cast {ins[0].dtype}->{outs[0].dtype}".replace("torch.", "")
            if ins[0].dtype == outs[0].dtype:
                tag = "copy"
        self.bytes[tag] += sum(map(nbytes, ins)) + sum(map(nbytes, outs))
        self.count[tag] += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp16")
    ap.add_argument("--time", type=int, default=0, metavar="RUNS", help="also time RUNS forward passes (CPU)")
    ap.add_argument("--batch", type=int, default=1, help="batch of the timed runs (the count is per image)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).eval()
    pp = default_preprocess(model.cfg.backbone, model.stride)
    cast = "autocast" if args.precision != "fp32" else None
    engine = TorchEngine(model, pp, precision=args.precision, cast=cast)
    x = torch.randn(1, 3, args.size, args.size)
    traffic = Traffic()
    with torch.inference_mode(), traffic:
        engine._descriptors(x)
    total = sum(traffic.bytes.values())
    matmul = sum(v for k, v in traffic.bytes.items() if k in MATMULS)
    ops = sum(traffic.count.values())
    print(f"{args.preset} {args.precision} {args.size}²: {total / 1e9:.2f} GB per image in {ops} ops; "
          f"{(total - matmul) / 1e9:.2f} GB outside convolutions, matmuls and attention")  # fmt: skip
    print("| op | ops | GB per image |\n|---|---:|---:|")
    for k, v in traffic.bytes.most_common(20):
        print(f"| {k} | {traffic.count[k]} | {v / 1e9:.3f} |")
    result: dict[str, Any] = {
        "preset": args.preset, "size": args.size, "precision": args.precision, "torch": torch.__version__,
        "gb_per_image": total / 1e9, "gb_outside_matmuls": (total - matmul) / 1e9,
        "ops": ops,
        "by_op": {k: {"ops": traffic.count[k], "gb": v / 1e9} for k, v in traffic.bytes.most_common()},
    }  # fmt: skip
    if args.time:
        xb = torch.randn(args.batch, 3, args.size, args.size)
        with torch.inference_mode():
            engine._descriptors(xb)  # warm-up (oneDNN primitive creation)
            times = []
            for _ in range(args.time):
                t0 = time.perf_counter()
                engine._descriptors(xb)
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        result.update(batch=args.batch, threads=torch.get_num_threads(), median_ms=ms, cpu=platform.processor())
        print(f"forward at batch {args.batch}, {torch.get_num_threads()} threads: median {ms:.1f} ms of {args.time}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
