"""What an image size costs in memory, checked before any work: ``--image-size 100000`` asks for a 22 GB resized
image and is refused in one line instead of being killed by the kernel's out-of-memory handler.

:func:`inference_bytes` is a lower bound of one forward pass at an image size (the resized image, its float32
model input, one attention map of the vision transformer); :func:`check_image_size` refuses a size whose bound
exceeds the memory this process can have (the machine's available memory, or its cgroup's limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dtop_export.errors import DToPError

# bytes per pixel of the resized image (uint8 RGB) and of its float32 model input, with one temporary of each
PIXEL_BYTES = 2 * (3 + 3 * 4)


def inference_bytes(size: int, scales: Sequence[float] = (1.0,), batch: int = 1, stride: int = 16) -> int:
    """A lower bound of the memory embedding ``batch`` square images of longer side ``size`` takes at the largest of
    ``scales``: the resized images and model inputs, and one float32 attention map over their tokens (a DToP
    backbone holds one per head, and more tensors besides: the true need is higher)."""
    side = max(stride, round(size * max(scales)))
    tokens = (side // stride) ** 2
    return batch * (PIXEL_BYTES * side * side + 4 * tokens * tokens)


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without one."""
    try:
        cg = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        root = Path("/sys/fs/cgroup") / cg.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the machine's available memory, or less under a cgroup limit."""
    try:
        import psutil

        free: int | None = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        free = None
    cgroup = _cgroup_free()
    if free is None or (cgroup is not None and cgroup < free):
        return cgroup
    return free


def largest_size(available: int, scales: Sequence[float], batch: int, stride: int) -> int:
    """The largest image size (a multiple of ``stride``) whose :func:`inference_bytes` fits ``available``."""
    lo, hi = 0, 1 << 20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inference_bytes(mid * stride, scales, batch, stride) <= available:
            lo = mid
        else:
            hi = mid
    return lo * stride


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}" if n < 2**50 else f"{n / 2**30:.1e}"


def check_image_size(
    size: int,
    scales: Sequence[float] = (1.0,),
    batch: int = 1,
    stride: int = 16,
    option: str = "--image-size",
    available: int | None = None,
    batch_option: str = "--batch-size",
) -> None:
    """Refuse ``size`` (one line, before any work) when it is below ``stride`` or when embedding ``batch`` images at
    it (and the largest of ``scales``) needs more memory than is available (``available``; default: measured). The
    message offers only what can fit: the largest size, when one of at least ``stride`` does, a smaller batch
    (``batch_option``) or smaller scales."""
    if size < stride:
        raise DToPError(f"{option} must be at least the model's stride {stride}, got {size}")
    need = inference_bytes(size, scales, batch, stride)
    free = available_memory() if available is None else available
    if free is not None and need > free:
        at = f" at scale {max(scales):g}" if max(scales) != 1 else ""
        fits = largest_size(free, scales, batch, stride)
        ways = [f"{option} {fits} or less"] if fits >= stride else []
        ways += [f"a smaller {batch_option}"] if batch > 1 else []
        ways += ["smaller --scales"] if max(scales) > 1 and fits < stride else []
        raise DToPError(
            f"{option} {size}{at} needs at least {_gib(need)} GiB for a batch of {batch}; "
            f"{free / 2**30:.1f} GiB are available here: "
            + (
                f"use {' or '.join(ways)}"
                if ways
                else "not even the smallest input fits: free memory, or use a larger machine"
            )
        )
