"""The engine interface every runtime implements, and the loader that picks one for a file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.preprocess import PreprocessConfig


class Engine(ABC):
    """One runtime holding one model.

    Attributes: ``name`` (e.g. ``onnxruntime``), ``precision`` (``fp32``, ``fp16``, ``bf16``, ``int8``),
    ``device`` (``cpu``, ``cuda:0``), ``descriptor_dim`` (N), ``stride`` (H and W must be multiples of it),
    ``preprocess`` (the image contract the model was trained with), ``source`` (the file it was loaded from).
    """

    name: str = "engine"
    precision: str = "fp32"
    device: str = "cpu"
    descriptor_dim: int
    stride: int
    preprocess: PreprocessConfig
    source: Path | None = None

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """float32 images [B, 3, H, W] -> float32 L2-normalised descriptors [B, N]."""

    def describe(self) -> dict[str, Any]:
        """A short JSON-able description for reports."""
        return {
            "name": self.name,
            "precision": self.precision,
            "device": self.device,
            "descriptor_dim": self.descriptor_dim,
            "source": str(self.source) if self.source else None,
        }

    @property
    def label(self) -> str:
        """Display label, e.g. ``onnxruntime fp32 cpu``."""
        return f"{self.name} {self.precision} {self.device}"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        from dtop_export.errors import ShapeError

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ShapeError(f"{self.name}: expected images [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ShapeError(f"{self.name}: image size {h}x{w} is not a multiple of the stride {self.stride}")
        return np.ascontiguousarray(images, dtype=np.float32)


def load_engine(path: str | Path, **options: Any) -> Engine:
    """Open ``path`` in the runtime its suffix names; ``options`` go to the engine's constructor."""
    path = Path(path)
    if not path.exists():
        raise DToPError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ckpt"):
        from engines.pytorch import TorchEngine

        return TorchEngine.from_checkpoint(path, **options)
    if suffix == ".onnx":
        from engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, **options)
    if suffix in (".plan", ".engine", ".trt"):
        from engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path, **options)
    raise DToPError(f"don't know how to run {path}: expected a checkpoint (.pt), .onnx or .plan file")
