"""Which layers of the bf16/fp16 deployment path decide its error against fp32: the parity of the PyTorch engine
(``TorchEngine(precision=..., cast="autocast")``) on an evaluation set with chosen parts of the network computed in
float32 instead (float32 weights, autocast off), one row per variant.

    python benchmarks/low_precision_edges.py dtop-demo/model.pt --data-root dtop-demo/data --precision bf16 \\
        --variants engine,none,conv1,stem,head,conv1+global+local-fc+head --json edges.json

Parts: ``conv1`` (the first convolution, on the normalised pixels; ``conv1-tf32`` with its operands rounded to 10
mantissa bits as a GPU's TF32 does; ``conv1-lowout`` with its output rounded to the engine's precision), ``stem``
(the hybrid's whole ResNet and the patch projection), ``blocksN`` (the last N transformer blocks), ``global`` /
``local`` (the branches), ``local-fc`` (the local branch's FC only), ``head``, ``branches`` (both). Every variant
starts from the engine without its own float32 layers (:func:`~dtop_export.engines.torch_deploy.fp32_edges`);
``none`` is that engine, ``engine`` the engine as it is (``engine+stem``: with the stem on top). ``conv1*`` and
``stem`` need a hybrid (ResNet stem). A measurement on the CPU, not a test; ~10 s per variant for the small preset.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from torch import nn


class Float32Part(nn.Module):
    """``module`` in float32 with autocast off; its output rounded to ``out_dtype`` (None: float32). ``tf32``:
    operands rounded to 10 mantissa bits first (fp16 for these magnitudes), the arithmetic of a TF32 convolution."""

    def __init__(self, module: nn.Module, out_dtype: torch.dtype | None = None, tf32: bool = False) -> None:
        super().__init__()
        self.m, self.out_dtype, self.tf32 = module.float(), out_dtype, tf32
        if tf32:
            with torch.no_grad():
                for p in self.m.parameters():
                    p.copy_(p.half().float())

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xs[0].device.type, enabled=False):
            y = self.m(*[x.float().half().float() if self.tf32 else x.float() for x in xs])
        return y if self.out_dtype is None else y.to(self.out_dtype)


def apply_variant(net: nn.Module, fp32net: nn.Module, parts: list[str], low: torch.dtype) -> None:
    """Swap ``parts`` of the low-precision network ``net`` for float32 copies from ``fp32net`` (same structure)."""
    for part in parts:
        if part.startswith("conv1"):
            stem, stem32 = net.encoder.patch_embed.backbone.stem, fp32net.encoder.patch_embed.backbone.stem
            out = low if part == "conv1-lowout" else None
            stem.conv = Float32Part(copy.deepcopy(stem32.conv), out, tf32=part == "conv1-tf32")
        elif part == "stem":
            pe, pe32 = net.encoder.patch_embed, fp32net.encoder.patch_embed
            pe.backbone, pe.proj = Float32Part(copy.deepcopy(pe32.backbone)), Float32Part(copy.deepcopy(pe32.proj))
        elif part.startswith("blocks"):
            blocks = net.encoder.blocks
            for i in range(len(blocks) - int(part[6:]), len(blocks)):
                blocks[i] = Float32Part(copy.deepcopy(fp32net.encoder.blocks[i]))
        elif part == "local-fc":
            net.local_branch.fc = Float32Part(copy.deepcopy(fp32net.local_branch.fc))
        else:
            names = {"global": ["global_branch"], "local": ["local_branch"], "head": ["head"],
                     "branches": ["global_branch", "local_branch"]}[part]  # fmt: skip
            for name in names:
                if getattr(net, name, None) is not None:
                    setattr(net, name, Float32Part(copy.deepcopy(getattr(fp32net, name))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dataset", default="sample")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--variants", default="engine,none,conv1,conv1+head,conv1+global+local-fc+head")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import dtop_export.engines.torch_deploy as deploy
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.fold import fold_for_deployment
    from dtop_export.parity import parity
    from dtop_export.retrieval.datasets import resolve_dataset

    ckpt = load_checkpoint(args.checkpoint)
    ds = resolve_dataset(args.dataset, args.data_root)
    low = torch.bfloat16 if args.precision == "bf16" else torch.float16
    fp32net = fold_for_deployment(ckpt.build_model().eval(), None)[0].model
    variants = [[p for p in v.split("+") if p != "none"] for v in args.variants.split(",")]
    engines = []
    hybrid = bool(fp32net.encoder.is_hybrid)
    for parts in variants:
        if not hybrid and {"conv1", "conv1-tf32", "conv1-lowout", "stem"} & set(parts):
            raise SystemExit(f"{args.checkpoint} is a plain ViT: conv1* and stem name a hybrid's ResNet stem")
        engine = TorchEngine.from_checkpoint(args.checkpoint, precision=args.precision, cast="autocast")
        if "engine" in parts:  # the engine's own float32 layers, and any parts on top
            parts = [p for p in parts if p != "engine"]
        else:  # the variants start from the engine without its own float32 layers
            engine.model = deploy.LowPrecisionDeploy(ckpt.build_model().eval(), low, "cpu", edges=False)
        apply_variant(engine.model.net, fp32net, parts, low)
        engines.append(engine)
    report = parity(TorchEngine.from_checkpoint(args.checkpoint), engines, ds, progress=False).to_dict()
    rows: list[dict[str, Any]] = []
    print(f"{args.checkpoint}, {args.precision}, {ds.name}: parity against fp32 with these parts in float32")
    print("| float32 parts | cos min | cos mean | ΔmAP E / M / H | contract |\n|---|---:|---:|---|---|")
    ref_map = report["reference"]["map"]
    for name, e in zip(args.variants.split(","), report["engines"]):
        delta = [e["map"][k] - ref_map[k] for k in ("easy", "medium", "hard")]
        rows.append({"variant": name, "cosine_min": e["cosine_min"], "cosine_mean": e["cosine_mean"],
                     "map_delta": delta, "passed": e["passed"]})  # fmt: skip
        print(f"| {name} | {e['cosine_min']:.6f} | {e['cosine_mean']:.7f} | "
              + " / ".join(f"{d:+.2f}" for d in delta) + f" | {'PASS' if e['passed'] else 'FAIL'} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "precision": args.precision, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
