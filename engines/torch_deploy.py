"""The PyTorch deployment path in bf16/fp16 (``TorchEngine(cast="autocast")``): the network folded as the export
folds it, weights cast once, channels-last, run under ``torch.autocast`` with explicit FP32 islands.

Imports torch at its top (like :mod:`dtop_export.fold`); :mod:`dtop_export.engines.pytorch` imports this module
only when it builds such an engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtop_export.fold import fold_for_deployment
from dtop_export.model import DToP


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm that computes in float32 with autocast off and returns float32, whatever its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class Fp32GroupNorm(nn.GroupNorm):
    """A GroupNorm (timm's GroupNormAct included: its activation follows) that reads and writes its parameters'
    dtype with autocast off: with bf16/fp16 parameters (:func:`deploy_model`) the native kernel's statistics and
    affine run in float32 on the low-precision activations, without the two cast passes (and the float32
    activation after it) that a float32 copy of the input costs -- the same arithmetic, but for the parameters'
    rounding; the ResNet stem's 52 GroupNorms moved ~1.3 GB per 512² image that way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def fp32_islands(module: nn.Module) -> int:
    """Make every LayerNorm and GroupNorm of ``module`` an FP32 island (the norms TensorRT's FP16 builds keep in
    float32), the same on every device (CUDA's autocast runs these norms in float32, the CPU's in the input's
    bf16/fp16): a LayerNorm takes float32 (the transformer's residual stream is float32 under autocast) and
    returns it, which the next matmul casts down; a GroupNorm computes in float32 inside the kernel on the
    low-precision activations of the convolutions around it (:class:`Fp32GroupNorm`). Returns how many norms."""
    count = 0
    for m in module.modules():
        if isinstance(m, (Fp32LayerNorm, Fp32GroupNorm)):
            continue
        if isinstance(m, nn.LayerNorm):
            m.__class__ = type("Fp32" + type(m).__name__, (Fp32LayerNorm, type(m)), {})
            count += 1
        elif isinstance(m, nn.GroupNorm):
            m.__class__ = type("Fp32" + type(m).__name__, (Fp32GroupNorm, type(m)), {})
            count += 1
    return count


def deploy_model(model: DToP, dtype: torch.dtype) -> nn.Module:
    """The network as exported (batchnorm and weight standardisation folded, head BN dropped) with conv, linear
    and GroupNorm weights cast once to ``dtype`` (bf16/fp16) and channels-last memory: no per-call weight casts
    under autocast, and the blocked low-precision convolutions of oneDNN/cuDNN. LayerNorms keep float32
    parameters; both kinds of norm become FP32 islands (:func:`fp32_islands`). Returns the folded DToP (raw
    descriptors)."""
    deploy, _ = fold_for_deployment(model, None)
    net = deploy.model
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm)):
            m.to(dtype)
    fp32_islands(net)
    return net.to(memory_format=torch.channels_last).eval()


class LowPrecisionDeploy(nn.Module):
    """images float32 [B, 3, H, W] -> float32 L2-normalised descriptors: :func:`deploy_model`'s network under
    ``torch.autocast(dtype)``, then the L2 norm in float32 with autocast off (an FP32 island; the engine's whitening
    follows in float32). What ``TorchEngine`` compiles when asked to."""

    def __init__(self, model: DToP, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.net = deploy_model(model, dtype)
        self.dtype, self.device_type = dtype, device_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            u = self.net(images)
        with torch.autocast(device_type=self.device_type, enabled=False):
            return F.normalize(u.float(), dim=-1)
