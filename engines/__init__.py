"""Runtimes behind one engine interface (PyTorch, ONNX Runtime, TensorRT), Polygraphy-style.

``load_engine(path)`` picks the runtime from the file: a checkpoint (``.pt``) runs in PyTorch, an
``.onnx`` in ONNX Runtime, a ``.plan``/``.engine`` in TensorRT. Every engine maps float32 images
[B, 3, H, W] (already normalised, H and W multiples of the stride) to float32 L2-normalised
descriptors [B, N]. Runtime imports happen inside the engines, so importing this package is cheap.
"""

from engines.base import Engine, load_engine

__all__ = ["Engine", "load_engine"]
