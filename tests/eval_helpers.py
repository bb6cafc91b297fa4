"""Engines for evaluation/parity tests that need no model: fast, deterministic, inspectable."""

from __future__ import annotations

import numpy as np

from dtop_export.contract import Engine
from dtop_export.preprocess import PreprocessConfig


class TinyImageEngine(Engine):
    """A "tiny image" descriptor: per-channel means over a 4x4 grid plus per-channel std, L2-normalised.

    Records the shape of every batch it is given (``calls``).
    """

    name = "tiny-image"

    def __init__(self, preprocess: PreprocessConfig | None = None, precision: str = "fp32") -> None:
        self.preprocess = preprocess or PreprocessConfig(stride=16)
        self.stride = self.preprocess.stride
        self.descriptor_dim = 3 * 16 + 3
        self.precision = precision
        self.calls: list[tuple[int, ...]] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = self.check_images(images)
        self.calls.append(tuple(x.shape))
        b, c, h, w = x.shape
        grid = x.reshape(b, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(b, -1)
        d = np.concatenate([grid, x.std(axis=(2, 3))], axis=1) + 1e-3
        return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


class NoisyEngine(Engine):
    """Another engine's descriptors plus fixed Gaussian noise of relative size ``noise``, re-normalised."""

    name = "noisy"

    def __init__(self, base: Engine, noise: float, precision: str = "fp32", seed: int = 0) -> None:
        self.base = base
        self.noise = noise
        self.precision = precision
        self.preprocess = base.preprocess
        self.stride = base.stride
        self.descriptor_dim = base.descriptor_dim
        self.rng = np.random.default_rng(seed)

    def embed(self, images: np.ndarray) -> np.ndarray:
        d = self.base.embed(images).astype(np.float64)
        d = d + self.noise * self.rng.normal(size=d.shape) / np.sqrt(d.shape[1])
        return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


class TruncatedEngine(Engine):
    """Another engine's descriptors cut to the first ``dim`` components (a wrong-dimension artifact)."""

    name = "truncated"

    def __init__(self, base: Engine, dim: int) -> None:
        self.base = base
        self.preprocess = base.preprocess
        self.stride = base.stride
        self.descriptor_dim = dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        d = self.base.embed(images)[:, : self.descriptor_dim]
        return d / np.linalg.norm(d, axis=1, keepdims=True)
