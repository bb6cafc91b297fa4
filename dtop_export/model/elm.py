"""Local-branch building blocks: WaveBlock, inverted residual, ASPP and the enhanced locality module.

ELM(Y) = ASPP(WB(IRB(WB(Y))))   (paper Eq. 11, Fig. 2b)
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops import Conv2dNormActivation

__all__ = ["ASPP", "EnhancedLocality", "InvertedResidual", "WaveBlock"]


class WaveBlock(nn.Module):
    """WaveBlock feature augmentation (Wang et al., TIP 2022). Identity in eval mode.

    In training, for every sample a random horizontal band of ``round(ratio·h)`` rows is kept as is
    and every other row of the [B, C, h, w] feature map is multiplied by ``rate``.
    """

    def __init__(self, ratio: float = 0.3, rate: float = 1.5) -> None:
        super().__init__()
        self.ratio = ratio
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, _, h, _ = x.shape
        band = max(1, round(self.ratio * h))
        start = torch.randint(0, h - band + 1, (b, 1), device=x.device)
        rows = torch.arange(h, device=x.device).unsqueeze(0)
        keep = (rows >= start) & (rows < start + band)  # [B, h]
        scale = torch.where(keep, 1.0, self.rate).to(x.dtype)
        return x * scale[:, None, :, None]

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, rate={self.rate}"


class ASPP(nn.Module):
    """À trous spatial pyramid pooling as the paper describes it: [B, D, h, w] -> [B, D, h, w].

    One 3x3 conv-BN-ReLU branch per dilation rate (D->D), the n outputs concatenated and reduced nD->D
    by a 1x1 conv-BN-ReLU. ``separable`` swaps each dilated conv for depthwise (dilated) + pointwise.
    """

    def __init__(self, dim: int, rates: tuple[int, ...] = (6, 12, 18), separable: bool = False) -> None:
        super().__init__()
        branches = []
        for r in rates:
            if separable:
                branches.append(
                    nn.Sequential(
                        nn.Conv2d(dim, dim, 3, padding=r, dilation=r, groups=dim, bias=False),
                        Conv2dNormActivation(dim, dim, kernel_size=1),
                    )
                )
            else:
                branches.append(Conv2dNormActivation(dim, dim, kernel_size=3, dilation=r))
        self.branches = nn.ModuleList(branches)
        self.project = Conv2dNormActivation(len(rates) * dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class EnhancedLocality(nn.Module):
    """Enhanced locality module (ELM): ASPP(WB(IRB(WB(Y)))), [B, D, h, w] -> [B, D, h, w]."""

    def __init__(
        self,
        dim: int,
        expansion: float = 2.0,
        rates: tuple[int, ...] = (6, 12, 18),
        separable_aspp: bool = False,
        waveblock: bool = True,
        wave_ratio: float = 0.3,
        wave_rate: float = 1.5,
    ) -> None:
        super().__init__()
        self.wave_in = WaveBlock(wave_ratio, wave_rate) if waveblock else nn.Identity()
        self.irb = InvertedResidual(dim, dim, stride=1, expand_ratio=expansion)
        self.wave_out = WaveBlock(wave_ratio, wave_rate) if waveblock else nn.Identity()
        self.aspp = ASPP(dim, rates, separable=separable_aspp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.wave_out(self.irb(self.wave_in(x))))
