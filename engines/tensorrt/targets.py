"""Named GPU architectures for GPU-less builds (``dtop-export trt --target sm86,sm89``; TensorRT-RTX only).

A target is a CUDA compute capability. TensorRT-RTX 1.x builds for 7.5, 8.0, 8.6, 8.9, 12.0 and 12.1 (its
``ComputeCapability`` enum) without a GPU on the build machine; one ``.plan`` per target. It has no Hopper
(9.0: H100/H200) or datacenter Blackwell (10.x): those need TensorRT proper, built on the GPU itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError

# compute capability -> the GPUs a user knows it by
GPUS = {
    "7.5": "Turing: T4, RTX 20xx, Quadro RTX",
    "8.0": "Ampere A100, A30",
    "8.6": "Ampere: RTX 30xx, RTX A-series, A10, A40",
    "8.9": "Ada: RTX 40xx, RTX 6000 Ada, L4, L40",
    "12.0": "Blackwell: RTX 50xx, RTX PRO 6000",
    "12.1": "Blackwell GB10 (DGX Spark)",
}
NOT_RTX = {
    "9.0": "Hopper (H100, H200, GH200)",
    "10.0": "Blackwell B200/GB200",
    "10.3": "Blackwell B300/GB300",
    "8.7": "Jetson Orin",
    "7.0": "Volta (V100)",
}


@dataclass(frozen=True)
class Target:
    """One compute capability to build for, e.g. ``Target("8.6")`` (``sm86``)."""

    compute_capability: str

    @property
    def sm(self) -> str:
        """``sm86``: the spelling of ``--target`` and of per-target file names."""
        return "sm" + self.compute_capability.replace(".", "")

    def enum(self, trt: Any) -> Any:
        """The flavour's ``ComputeCapability`` member (``trt.ComputeCapability.SM86``)."""
        member = getattr(getattr(trt, "ComputeCapability", None), self.sm.upper(), None)
        if member is None:
            raise DToPError(f"this TensorRT has no build target {self.sm} ({describe(self.compute_capability)})")
        return member


def describe(cc: str) -> str:
    """``8.6`` -> ``compute capability 8.6, Ampere: RTX 30xx, ...``."""
    who = GPUS.get(cc) or NOT_RTX.get(cc)
    return f"compute capability {cc}" + (f", {who}" if who else "")


def _supported() -> str:
    return "; ".join(f"sm{cc.replace('.', '')} ({who})" for cc, who in GPUS.items())


def parse_target(text: str) -> Target:
    """``sm86``, ``sm_86``, ``86`` or ``8.6`` -> :class:`Target`; an architecture TensorRT-RTX cannot build for
    is one line naming what can (and, for Hopper, what to use instead)."""
    t = text.strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d{1,2})\.?(\d)", t)
    if not m:
        raise DToPError(
            f"cannot read --target {text!r}: write a compute capability such as sm86 or 8.6; one of {_supported()}"
        )
    cc = f"{int(m.group(1))}.{m.group(2)}"
    if cc not in GPUS:
        if cc in NOT_RTX:
            raise DToPError(
                f"--target {text}: TensorRT-RTX cannot build for {describe(cc)}; build on that GPU with TensorRT "
                "proper (pip install 'dtop-export[cuda12]', then `dtop-export trt MODEL.onnx --backend tensorrt`)"
            )
        raise DToPError(
            f"--target {text}: TensorRT-RTX does not build for compute capability {cc}; it builds for {_supported()}"
        )
    return Target(cc)


def parse_targets(text: str) -> list[Target]:
    """``sm86,sm89`` -> two targets (order kept, duplicates refused)."""
    parts = [p for p in (x.strip() for x in text.split(",")) if p]
    if not parts:
        raise DToPError("--target is empty: name at least one architecture, e.g. --target sm86")
    targets = [parse_target(p) for p in parts]
    seen = [t.sm for t in targets]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise DToPError(f"--target names {', '.join(dupes)} twice")
    return targets


def plan_paths(output: Path, targets: Sequence[Target]) -> list[Path]:
    """One plan per target: ``output`` itself for a single target, else ``model.sm86.plan``, ``model.sm89.plan``."""
    if len(targets) <= 1:
        return [output] * len(targets)
    return [output.with_name(f"{output.stem}.{t.sm}{output.suffix}") for t in targets]
