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

from dtop_export.contract import Engine

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
    from dtop_export.model.backbone import weight_standardization_cached
    from dtop_export.preprocess import load_image, prepare

    cfg = replace(preprocess, stride=model.stride)
    was_training = model.training
    model.eval()
    out = []
    try:
        with weight_standardization_cached(model):  # the weights are fixed for the pass: standardised once
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


def embed_paths_distributed(
    model: DToP,
    paths: Sequence[str],
    preprocess: PreprocessConfig,
    size: int,
    device: str | torch.device,
    world: int = 1,
    rank: int = 0,
) -> tuple[torch.Tensor, int]:
    """:func:`embed_paths` shared over a DDP group: each process embeds every ``world``-th image, then all are
    gathered. Returns (descriptors [len(paths), N] on the CPU in ``paths`` order, images this process could
    not read; theirs are zero)."""
    import torch.distributed as dist

    mine = list(paths[rank::world])
    failed: list[int] = []
    d = embed_paths(model, mine, preprocess, size, device=device, failed=failed).to(device)
    if world == 1:
        return d.cpu(), len(failed)
    per = -(-len(paths) // world)
    buf = torch.zeros(per, d.shape[1], device=device)
    buf[: d.shape[0]] = d
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    out = torch.empty(len(paths), d.shape[1])
    for r in range(world):
        n_r = len(paths[r::world])
        out[r::world] = parts[r][:n_r].cpu()
    return out, len(failed)


class ModelEmbedder(Engine):
    """The in-memory model being trained behind the engine interface, for validation mAP during training.

    float32 [B, 3, H, W] -> float32 L2-normalised [B, N] (whitened when ``whitening`` is given); the model is
    put in eval mode for the call and returned to its mode after. Training never imports ``engines``: this is
    its own engine.
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
        x = torch.from_numpy(self.check_images(images)).to(self.device)
        if x.shape[0] == 0:
            return self.no_descriptors()
        was_training = self.model.training
        self.model.eval()
        try:
            d = _forward(self.model, x)
        finally:
            self.model.train(was_training)
        if self.whitening is not None:
            d = self.whitening.apply(d)
        return d.cpu().numpy().astype(np.float32)
