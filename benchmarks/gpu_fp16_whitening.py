"""Real FP16 arithmetic on a CUDA GPU, whitening learned exactly (cirtorch Lw) or with Ledoit-Wolf shrinkage.

For each trained checkpoint (``LABEL=final.pt``, e.g. ``train/final.pt`` of ``dtop-export demo --seed S``):
learns both whitenings on the embedded training set (rebuilt here, offline), then compares PyTorch fp32 on
the CPU (the reference) with the same checkpoint on the GPU in FP16, on the embedded sample set, through
``dtop_export.parity`` (descriptor cosine, mAP delta, the FP16 contract cos >= 0.999, |ΔmAP| <= 0.2):

* ``half``: ``model.half()``: every op in FP16, LayerNorm, Softmax and L2 norms included (harsher than a
  TensorRT FP16 engine);
* ``autocast``: ``torch.autocast(float16)``: matmuls and convolutions in FP16 on tensor cores, norms,
  softmax and reductions in FP32, the closest PyTorch gets to TensorRT FP16 with FP32 islands.

The whitening itself runs in FP32 in both (as it does in every dtop-export artefact). No TensorRT needed.

    python benchmarks/gpu_fp16_whitening.py seed0=runs/seed0/train/final.pt --json gpu_fp16.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def autocast_engine(path: str, device: str) -> Any:
    """TorchEngine fp32 on ``device`` whose forward runs under ``torch.autocast(float16)``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dtop_export.engines.pytorch import TorchEngine

    class AutocastFp16(TorchEngine):
        name = "pytorch-autocast"

        def embed(self, images: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(self.check_images(images)).to(self.device)
            with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16):
                u = self.model(x)
            d = F.normalize(u.float(), dim=-1)
            if self.whitening is not None:
                d = self.whitening.apply(d)
            return d.cpu().numpy().astype(np.float32)

    engine = AutocastFp16.from_checkpoint(path, device=device)
    engine.precision = "fp16"  # held to the FP16 contract
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="LABEL=trained-checkpoint.pt")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="half,autocast")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.parity import parity
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.training.sample import build_training_sample
    from dtop_export.training.whitening import whiten_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tmp = Path(tempfile.mkdtemp(prefix="dtop-gpu-fp16-"))
    ds = resolve_dataset("sample", tmp / "data")
    train_root = build_training_sample(tmp / "train-sample")
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for spec in args.checkpoints:
        label, path = spec.split("=", 1)
        for variant, shrink in (("exact Lw", 0.0), ("Ledoit-Wolf", "auto")):
            out = tmp / f"{label}-{shrink}.pt"
            _, wh = whiten_checkpoint(path, out, pairs=train_root, size=ds.image_size or 256, progress=False,
                                      shrinkage=shrink)  # fmt: skip
            ref = TorchEngine.from_checkpoint(out)
            engines = []
            if "half" in modes:
                engines.append(TorchEngine.from_checkpoint(out, precision="fp16", device=args.device))
            if "autocast" in modes:
                engines.append(autocast_engine(str(out), args.device))
            report = parity(ref, engines, ds, progress=False)
            cond = wh.info["condition_number"]
            print(f"## {label}, {variant}: shrinkage {wh.info['shrinkage']:.3f}, cond(P) {cond:.0f}")
            print(report.table(), flush=True)
            for e, r in zip(engines, report.engines):
                rows.append(
                    {
                        "label": label,
                        "whitening": variant,
                        "mode": "autocast" if e.name == "pytorch-autocast" else "half",
                        "shrinkage": wh.info["shrinkage"],
                        "condition_number": wh.info["condition_number"],
                        "cosine_min": r.cosine_min,
                        "cosine_mean": r.cosine_mean,
                        "map_delta": r.map_delta,
                        "map_fp32": report.reference.get("map"),
                        "passed": r.passed,
                    }
                )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
