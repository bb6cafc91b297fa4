"""Dynamic position embedding (DPE, paper §3.3, Eq. 2, Fig. 2a)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DynamicPosEmbed(nn.Module):
    """Learnable position embeddings on a fixed w'×h' grid, resampled to each batch's w×h.

    The parameter ``weight`` is P' = [p_cls; p'_1 … p'_M'] of shape [1, 1 + h'·w', D]. For a batch
    whose token grid is h×w, the patch rows are unfolded to [1, D, h', w'], resampled to [1, D, h, w]
    (no antialias, half-pixel centres, so ONNX ``Resize`` and TensorRT reproduce it), folded back and
    the [CLS] row is prepended unchanged. At the native grid the resampling is the identity.

    The target size is taken from tensors' shapes only, never from Python ints computed outside the
    graph, so a traced/exported model keeps the resampling dynamic.
    """

    def __init__(self, grid_size: tuple[int, int], dim: int, mode: str = "bicubic") -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.dim = dim
        self.mode = mode
        self.weight = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    @torch.no_grad()
    def load_from(self, pos_embed: torch.Tensor) -> None:
        """Initialise from a backbone's [1, 1 + M', D] position embedding (e.g. timm's ``pos_embed``)."""
        if pos_embed.shape != self.weight.shape:
            raise ValueError(f"position embedding shape {tuple(pos_embed.shape)} != {tuple(self.weight.shape)}")
        self.weight.copy_(pos_embed)

    def forward(self, height: int | torch.SymInt, width: int | torch.SymInt) -> torch.Tensor:
        """Position embeddings for a ``height``×``width`` token grid: [1, 1 + height·width, D]."""
        gh, gw = self.grid_size
        cls_pe = self.weight[:, :1]
        grid = self.weight[:, 1:].reshape(1, gh, gw, self.dim).permute(0, 3, 1, 2)  # [1, D, h', w']
        grid = F.interpolate(grid, size=(height, width), mode=self.mode, align_corners=False, antialias=False)
        patch_pe = grid.flatten(2).transpose(1, 2)  # [1, h·w, D]
        return torch.cat([cls_pe, patch_pe], dim=1)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, dim={self.dim}, mode={self.mode}"
