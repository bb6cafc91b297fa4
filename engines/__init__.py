"""``dtop_export.engines``: the runtimes behind the one :class:`~dtop_export.contract.Engine` interface.

``pytorch`` (the reference; fp32, the bf16 deployment path, fp16 for audits), ``ort`` (ONNX Runtime: CPU,
CUDA and TensorRT execution providers, files or in-memory models) and ``tensorrt/`` (a package: install
probing, optimization profiles, the plan sidecar, builder, runner, trtexec line and the CPU-side ONNX-parser
lint). :func:`load_engine` picks the runtime from the file: a checkpoint (``.pt``) runs in PyTorch, an
``.onnx`` in ONNX Runtime, a ``.plan``/``.engine`` in TensorRT.

May import the core (``dtop_export.contract``, ``preprocess``, ``checkpoint``, ``fold``, ``fp16.convert``);
never ``dtop_export.training``, the CLI, or an audit/report module (parity, bench, fp16.audit, pipeline).
Runtime imports (torch, onnxruntime, tensorrt) happen inside the engines, so importing this package is cheap.
This folder installs as ``dtop_export.engines``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.contract import Engine

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def load_engine(path: str | Path, **options: Any) -> Engine:
    """Open ``path`` in the runtime its suffix names; ``options`` go to the engine's constructor."""
    path = Path(path)
    if not path.exists():
        raise DToPError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        from dtop_export.engines.pytorch import TorchEngine

        return TorchEngine.from_checkpoint(path, **options)
    if suffix == ".onnx":
        from dtop_export.engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, **options)
    if suffix in PLAN_SUFFIXES:
        from dtop_export.engines.tensorrt.runner import TensorRTEngine

        return TensorRTEngine(path, **options)
    raise DToPError(f"don't know how to run {path}: expected a checkpoint (.pt), .onnx or .plan file")
