"""Image preprocessing contract shared by every engine: how pixels become the model's input tensor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dtop_export.errors import DToPError

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass
class PreprocessConfig:
    """What a deployer must do to an image before the model sees it.

    mean/std: per-channel normalisation of [0, 1] RGB pixels, from the backbone's pretraining.
    color_order: channel order of the input tensor (always ``RGB``).
    resize: ``longest_side`` resizes keeping the aspect ratio so the longer side is ``size``
        (1024 in the ROxford/RParis protocol), then rounds both sides to a multiple of ``stride``.
    stride: the model's total stride; H and W of the input must be multiples of it.
    interpolation: PIL resampling filter used for the resize.
    """

    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    color_order: str = "RGB"
    resize: str = "longest_side"
    size: int = 1024
    stride: int = 16
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DToPError(f"unknown preprocessing field(s) {', '.join(unknown)}: upgrade dtop-export")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", INCEPTION_MEAN)), tuple(d.get("std", INCEPTION_STD))
        return cls(**d)


def default_preprocess(backbone: str, stride: int) -> PreprocessConfig:
    """The normalisation the backbone was pretrained with (timm's pretrained config), else Inception's."""
    mean, std = INCEPTION_MEAN, INCEPTION_STD
    try:
        import timm

        if timm.is_model(backbone):
            pc = timm.get_pretrained_cfg(backbone)
            if pc is not None and pc.mean and pc.std:
                mean, std = tuple(pc.mean), tuple(pc.std)
    except ImportError:  # pragma: no cover - timm is a hard dependency
        pass
    return PreprocessConfig(mean=mean, std=std, stride=stride)
