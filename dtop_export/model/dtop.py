"""The DToP model: encoder, global branch, local branch and head (paper §3.3, Fig. 1)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from dtop_export.model.backbone import ViTEncoder, create_vit
from dtop_export.model.config import DToPConfig
from dtop_export.model.elm import EnhancedLocality


class GlobalBranch(nn.Module):
    """Multi-layer [CLS] features (Eq. 5) -> FC (Eq. 7): [B, k·D] -> [B, N]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(cls_tokens)


class LocalBranch(nn.Module):
    """Multi-layer patch features (Eq. 6) -> u_p (Eq. 8-10): [B, k·D, h, w] -> [B, N].

    Y = conv1x1(F_p) (kD -> D); Y' = FUSE(Y, ELM(Y)); u_p = FC(GAP(Y')).
    """

    def __init__(self, cfg: DToPConfig, in_dim: int, dim: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.fuse = cfg.fuse
        self.elm: nn.Module | None = None
        if cfg.elm:
            self.elm = EnhancedLocality(
                dim,
                expansion=cfg.irb_expansion,
                rates=cfg.aspp_rates,
                separable_aspp=cfg.aspp_separable,
                waveblock=cfg.waveblock,
                wave_ratio=cfg.waveblock_ratio,
                wave_rate=cfg.waveblock_rate,
            )
        self.fuse_proj = Conv2dNormActivation(2 * dim, dim, kernel_size=1) if cfg.elm and cfg.fuse == "concat" else None
        self.fc = nn.Linear(dim, cfg.descriptor_dim)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        y = self.reduce(patch_features)
        if self.elm is not None:
            e = self.elm(y)
            if self.fuse == "sum":
                y = y + e
            elif self.fuse == "max":
                y = torch.maximum(y, e)
            else:
                y = self.fuse_proj(torch.cat([y, e], dim=1))
        return self.fc(y.mean(dim=(2, 3)))


class DescriptorHead(nn.Module):
    """u = BN(FC(Dropout([u_c; u_p]))) (Eq. 12): [B, n·N] -> [B, N].

    The BN is used in training; at inference it is skipped unless ``bn_at_inference`` (paper: removed).
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float, bn: bool, bn_at_inference: bool) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim) if bn else None
        self.bn_at_inference = bn_at_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.dropout(x))
        if self.bn is not None and (self.training or self.bn_at_inference):
            x = self.bn(x)
        return x


class DToP(nn.Module):
    """Deep token pooling: images [B, 3, H, W] (H, W multiples of ``stride``) -> descriptors [B, N].

    ``forward`` returns the raw head output u; :meth:`descriptors` returns it L2-normalised.
    Whitening is not part of the module: it lives in the checkpoint and is folded in on export.
    """

    def __init__(self, cfg: DToPConfig, vit: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(vit, cfg.num_layers, cfg.pos_embed_mode, cfg.norm_features)
        d, k, n = self.encoder.embed_dim, cfg.num_layers, cfg.descriptor_dim
        parts = cfg.branches
        # Multi-layer [CLS] (global branch) or the plain last-layer [CLS] (the baseline).
        self.cls_layers = k if cfg.global_branch else 1
        self.global_branch = GlobalBranch(self.cls_layers * d, n) if "cls" in parts else None
        self.local_branch = LocalBranch(cfg, k * d, d) if "local" in parts else None
        self.head = DescriptorHead(len(parts) * n, n, cfg.dropout, cfg.head_bn, cfg.head_bn_at_inference)

    @property
    def stride(self) -> int:
        return self.encoder.stride

    @property
    def descriptor_dim(self) -> int:
        return self.cfg.descriptor_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layers, (h, w) = self.encoder(images)
        parts = []
        if self.global_branch is not None:
            cls = torch.cat([z[:, 0] for z in layers[-self.cls_layers :]], dim=1)  # [B, k·D]
            parts.append(self.global_branch(cls))
        if self.local_branch is not None:
            b = images.shape[0]
            # [B, h·w, D] per layer -> [B, k·D, h, w]
            patches = torch.cat([z[:, 1:] for z in layers], dim=2)
            fmap = patches.transpose(1, 2).reshape(b, -1, h, w)
            parts.append(self.local_branch(fmap))
        return self.head(torch.cat(parts, dim=1))

    def descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised descriptors [B, N]."""
        return F.normalize(self.forward(images), dim=-1)


def build_model(
    cfg: DToPConfig,
    pretrained: bool = False,
    backbone_weights: str | Path | None = None,
) -> DToP:
    """Build a DToP model. Offline by default: random-init backbone unless asked otherwise."""
    vit = create_vit(
        cfg.backbone,
        cfg.img_size,
        pretrained=pretrained,
        weights_file=backbone_weights,
        **cfg.backbone_kwargs,
    )
    return DToP(cfg, vit)


def parameter_counts(model: DToP) -> dict[str, int]:
    """Parameters per component: stem (CNN or patch projection), encoder, DPE, branches, head, total; the components
    add up to the total, ``local_branch.elm`` is the part of ``local_branch`` in its ELM (not counted twice)."""

    def count(m: nn.Module | None) -> int:
        return 0 if m is None else sum(p.numel() for p in m.parameters())

    enc = model.encoder
    counts = {
        "stem": count(enc.patch_embed),
        "transformer": count(enc.blocks) + count(enc.norm) + count(enc.norm_pre) + enc.cls_token.numel(),
        "pos_embed": count(enc.pos_embed),
        "global_branch": count(model.global_branch),
        "local_branch": count(model.local_branch),
        "local_branch.elm": count(model.local_branch.elm) if model.local_branch is not None else 0,
        "head": count(model.head),
    }
    counts["total"] = count(model)
    return counts
