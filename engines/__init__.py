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

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError
from dtop_export.suffixes import CHECKPOINT_SUFFIXES, IR_SUFFIXES, PLAN_SUFFIXES, PTE_SUFFIXES  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from dtop_export.contract import Engine

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
    go to the engine's constructor, checked first (:func:`check_engine_options`)."""
    path = check_model_file(path)
    make = check_engine_options(path, options, runtime)
    return make(path, **options)


def engine_factory(path: Path, runtime: str | None = None) -> tuple[str, Callable[..., Engine], tuple[str, ...]]:
    """(runtime name, constructor taking ``(path, **options)``, the option names it takes) for ``path``; imports
    the engine's module, not its runtime. The options are the constructors' keyword-only parameters: what comes
    before the ``*`` (the model, what a loader or a caller in code passes) is not the user's to set."""
    import inspect

    suffix = path.suffix.lower()
    if runtime is not None and runtime not in RUNTIMES:
        raise DToPError(f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}")
    if runtime == "openvino" or suffix in IR_SUFFIXES:
        if suffix not in (".onnx", *IR_SUFFIXES):
            raise DToPError(f"OpenVINO runs an .onnx or an IR .xml, not {path.name}")
        from dtop_export.engines.openvino import OpenVinoEngine

        name, make, signatures = "openvino", OpenVinoEngine, [OpenVinoEngine.__init__]
    else:
        native = {".onnx": "onnxruntime", ".pte": "executorch"}.get(suffix) or (
            "pytorch" if suffix in CHECKPOINT_SUFFIXES else "tensorrt" if suffix in PLAN_SUFFIXES else None
        )
        if runtime is not None and runtime != native:
            raise DToPError(f"{path.name} cannot run in {runtime} (it runs in {native or 'no runtime'})")
        if suffix in CHECKPOINT_SUFFIXES:
            from dtop_export.engines.pytorch import TorchEngine

            name, make = "pytorch", TorchEngine.from_checkpoint
            signatures = [TorchEngine.from_checkpoint, TorchEngine.__init__]
        elif suffix == ".onnx":
            from dtop_export.engines.ort import OnnxRuntimeEngine

            name, make, signatures = "onnxruntime", OnnxRuntimeEngine, [OnnxRuntimeEngine.__init__]
        elif suffix in PTE_SUFFIXES:
            from dtop_export.engines.executorch import ExecuTorchEngine

            name, make, signatures = "executorch", ExecuTorchEngine, [ExecuTorchEngine.__init__]
        elif suffix in PLAN_SUFFIXES:
            from dtop_export.engines.tensorrt.runner import TensorRTEngine

            name, make, signatures = "tensorrt", TensorRTEngine, [TensorRTEngine.__init__]
        else:
            raise DToPError(
                f"don't know how to run {path}: expected a checkpoint (.pt), .onnx, OpenVINO .xml, ExecuTorch .pte "
                "or .plan"
            )
    names = {
        p.name
        for fn in signatures
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return name, make, tuple(sorted(names))


def check_engine_options(
    path: str | Path, options: dict[str, Any], runtime: str | None = None, local_threads: bool = True
) -> Callable[..., Engine]:
    """Refuse, in one line, an option the engine of ``path`` does not take (a typo in ``MODEL:key=value``) and a
    ``threads`` that is not a whole number of at least 1 or, with ``local_threads``, is more than this process's
    CPUs (a runtime asked for a million threads allocates them, unkillable, for minutes); ``runtime`` as in
    :func:`load_engine` (``options`` may carry it too). Returns the engine's constructor, as
    :func:`engine_factory`."""
    path = Path(path)
    options = dict(options)
    runtime = options.pop("runtime", runtime)
    name, make, known = engine_factory(path, runtime)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DToPError(
            f"{path.name}: {name} takes no option {', '.join(map(repr, unknown))}: it takes {', '.join(known)}"
        )
    threads = options.get("threads")
    if threads is None:
        return make
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DToPError(f"threads must be a whole number of at least 1, got {threads!r}")
    from dtop_export.host import usable_cpus

    if local_threads and threads > (cpus := usable_cpus()):
        raise DToPError(
            f"{threads} threads asked for (--threads or MODEL:threads=), and this process can run on {cpus} CPU(s): "
            f"use {cpus} or fewer (more threads than CPUs only wait for each other)"
        )
    return make
