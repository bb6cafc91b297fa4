"""DToP model (paper §3.3), one module per part: ``config`` (``DToPConfig``, presets, every paper choice),
``backbone`` (timm's hybrid ViT with static "same" padding), ``dpe`` (dynamic position embedding), ``elm``
(enhanced locality module) and ``dtop`` (branches, head, the model). Imports torch, timm and torchvision (and
``dtop_export.errors``) only: no runtime, no training, no engine."""

from dtop_export.model.config import DEFAULT_PRESET, PRESETS, DToPConfig, get_preset
from dtop_export.model.dpe import DynamicPosEmbed
from dtop_export.model.dtop import (
    DescriptorHead,
    DToP,
    GlobalBranch,
    LocalBranch,
    build_model,
    parameter_counts,
)
from dtop_export.model.elm import ASPP, EnhancedLocality, InvertedResidual, WaveBlock

__all__ = [
    "ASPP",
    "DEFAULT_PRESET",
    "PRESETS",
    "DToP",
    "DToPConfig",
    "DescriptorHead",
    "DynamicPosEmbed",
    "EnhancedLocality",
    "GlobalBranch",
    "InvertedResidual",
    "LocalBranch",
    "WaveBlock",
    "build_model",
    "get_preset",
    "parameter_counts",
]
