"""Fold a trained DToP model into its deployment form, in PyTorch, before export.

* every BatchNorm that follows a conv (IRB, ASPP, fuse projection) is folded into that conv;
* the head BN is dropped (paper §4.1, the default) or folded into the head FC (``head_bn_at_inference``);
* weight standardisation of the hybrid stem's ``StdConv2d`` layers is baked into constant weights
  (otherwise it exports as run-time ``BatchNormalization(training_mode=1)``, which TensorRT rejects);
* whitening (cirtorch: ``normalize(P·(x − m))`` on the L2-normalised descriptor) becomes one Linear
  layer with weight P and bias −P·m between two L2 normalisations.

The result, :class:`DToPDeploy`, maps images [B, 3, H, W] to final descriptors [B, d].
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from dtop_export.checkpoint import Whitening
from dtop_export.model import DToP
from dtop_export.model.backbone import StdConv2dStaticSame


class Conv2dStaticPad(nn.Conv2d):
    """A plain conv preceded by a constant asymmetric zero padding, where it has one (the symmetric part is the
    conv's own ``padding``)."""

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.static_pad) if any(self.static_pad) else x)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in a Sequential. Returns the count."""
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded


@torch.no_grad()
def bake_weight_standardization(module: nn.Module) -> int:
    """Replace each weight-standardised stem conv by a plain conv with the standardised weights."""
    count = 0
    for m in module.modules():
        if isinstance(m, StdConv2dStaticSame):
            m.weight.copy_(m.standardized_weight())
            m.__dict__.pop("_standardized", None)  # a cached copy (cache_weight_standardization) is of no use now
            m.__class__ = Conv2dStaticPad
            count += 1
    return count


def fold_head(model: DToP) -> None:
    """Drop the head BN (paper) or fold it into the head FC when the config keeps it at inference."""
    head = model.head
    if head.bn is not None and head.bn_at_inference:
        head.fc = fuse_linear_bn_eval(head.fc.eval(), head.bn.eval())
    head.bn = None


def whitening_layer(whitening: Whitening) -> nn.Linear:
    """Linear(N -> d) computing P·(x − m) = P·x − P·m."""
    proj, mean = whitening.proj.float(), whitening.mean.float()
    layer = nn.Linear(proj.shape[1], proj.shape[0])
    with torch.no_grad():
        layer.weight.copy_(proj)
        layer.bias.copy_(-(proj @ mean))
    return layer


class DToPDeploy(nn.Module):
    """Deployment graph: images [B, 3, H, W] -> L2-normalised (whitened) descriptors [B, d]."""

    def __init__(self, model: DToP, whitening: Whitening | None = None) -> None:
        super().__init__()
        self.model = model
        self.whiten = whitening_layer(whitening) if whitening is not None else None
        self.descriptor_dim = whitening.out_dim if whitening is not None else model.descriptor_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.model(images), dim=-1)
        if self.whiten is not None:
            x = F.normalize(self.whiten(x), dim=-1)
        return x


@torch.no_grad()
def fold_for_deployment(model: DToP, whitening: Whitening | None = None) -> tuple[DToPDeploy, dict[str, int]]:
    """A folded eval-mode copy of ``model`` (the original is untouched) and what was folded."""
    folded = copy.deepcopy(model).eval()
    stats = {
        "batchnorm_folded": fold_batchnorm(folded),
        "std_conv_baked": bake_weight_standardization(folded),
        "head_bn": int(model.head.bn is not None),
        "whitening": int(whitening is not None),
    }
    fold_head(folded)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if remaining:  # pragma: no cover - a new architecture piece that the folder does not know
        raise RuntimeError(f"BatchNorm left after folding: {remaining[:3]}")
    return DToPDeploy(folded, whitening).eval(), stats
