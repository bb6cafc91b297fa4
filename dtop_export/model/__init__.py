"""DToP model (paper §3.3), one module per part: ``config`` (``DToPConfig``, presets, every paper choice),
``backbone`` (timm's hybrid ViT with static "same" padding), ``dpe`` (dynamic position embedding), ``elm``
(enhanced locality module) and ``dtop`` (branches, head, the model). Imports torch, timm and torchvision (and
``dtop_export.errors``) only: no runtime, no training, no engine.

The names below load their module on first use, so that ``dtop_export.model.config`` (what a checkpoint's
contract needs: a corpus job's driver, ``info``) imports without torch, timm and torchvision."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dtop_export.model.config import DEFAULT_PRESET, PRESETS, DToPConfig, get_preset

if TYPE_CHECKING:
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

_LAZY = {
    "DynamicPosEmbed": "dpe",
    **dict.fromkeys(
        ["DescriptorHead", "DToP", "GlobalBranch", "LocalBranch", "build_model", "parameter_counts"], "dtop"
    ),
    **dict.fromkeys(["ASPP", "EnhancedLocality", "InvertedResidual", "WaveBlock"], "elm"),
}


def __getattr__(name: str) -> Any:  # noqa: ANN401 - a class or a function
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
