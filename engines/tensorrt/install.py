"""What is installed: the ``tensorrt`` module, a CUDA GPU, their versions, and a logger TensorRT can call.

Every entry point of the TensorRT engine goes through :func:`require_tensorrt_and_gpu`, so a machine without
TensorRT or a GPU fails at once with one line saying what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dtop_export.errors import DToPError

log = logging.getLogger("dtop_export.engines.tensorrt")

INSTALL_HINT = "install it on a CUDA machine with: pip install 'dtop-export[gpu]'"


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device an engine is built for or run on."""

    name: str
    compute_capability: str  # "8.6"
    index: int = 0


def import_tensorrt() -> ModuleType:
    """``import tensorrt`` or a one-line :class:`DToPError` saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DToPError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    except (OSError, RuntimeError) as e:  # bindings present, libraries missing (e.g. the stub wheels)
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise DToPError(f"TensorRT's libraries cannot be loaded ({first}): {INSTALL_HINT}") from e
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise DToPError(f"the installed 'tensorrt' package has no TensorRT runtime (a stub?): {INSTALL_HINT}")
    return trt


def cuda_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA device ``index`` as torch sees it, or None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return None
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}", index)


def require_tensorrt_and_gpu(index: int = 0) -> tuple[ModuleType, GpuInfo]:
    """TensorRT and a CUDA GPU, or one :class:`DToPError` line naming what is missing."""
    gpu = cuda_gpu(index)
    try:
        trt = import_tensorrt()
    except DToPError as e:
        if gpu is None:
            raise DToPError(f"TensorRT is not installed and no CUDA GPU is visible: {INSTALL_HINT}") from e
        raise
    if gpu is None:
        raise DToPError(
            f"no CUDA GPU is visible (device {index}; torch.cuda.is_available() is False): TensorRT builds and "
            f"runs engines on an NVIDIA GPU; {INSTALL_HINT}"
        )
    return trt, gpu


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> (10, 8, 0, 43); non-numeric parts stop the parse."""
    out = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A TensorRT logger that forwards to :mod:`logging` and remembers the last error."""

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_error = " ".join(str(msg).split())
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif verbose:
                log.info("TensorRT: %s", msg)

    return _Logger()
