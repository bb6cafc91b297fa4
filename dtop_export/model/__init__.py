"""DToP model (paper §3.3). Imports torch, timm and torchvision only."""

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
