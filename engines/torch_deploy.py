"""The PyTorch deployment path in bf16/fp16 (``TorchEngine(cast="autocast")``): the network folded as the export
folds it, weights cast once, channels-last, run under ``torch.autocast`` with explicit FP32 islands.

Imports torch at its top (like :mod:`dtop_export.fold`); :mod:`dtop_export.engines.pytorch` imports this module
only when it builds such an engine.
"""

from __future__ import annotations

import functools

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
    """A GroupNorm computing in float32 with autocast off, its result rounded once to the input's dtype; timm's
    GroupNormAct's activation (and dropout) then runs on that low-precision result -- the same values as in float32
    (a ReLU commutes with the rounding), at half the bytes. Not a low-precision GroupNorm: PyTorch's kernel keeps a
    bf16/fp16 input's mean and 1/std in that dtype (CUDA; the CPU's fp16 channels-last path too), hundreds of ulps
    off where a group's mean is large against its spread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        drop, act = getattr(self, "drop", None), getattr(self, "act", None)  # timm's GroupNormAct
        y = drop(y) if isinstance(drop, nn.Module) else y
        return act(y) if isinstance(act, nn.Module) else y


class Fp32Layer:
    """Mixin for a convolution or linear layer that computes in float32 (float32 weights, autocast off) whatever its
    input's dtype, and returns ``out_dtype`` (None: float32)."""

    out_dtype: torch.dtype | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = super().forward(x.float())  # type: ignore[misc]
        return y if self.out_dtype is None else y.to(self.out_dtype)


@functools.cache
def _fp32_class(mixin: type, cls: type) -> type:
    return type("Fp32" + cls.__name__, (mixin, cls), {})


def make_fp32(m: nn.Module, mixin: type) -> bool:
    """Give ``m`` the float32 ``forward`` of ``mixin`` (a subclass of its own class, one per pair), once; whether it
    changed."""
    if isinstance(m, mixin):
        return False
    m.__class__ = _fp32_class(mixin, type(m))
    return True


def fp32_edges(net: DToP, dtype: torch.dtype) -> list[str]:
    """Keep the network's first and last layers in float32 (in place; returns their names): the first convolution,
    whose operands are the normalised pixels, and the linear projections to descriptor space (the global and local
    branches' and the head's FC), whose float32 output goes to the L2 norm and the whitening. A hybrid's first
    convolution rounds its output to ``dtype`` for the ResNet after it; a plain ViT's patch projection keeps float32
    (the token stream is float32 from the [CLS] concatenation on). Those layers are where the low precision's error
    becomes the descriptor's: on the demo's trained small checkpoint (Lw whitening, sample set, CPU) bf16 went from
    cos min 0.9808 to 0.9996 against fp32 (contract 0.999), fp16 from 0.99980 to 0.99999; the first convolution
    alone took bf16 to 0.9983 (0.9982 with its operands rounded as a GPU's TF32 would). ~0.4% of r50-vitb16's
    FLOPs (benchmarks/README.md, "Which layers decide the low-precision error")."""
    pe = net.encoder.patch_embed
    edges: dict[str, tuple[nn.Module, torch.dtype | None]] = {}
    first = next(((n, m) for n, m in pe.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        edges[f"encoder.patch_embed.{first[0]}"] = (first[1], dtype if net.encoder.is_hybrid else None)
    for part in ("global_branch", "local_branch", "head"):
        branch = getattr(net, part, None)
        for name, m in branch.named_modules() if branch is not None else ():
            if isinstance(m, nn.Linear):
                edges[f"{part}.{name}"] = (m, None)
    for m, out_dtype in edges.values():
        make_fp32(m, Fp32Layer)
        m.out_dtype = out_dtype
    return sorted(edges)


def fp32_islands(module: nn.Module) -> int:
    """Make every LayerNorm and GroupNorm of ``module`` an FP32 island (the norms TensorRT's FP16 builds keep in
    float32): it computes in float32 with autocast off and returns its input's dtype (a LayerNorm's is float32: the
    transformer's residual stream is float32 under autocast; the next matmul casts down). CUDA's autocast already
    runs these norms in float32; the CPU's runs them in the input's bf16/fp16, so the islands are made explicit,
    the same on every device. Returns how many norms became islands."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            count += make_fp32(m, Fp32LayerNorm)
        elif isinstance(m, nn.GroupNorm):
            count += make_fp32(m, Fp32GroupNorm)
    return count


def deploy_model(model: DToP, dtype: torch.dtype, edges: bool = True) -> nn.Module:
    """The network as exported (batchnorm and weight standardisation folded, head BN dropped) with conv and
    linear weights cast once to ``dtype`` (bf16/fp16) and channels-last memory: no per-call weight casts under
    autocast, and the blocked low-precision convolutions of oneDNN/cuDNN. The first and last layers stay float32
    (:func:`fp32_edges`; ``edges=False`` casts them too: what ``benchmarks/low_precision_edges.py`` starts from);
    LayerNorm and GroupNorm keep float32 parameters and become FP32 islands (:func:`fp32_islands`). Returns the
    folded DToP (raw descriptors)."""
    deploy, _ = fold_for_deployment(model, None)
    net = deploy.model
    if edges:
        fp32_edges(net, dtype)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, Fp32Layer):
            m.to(dtype)
    fp32_islands(net)
    return net.to(memory_format=torch.channels_last).eval()


class LowPrecisionDeploy(nn.Module):
    """images float32 [B, 3, H, W] -> float32 L2-normalised descriptors: :func:`deploy_model`'s network under
    ``torch.autocast(dtype)``, then the L2 norm in float32 with autocast off (an FP32 island; the engine's whitening
    follows in float32). What ``TorchEngine`` compiles when asked to."""

    def __init__(self, model: DToP, dtype: torch.dtype, device_type: str, edges: bool = True) -> None:
        super().__init__()
        self.net = deploy_model(model, dtype, edges)
        self.dtype, self.device_type = dtype, device_type

    @property
    def fp32_layers(self) -> list[str]:
        """The convolution and linear layers that compute in float32 (:func:`fp32_edges`), by name."""
        return [name for name, m in self.net.named_modules() if isinstance(m, Fp32Layer)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            u = self.net(images)
        with torch.autocast(device_type=self.device_type, enabled=False):
            return F.normalize(u.float(), dim=-1)
