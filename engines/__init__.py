"""``dtop_export.engines``: the runtimes behind the one :class:`~dtop_export.contract.Engine` interface.

``pytorch`` (the reference; fp32, the bf16 deployment path, fp16 for audits), ``ort`` (ONNX Runtime: CPU,
CUDA and TensorRT execution providers, files or in-memory models), ``openvino`` (an .onnx or an IR on the CPU:
fp32, bf16/fp16 hints, INT8 IRs and QDQ files), ``executorch`` (a ``.pte`` from ``dtop-export executorch``:
XNNPACK-delegated fp32 or INT8, fixed input size) and ``tensorrt/`` (a package: install
probing, optimization profiles, the plan sidecar, builder, runner, trtexec line and the CPU-side ONNX-parser
lint). :func:`load_engine` picks the runtime from the file: a checkpoint (``.pt``) runs in PyTorch, an
``.onnx`` in ONNX Runtime (or OpenVINO with ``runtime="openvino"``), an ``.xml`` in OpenVINO, a ``.pte`` in
ExecuTorch, a ``.plan``/``.engine`` in TensorRT.

May import the core (``dtop_export.contract``, ``preprocess``, ``checkpoint``, ``fold``, ``fp16.convert``);
never ``dtop_export.training``, the CLI, or an audit/report module (parity, bench, fp16.audit, pipeline).
Runtime imports (torch, onnxruntime, openvino, executorch, tensorrt) happen inside the engines, so importing this
package is cheap.
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
IR_SUFFIXES = (".xml",)
PTE_SUFFIXES = (".pte",)
# runtime= values load_engine understands (an .onnx runs in onnxruntime unless runtime="openvino")
RUNTIMES = ("pytorch", "onnxruntime", "openvino", "executorch", "tensorrt")
MODEL_SUFFIXES = (*CHECKPOINT_SUFFIXES, ".onnx", *IR_SUFFIXES, *PTE_SUFFIXES, *PLAN_SUFFIXES)


def check_model_file(path: str | Path) -> Path:
    """``path`` as a model file :func:`load_engine` can open (it exists, and its suffix names a runtime), checked
    without opening it; one line otherwise."""
    path = Path(path)
    if not path.exists():
        raise DToPError(f"model file {path} not found")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise DToPError(
            f"don't know how to run {path}: expected a checkpoint (.pt), .onnx, OpenVINO .xml, ExecuTorch .pte or .plan"
        )
    return path


def load_engine(path: str | Path, runtime: str | None = None, **options: Any) -> Engine:
    """Open ``path`` in the runtime its suffix names (``.pt`` PyTorch, ``.onnx`` ONNX Runtime, ``.xml`` OpenVINO,
    ``.pte`` ExecuTorch, ``.plan`` TensorRT), or in ``runtime`` (``openvino`` runs an ``.onnx`` too); ``options``
    go to the engine's constructor."""
    path = check_model_file(path)
    suffix = path.suffix.lower()
    if runtime is not None and runtime not in RUNTIMES:
        raise DToPError(f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}")
    if runtime == "openvino" or suffix in IR_SUFFIXES:
        if suffix not in (".onnx", *IR_SUFFIXES):
            raise DToPError(f"OpenVINO runs an .onnx or an IR .xml, not {path.name}")
        from dtop_export.engines.openvino import OpenVinoEngine

        return OpenVinoEngine(path, **options)
    native = {".onnx": "onnxruntime", ".pte": "executorch"}.get(suffix) or (
        "pytorch" if suffix in CHECKPOINT_SUFFIXES else "tensorrt" if suffix in PLAN_SUFFIXES else None
    )
    if runtime is not None and runtime != native:
        raise DToPError(f"{path.name} cannot run in {runtime} (it runs in {native or 'no runtime'})")
    if suffix in CHECKPOINT_SUFFIXES:
        from dtop_export.engines.pytorch import TorchEngine

        return TorchEngine.from_checkpoint(path, **options)
    if suffix == ".onnx":
        from dtop_export.engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, **options)
    if suffix in PTE_SUFFIXES:
        from dtop_export.engines.executorch import ExecuTorchEngine

        return ExecuTorchEngine(path, **options)
    from dtop_export.engines.tensorrt.runner import TensorRTEngine  # PLAN_SUFFIXES: the last of MODEL_SUFFIXES

    return TensorRTEngine(path, **options)
