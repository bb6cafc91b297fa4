"""What is installed: a TensorRT flavour (``tensorrt`` or ``tensorrt_rtx``), a CUDA GPU, their CUDA versions, and
the logger TensorRT calls.

Two flavours of TensorRT share one builder/runner code path (:class:`Flavour` holds their differences):

* **TensorRT** (10.x, 11.x; ``pip install 'dtop-export[cuda12]'`` or ``[cuda13]``): builds on the GPU it will
  run on, every NVIDIA GPU from Turing on, Hopper (H100/H200) included; timing cache; weak typing on 10.0–10.11.
* **TensorRT-RTX** (``tensorrt_rtx``; ``[rtx-cuda12]``/``[rtx-cuda13]``): compiles kernels just in time on the
  GPU (a *runtime cache* keeps them), strongly typed only, and builds **without a GPU** for named compute
  capabilities (:mod:`dtop_export.engines.tensorrt.targets`: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1 — no Hopper).

Every entry point goes through :func:`require_tensorrt_and_gpu` (or :func:`require_builder` for a named-target
build), so a machine without the flavour or a GPU fails at once with one line saying what is missing;
:func:`use_device` makes the requested GPU current before any TensorRT object exists (TensorRT builds and loads
on the CUDA runtime's current device); :func:`create_builder`/:func:`create_runtime` turn TensorRT's "factory
function returned nullptr" (its libraries built for a newer CUDA than the driver has) into a line naming both
CUDA versions.
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
RTX_INSTALL_HINT = "install it with: pip install 'dtop-export[rtx-cuda12]' (or [rtx-cuda13] for a CUDA 13 driver)"
# Compute capabilities TensorRT-RTX 1.x builds for (its ComputeCapability enum): no 9.0 (Hopper) and no 10.x.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass(frozen=True)
class Flavour:
    """What differs between TensorRT and TensorRT-RTX; everything else is the same Python API."""

    key: str  # the --backend value and the sidecar's "backend"
    module: str  # the Python module
    label: str  # for messages: "TensorRT", "TensorRT-RTX"
    dist_prefix: str  # distribution names: <prefix>-cuNN[-libs|-bindings]
    install_hint: str
    named_targets: bool  # builds for a named compute capability without a GPU
    weak_typing: bool  # FP16 builder flag + per-layer precision (TensorRT 10.0-10.11)
    timing_cache: bool  # builder timing cache (TensorRT) vs a runtime cache of JIT kernels (TensorRT-RTX)


TENSORRT = Flavour("tensorrt", "tensorrt", "TensorRT", "tensorrt", INSTALL_HINT, False, True, True)
RTX = Flavour("rtx", "tensorrt_rtx", "TensorRT-RTX", "tensorrt-rtx", RTX_INSTALL_HINT, True, False, False)
FLAVOURS = {f.key: f for f in (TENSORRT, RTX)}
BACKENDS = ("auto", *FLAVOURS)


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device an engine is built for or run on."""

    name: str
    compute_capability: str  # "8.6"
    index: int = 0


def flavour_of(backend: str) -> Flavour:
    """``"tensorrt"``/``"rtx"`` -> its :class:`Flavour` (a sidecar's ``backend`` or ``--backend``)."""
    try:
        return FLAVOURS[backend]
    except KeyError:
        raise DToPError(f"unknown TensorRT backend {backend!r}: choose {', '.join(BACKENDS)}") from None


def import_tensorrt(flavour: Flavour = TENSORRT) -> ModuleType:
    """``import tensorrt`` (or ``tensorrt_rtx``) or a one-line :class:`DToPError` saying how to install it."""
    import importlib

    try:
        trt = importlib.import_module(flavour.module)
    except ImportError as e:
        raise DToPError(f"{flavour.label} is not installed: {flavour.install_hint}") from e
    except (OSError, RuntimeError) as e:  # bindings present, libraries missing (e.g. the stub wheels)
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise DToPError(f"{flavour.label}'s libraries cannot be loaded ({first}): {flavour.install_hint}") from e
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise DToPError(
            f"the installed {flavour.module!r} package has no {flavour.label} runtime (a stub?): {flavour.install_hint}"
        )
    return trt


def installed_flavours() -> list[Flavour]:
    """The flavours whose module imports with its libraries (TensorRT first)."""
    found = []
    for flavour in FLAVOURS.values():
        try:
            import_tensorrt(flavour)
        except DToPError:
            continue
        found.append(flavour)
    return found


def resolve_flavour(backend: str = "auto", *, named_target: bool = False) -> Flavour:
    """The flavour ``--backend`` names, or for ``auto`` the installed one (TensorRT when both are, TensorRT-RTX
    when a named ``--target`` asks for a GPU-less build). Nothing installed: one line naming both extras."""
    if backend != "auto":
        return flavour_of(backend)
    found = installed_flavours()
    if named_target:
        if RTX in found:
            return RTX
        raise DToPError(
            "--target builds for a named GPU architecture without a GPU, which only TensorRT-RTX does: "
            f"{RTX_INSTALL_HINT}"
        )
    if not found:
        raise DToPError(
            "neither TensorRT nor TensorRT-RTX is installed: pip install 'dtop-export[cuda12]' (TensorRT, on the GPU "
            "machine) or 'dtop-export[rtx-cuda12]' (TensorRT-RTX, also builds without a GPU with --target)"
        )
    return found[0]


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


def cuda_device_count() -> int:
    """How many CUDA GPUs torch sees (0 without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_device(index: int) -> str | None:
    """``device 1 does not exist: 1 CUDA GPU is visible (0)`` when there are GPUs but not ``index`` (with
    ``CUDA_VISIBLE_DEVICES`` set, what it says: the visible GPUs are numbered from 0); None when it exists or there is
    none (a different problem, said differently)."""
    import os

    n = cuda_device_count()
    if n == 0 or 0 <= index < n:
        return None
    numbers = f"0..{n - 1}" if n > 2 else ", ".join(map(str, range(n)))
    line = f"device {index} does not exist: {n} CUDA GPU{'s are' if n > 1 else ' is'} visible ({numbers})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return line if visible is None else f"{line} (CUDA_VISIBLE_DEVICES={visible}: visible GPUs are numbered from 0)"


def require_tensorrt_and_gpu(index: int = 0, flavour: Flavour = TENSORRT) -> tuple[ModuleType, GpuInfo]:
    """``flavour`` and a CUDA GPU it supports, or one :class:`DToPError` line naming what is missing."""
    gpu = cuda_gpu(index)
    try:
        trt = import_tensorrt(flavour)
    except DToPError as e:
        if gpu is None and cuda_device_count() == 0:
            raise DToPError(
                f"{flavour.label} is not installed and no CUDA GPU is visible: {flavour.install_hint}"
            ) from e
        raise
    if gpu is None and (missing := missing_device(index)):
        raise DToPError(missing)
    if gpu is None:
        if flavour.named_targets:
            raise DToPError(
                f"no CUDA GPU is visible (device {index}): {flavour.label} runs engines on an NVIDIA GPU; to build one "
                "here for a GPU elsewhere, name its architecture: --target sm86 (or sm75, sm80, sm89, sm120, sm121)"
            )
        raise DToPError(
            f"no CUDA GPU is visible (device {index}; torch.cuda.is_available() is False): {flavour.label} builds and "
            f"runs engines on an NVIDIA GPU; {flavour.install_hint}"
        )
    check_supported_gpu(flavour, gpu)
    return trt, gpu


def unusable_reason(device: int = 0, backend: str = "auto") -> str | None:
    """None when a TensorRT flavour (``backend``) can build and run engines on CUDA device ``device`` here, else
    the one line saying what is missing."""
    try:
        require_tensorrt_and_gpu(device, resolve_flavour(backend))
    except DToPError as e:
        return str(e)
    return None


def check_supported_gpu(flavour: Flavour, gpu: GpuInfo) -> None:
    """TensorRT-RTX on a GPU it has no kernels for (Hopper, datacenter Blackwell): one line naming TensorRT."""
    if flavour is RTX and gpu.compute_capability not in RTX_COMPUTE_CAPABILITIES:
        family = {"9.0": "Hopper (H100/H200)", "10.0": "Blackwell B200/GB200", "10.3": "Blackwell B300"}.get(
            gpu.compute_capability, f"compute capability {gpu.compute_capability}"
        )
        raise DToPError(
            f"{gpu.name} (compute capability {gpu.compute_capability}) is not supported by TensorRT-RTX, which "
            f"builds for {', '.join(RTX_COMPUTE_CAPABILITIES)}: {family} needs TensorRT proper: "
            "pip install 'dtop-export[cuda12]' (or [cuda13]) and build with --backend tensorrt"
        )


def require_builder(flavour: Flavour, index: int = 0, named_target: bool = False) -> tuple[ModuleType, GpuInfo | None]:
    """What a build needs: with a named target (TensorRT-RTX) only the module, else the module and a GPU."""
    if not named_target:
        return require_tensorrt_and_gpu(index, flavour)
    if not flavour.named_targets:
        raise DToPError(
            f"--target builds for a named GPU architecture without a GPU, which {flavour.label} cannot: it builds for "
            "the GPU it runs on (drop --target), or use --backend rtx (TensorRT-RTX)"
        )
    return import_tensorrt(flavour), cuda_gpu(index)


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


def tensorrt_cuda_major(flavour: Flavour = TENSORRT) -> int | None:
    """The CUDA major version the installed wheels of ``flavour`` were built for, from their distribution names
    (``tensorrt-cu12``, ``tensorrt_cu13_libs``, ``tensorrt-rtx-cu12``, ...), or None when that cannot be told."""
    from importlib.metadata import distributions

    prefix = re.escape(flavour.dist_prefix).replace("\\-", "[-_]")
    majors = set()
    for dist in distributions():
        m = re.fullmatch(rf"{prefix}[-_]cu(\d+)(?:[-_](?:libs|bindings))?", (dist.metadata["Name"] or "").lower())
        if m:
            majors.add(int(m.group(1)))
    return max(majors) if len(majors) == 1 else None


def cuda_mismatch_message(trt: ModuleType, what: str, flavour: Flavour = TENSORRT) -> str:
    """One line for a TensorRT object that could not be created: both CUDA versions and the fix."""
    trt_cuda = tensorrt_cuda_major(flavour)
    driver = driver_cuda_version()
    extra = "rtx-cuda" if flavour is RTX else "cuda"
    built = f"built for CUDA {trt_cuda}" if trt_cuda else "CUDA version unknown"
    has = f"the NVIDIA driver supports CUDA up to {driver}" if driver else "no NVIDIA driver (libcuda) was found"
    fix = f"install the {flavour.label} built for your driver's CUDA: pip install 'dtop-export[{extra}12]' "
    fix += f"(or [{extra}13])"
    if trt_cuda and driver and int(driver.split(".")[0]) < trt_cuda:
        major = int(driver.split(".")[0])
        fix = f"{flavour.label} needs CUDA {trt_cuda}: " + (
            f"pip install 'dtop-export[{extra}{major}]' or upgrade the driver"
            if major in (12, 13)
            else f"upgrade the NVIDIA driver ({flavour.label}'s wheels need CUDA 12 or 13)"
        )
    return f"{flavour.label} {trt.__version__} ({built}) could not create a {what}: {has}; {fix}"


def create_builder(trt: ModuleType, logger: Any, flavour: Flavour = TENSORRT) -> Any:
    """``trt.Builder(logger)``, or a :class:`DToPError` naming the CUDA mismatch that makes it fail."""
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:  # "pybind11::init(): factory function returned nullptr"
        raise DToPError(cuda_mismatch_message(trt, "builder", flavour)) from e
    if builder is None:
        raise DToPError(cuda_mismatch_message(trt, "builder", flavour))
    return builder


def create_runtime(trt: ModuleType, logger: Any, flavour: Flavour = TENSORRT) -> Any:
    """``trt.Runtime(logger)``, or a :class:`DToPError` naming the CUDA mismatch that makes it fail."""
    try:
        runtime = trt.Runtime(logger)
    except (TypeError, RuntimeError) as e:
        raise DToPError(cuda_mismatch_message(trt, "runtime", flavour)) from e
    if runtime is None:
        raise DToPError(cuda_mismatch_message(trt, "runtime", flavour))
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
            self.stopping: Any = None  # callable: true once we asked TensorRT to stop (its errors then not shown)

        def reset(self) -> None:
            """Forget the last error (before each build, load or run, so a stale one is never blamed)."""
            self.last_error = ""
            self.stopping = None

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_error = " ".join(str(msg).split())
                if self.stopping is None or not self.stopping():
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


def environment(trt: Any, device: int, flavour: Flavour = TENSORRT) -> dict[str, Any]:
    """TensorRT (which flavour, its CUDA), the driver's CUDA, PyTorch's CUDA runtime, the GPU (None without
    one) and ONNX Runtime facts."""
    import platform

    import torch

    gpu = None
    if torch.cuda.is_available() and device < torch.cuda.device_count():
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "index": device,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    env: dict[str, Any] = {
        "backend": flavour.key,
        "tensorrt": trt.__version__,
        "tensorrt_flavour": flavour.label,
        "tensorrt_cuda": tensorrt_cuda_major(flavour),
        "driver_cuda": driver_cuda_version(),
        "torch": torch.__version__,
        "torch_cuda_runtime": torch.version.cuda,
        "gpu": gpu,
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
