"""Descriptors straight from the PyTorch model (training never goes through ``engines``).

Used for hard-negative mining, whitening and in-training validation. Images go through the toolkit's
shared preprocessing (``dtop_export.preprocess``: EXIF orientation, RGB, longer side = ``size·scale``
with sides rounded to the stride, mean/std); multi-scale descriptors average the L2-normalised
descriptors of each scale, then L2-normalise (cirtorch) — exactly what evaluation and the engines do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig


@torch.no_grad()
def _forward(model: DToP, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(x).float(), dim=-1)


@torch.no_grad()
def embed_paths(
    model: DToP,
    paths: Sequence[str],
    preprocess: PreprocessConfig,
    size: int,
    scales: Sequence[float] = (1.0,),
    bboxes: Sequence[Sequence[float] | None] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int], Any] | None = None,
    failed: list[int] | None = None,
) -> torch.Tensor:
    """L2-normalised descriptors [len(paths), N], one image at a time (each keeps its aspect ratio).

    An unreadable image raises :class:`DToPError`, unless ``failed`` is a list: then its index is appended
    there and its descriptor is zero (it matches nothing).
    """
    from dataclasses import replace

    from dtop_export.errors import DToPError
    from dtop_export.preprocess import load_image, prepare

    cfg = replace(preprocess, stride=model.stride)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, p in enumerate(paths):
            try:
                img = load_image(p)
            except DToPError:
                if failed is None:
                    raise
                failed.append(i)
                out.append(torch.zeros(1, model.descriptor_dim))
                continue
            bbx = bboxes[i] if bboxes else None
            acc = None
            for s in scales:
                x = torch.from_numpy(prepare(img, cfg, size, s, bbx))[None].to(device)
                d = _forward(model, x)
                acc = d if acc is None else acc + d
            out.append(F.normalize(acc, dim=-1).cpu())
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, model.descriptor_dim)
    return torch.cat(out)


class ModelEmbedder:
    """A duck-typed engine over an in-memory model, for ``dtop_export.evaluate`` during training.

    Same contract as ``engines.base.Engine.embed``: float32 [B, 3, H, W] -> float32 L2-normalised [B, N]
    (whitened when ``whitening`` is given). Lives here because training must not import ``engines``.
    """

    name = "pytorch-train"
    precision = "fp32"

    def __init__(self, model: DToP, preprocess: PreprocessConfig, whitening: Any = None, device: str = "cpu") -> None:
        self.model = model
        self.preprocess = preprocess
        self.whitening = whitening
        self.device = str(device)
        self.stride = model.stride
        self.descriptor_dim = whitening.out_dim if whitening is not None else model.descriptor_dim
        self.source = None

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            d = _forward(self.model, x)
        finally:
            self.model.train(was_training)
        if self.whitening is not None:
            d = self.whitening.apply(d)
        return d.cpu().numpy().astype(np.float32)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision} {self.device}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "device": self.device}

    def close(self) -> None:
        pass

    def __enter__(self) -> ModelEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
