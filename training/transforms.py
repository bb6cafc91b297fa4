"""What a training image goes through: random crop to the group's size, flip and illumination, then the
toolkit's one normalisation step (:func:`dtop_export.preprocess.normalize`), as a torch tensor.

Images are decoded by :func:`dtop_export.preprocess.load_image` (EXIF orientation, every PIL mode to RGB),
exactly as at inference.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.preprocess import load_image, normalize
from dtop_export.training.datasets import TrainSet

log = logging.getLogger(__name__)


@dataclass
class Augment:
    """Per-image augmentation, driven by an explicit seed so that a run is reproducible and resumable."""

    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    train: bool = True


def crop_resize(img: Any, out_hw: tuple[int, int], aug: Augment, rng: random.Random) -> Any:
    """Random crop with the target aspect ratio (area fraction in ``aug.scale``), resized to ``out_hw``.

    Without ``aug.train`` the crop is the largest centred one of that aspect ratio.
    """
    from PIL import Image

    oh, ow = out_hw
    w, h = img.size
    target = ow / oh
    # largest crop of the target aspect ratio inside the image
    cw, ch = (w, w / target) if w / h < target else (h * target, h)
    if aug.train:
        frac = rng.uniform(*aug.scale)
        cw, ch = cw * frac**0.5, ch * frac**0.5
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    else:
        x0, y0 = (w - cw) / 2, (h - ch) / 2
    box = (x0, y0, x0 + cw, y0 + ch)
    return img.resize((ow, oh), Image.Resampling.BILINEAR, box=box)


def augment_colour(img: Any, aug: Augment, rng: random.Random) -> Any:
    """Horizontal flip and illumination changes (brightness, contrast, saturation)."""
    from PIL import Image, ImageEnhance

    if not aug.train:
        return img
    if aug.hflip and rng.random() < aug.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for amount, enhancer in (
        (aug.brightness, ImageEnhance.Brightness),
        (aug.contrast, ImageEnhance.Contrast),
        (aug.saturation, ImageEnhance.Color),
    ):
        if amount > 0:
            img = enhancer(img).enhance(rng.uniform(1 - amount, 1 + amount))
    return img


def to_tensor(img: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """PIL RGB -> float32 torch tensor [3, H, W] normalised with mean/std (the inference normalisation)."""
    import torch

    return torch.from_numpy(normalize(img, mean, std))


class ImageDataset:
    """Map-style dataset indexed by the sampler's ``(index, height, width, seed)`` items.

    Returns ``(tensor [3, H, W], label, index)``, or ``None`` when the image cannot be decoded — the
    collate function drops it and counts it.
    """

    def __init__(self, ts: TrainSet, mean: Sequence[float], std: Sequence[float], aug: Augment | None = None) -> None:
        self.ts = ts
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug = aug or Augment()

    def __len__(self) -> int:
        return len(self.ts)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple | None:
        idx, h, w, seed = item
        rng = random.Random(seed)
        try:
            img = load_image(self.ts.paths[idx])
        except DToPError as e:
            log.warning("%s; dropped from its batch", e)
            return None
        img = augment_colour(crop_resize(img, (h, w), self.aug, rng), self.aug, rng)
        return to_tensor(img, self.mean, self.std), self.ts.labels[idx], idx


def collate(batch: list[tuple | None]) -> dict[str, Any]:
    """Stack one group's images; undecodable ones are dropped and counted in ``failed``."""
    import torch

    ok = [b for b in batch if b is not None]
    if not ok:
        return {"images": None, "labels": None, "indices": [], "failed": len(batch)}
    return {
        "images": torch.stack([b[0] for b in ok]),
        "labels": torch.tensor([b[1] for b in ok], dtype=torch.long),
        "indices": [b[2] for b in ok],
        "failed": len(batch) - len(ok),
    }
