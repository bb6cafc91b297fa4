"""What is installed: the ``tensorrt`` module, a CUDA GPU, their CUDA versions, and the logger TensorRT calls.

Every entry point of the TensorRT engine goes through :func:`require_tensorrt_and_gpu`, so a machine without
TensorRT or a GPU fails at once with one line saying what is missing; :func:`use_device` makes the requested
GPU current before any TensorRT object exists (TensorRT builds and loads on the CUDA runtime's current
device); :func:`create_builder`/:func:`create_runtime` turn TensorRT's "factory function returned nullptr"
(its libraries built for a newer CUDA than the driver has) into a line naming both CUDA versions.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dtop_export.errors import DToPError

log = logging.getLogger("dtop_export.engines.tensorrt")

INSTALL_HINT = "install it on a CUDA machine with: pip install 'dtop-export[cuda12]' (or [cuda13] for a CUDA 13 driver)"


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


def use_device(index: int) -> None:
    """Make CUDA device ``index`` current for this thread (``cudaSetDevice`` through torch) and create its
    primary context. Called before every ``trt.Builder``/``trt.Runtime`` and around every execution:
    TensorRT tunes, deserializes and runs on the current device, not on the one a sidecar names."""
    import torch

    torch.cuda.set_device(index)
    torch.cuda.init()


def driver_cuda_version() -> str | None:
    """The newest CUDA the installed NVIDIA driver supports (``cuDriverGetVersion``: 12080 -> "12.8"), or
    None without a driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    return None


def tensorrt_cuda_major() -> int | None:
    """The CUDA major version the installed TensorRT wheels were built for, from their distribution names
    (``tensorrt-cu12``, ``tensorrt_cu13_libs``, ...), or None when that cannot be told."""
    from importlib.metadata import distributions

    majors = set()
    for dist in distributions():
        m = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_](?:libs|bindings))?", (dist.metadata["Name"] or "").lower())
        if m:
            majors.add(int(m.group(1)))
    return max(majors) if len(majors) == 1 else None


def cuda_mismatch_message(trt: ModuleType, what: str) -> str:
    """One line for a TensorRT object that could not be created: both CUDA versions and the fix."""
    trt_cuda = tensorrt_cuda_major()
    driver = driver_cuda_version()
    built = f"built for CUDA {trt_cuda}" if trt_cuda else "CUDA version unknown"
    has = f"the NVIDIA driver supports CUDA up to {driver}" if driver else "no NVIDIA driver (libcuda) was found"
    fix = "install the TensorRT built for your driver's CUDA: pip install 'dtop-export[cuda12]' (or [cuda13])"
    if trt_cuda and driver and int(driver.split(".")[0]) < trt_cuda:
        major = int(driver.split(".")[0])
        fix = f"TensorRT needs CUDA {trt_cuda}: " + (
            f"pip install 'dtop-export[cuda{major}]' or upgrade the driver"
            if major in (12, 13)
            else "upgrade the NVIDIA driver (TensorRT 10 and 11 wheels need CUDA 12 or 13)"
        )
    return f"TensorRT {trt.__version__} ({built}) could not create a {what}: {has}; {fix}"


def create_builder(trt: ModuleType, logger: Any) -> Any:
    """``trt.Builder(logger)``, or a :class:`DToPError` naming the CUDA mismatch that makes it fail."""
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:  # "pybind11::init(): factory function returned nullptr"
        raise DToPError(cuda_mismatch_message(trt, "builder")) from e
    if builder is None:
        raise DToPError(cuda_mismatch_message(trt, "builder"))
    return builder


def create_runtime(trt: ModuleType, logger: Any) -> Any:
    """``trt.Runtime(logger)``, or a :class:`DToPError` naming the CUDA mismatch that makes it fail."""
    try:
        runtime = trt.Runtime(logger)
    except (TypeError, RuntimeError) as e:
        raise DToPError(cuda_mismatch_message(trt, "runtime")) from e
    if runtime is None:
        raise DToPError(cuda_mismatch_message(trt, "runtime"))
    return runtime


def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A TensorRT logger that forwards to :mod:`logging` and remembers the last error until :meth:`reset`.

    Use :func:`process_logger` rather than this: TensorRT keeps the first logger it is given for as long
    as any builder or runtime lives, so a second logger object would never hear of later errors."""

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_error = ""
            self.verbose = verbose

        def reset(self) -> None:
            """Forget the last error (before each build, load or run, so a stale one is never blamed)."""
            self.last_error = ""

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_error = " ".join(str(msg).split())
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif self.verbose:
                log.info("TensorRT: %s", msg)

    return _Logger()


_PROCESS_LOGGERS: dict[int, Any] = {}


def process_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """The one logger of this process for module ``trt`` (made on first use), reset and set to ``verbose``."""
    logger = _PROCESS_LOGGERS.get(id(trt))
    if logger is None:
        logger = _PROCESS_LOGGERS[id(trt)] = make_logger(trt, verbose)
    logger.verbose = verbose
    logger.reset()
    return logger


def environment(trt: Any, device: int) -> dict[str, Any]:
    """TensorRT, CUDA (TensorRT's, the driver's, PyTorch's runtime), GPU and ONNX Runtime facts."""
    import platform

    import torch

    props = torch.cuda.get_device_properties(device)
    env: dict[str, Any] = {
        "tensorrt": trt.__version__,
        "tensorrt_cuda": tensorrt_cuda_major(),
        "driver_cuda": driver_cuda_version(),
        "torch": torch.__version__,
        "torch_cuda_runtime": torch.version.cuda,
        "gpu": {
            "index": device,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        },
        "python": platform.python_version(),
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    env["onnxruntime_conflict"] = onnxruntime_conflict()
    return env


def onnxruntime_conflict() -> str | None:
    """A line when both ``onnxruntime`` and ``onnxruntime-gpu`` are installed (they overwrite each other's
    files and the CUDA provider disappears), else None."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    if len(found) < 2:
        return None
    return (
        f"both {found[0]} and {found[1]} are installed: pip uninstall -y onnxruntime onnxruntime-gpu && "
        "pip install onnxruntime-gpu"
    )
