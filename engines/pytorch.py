"""The PyTorch engine: the reference every exported artifact is compared against."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engines.base import Engine

if TYPE_CHECKING:
    from dtop_export.checkpoint import Checkpoint, Whitening
    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig


class TorchEngine(Engine):
    """Eager PyTorch on CPU/CUDA: ``normalize(whiten(normalize(model(x))))`` like the exported graph.

    precision: ``fp32`` (reference), ``bf16`` (CPU/CUDA autocast) or ``fp16`` (``model.half()``; slow but
    exact FP16 arithmetic on a CPU, for accuracy audits).
    """

    name = "pytorch"

    def __init__(
        self,
        model: DToP,
        preprocess: PreprocessConfig,
        whitening: Whitening | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        source: Path | None = None,
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if precision not in ("fp32", "bf16", "fp16"):
            from dtop_export.errors import DToPError

            raise DToPError(f"pytorch engine precision must be fp32, bf16 or fp16, got {precision!r}")
        self.model = model.eval().to(device)
        if precision == "fp16":
            self.model = self.model.half()
        self.whitening = whitening
        self.precision = precision
        self.device = device
        self.preprocess = preprocess
        self.stride = model.stride
        self.descriptor_dim = whitening.out_dim if whitening is not None else model.descriptor_dim
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | Path, whiten: bool = True, **kwargs: object) -> TorchEngine:
        from dtop_export.checkpoint import load_checkpoint

        ckpt: Checkpoint = load_checkpoint(path)
        return cls(
            ckpt.build_model(),
            ckpt.preprocess,
            whitening=ckpt.whitening if whiten else None,
            source=Path(path),
            **kwargs,  # type: ignore[arg-type]
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(self._check_images(images)).to(self.device)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    u = self.model(x)
            elif self.precision == "fp16":
                u = self.model(x.half())
            else:
                u = self.model(x)
            d = F.normalize(u.float(), dim=-1)
            if self.whitening is not None:
                d = self.whitening.apply(d)
        return d.cpu().numpy().astype(np.float32)
