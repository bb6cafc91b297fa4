"""Optimiser with decay-free norms/biases/position embedding/[CLS], and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dtop_export.training.config import OptimSection

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases (1-D tensors), the position embedding and the [CLS] token get no decay."""
    return param.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)


def _encoder_layer(name: str, depth: int) -> int:
    """0 for the stem, [CLS] and position embedding; i + 1 for block i; depth + 1 for the final norm."""
    rest = name[len("model.encoder.") :]
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    if rest.startswith("norm."):
        return depth + 1
    return 0


def param_groups(model: nn.Module, head: nn.Module | None, cfg: OptimSection) -> list[dict[str, Any]]:
    """Parameter groups by (LR multiplier, weight decay or not).

    Multipliers: the transformer encoder (stem, blocks, position embedding) gets ``backbone_lr_mult``, times
    ``layer_decay ** (depth + 1 - layer)`` with layer-wise decay (the stem lowest, the last block highest);
    the DToP branches and head get 1; the ArcFace class weights ``head_lr_mult``.
    """
    depth = sum(
        1 for n, _ in model.named_parameters() if n.startswith("encoder.blocks.") and n.endswith("norm1.weight")
    )
    buckets: dict[tuple[str, float, bool], list[torch.Tensor]] = {}
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    if head is not None:
        named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            part, mult = "head", cfg.head_lr_mult
        elif name.startswith("model.encoder."):
            layer = _encoder_layer(name, depth)
            part = f"backbone{layer}" if cfg.layer_decay != 1.0 else "backbone"
            mult = cfg.backbone_lr_mult * cfg.layer_decay ** (depth + 1 - layer)
        else:
            part, mult = "rest", 1.0
        buckets.setdefault((part, mult, no_weight_decay(name, p)), []).append(p)
    groups = []
    for (part, mult, nd), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "weight_decay": 0.0 if nd else cfg.weight_decay,
                "lr": cfg.lr * mult,
                "lr_mult": mult,
                "name": f"{part}{'_no_decay' if nd else ''}",
            }
        )
    return groups


def build_optimizer(model: nn.Module, head: nn.Module | None, cfg: OptimSection) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, head, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine from 1 to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step LambdaLR applying :func:`lr_factor` to every group's base LR."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup_steps, min_ratio))
