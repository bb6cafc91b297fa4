"""The JSON sidecar of a ``.plan`` (``model.plan.json``): TensorRT version, GPU, profiles, precision, the
ONNX it was built from and the model's deployment metadata. The runner reads it before TensorRT does, so an
engine built by another TensorRT or for another GPU fails with that message instead of crashing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_write_text, read_tagged_json
from dtop_export.engines.tensorrt.install import GpuInfo
from dtop_export.engines.tensorrt.profiles import Profile
from dtop_export.errors import DToPError

SIDECAR_FORMAT = "dtop-export/tensorrt-plan"
SIDECAR_VERSION = 1


@dataclass
class PlanInfo:
    """Everything the JSON sidecar of a ``.plan`` records."""

    tensorrt_version: str
    gpu: dict[str, Any]
    profiles: list[dict[str, list[int]]]
    precision: dict[str, Any]
    onnx: dict[str, Any]
    build: dict[str, Any] = field(default_factory=dict)
    input_name: str = "images"
    output_name: str = "descriptors"
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = SIDECAR_FORMAT
    format_version: int = SIDECAR_VERSION
    toolkit_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanInfo:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def profile_objects(self) -> list[Profile]:
        return [Profile.from_dict(p) for p in self.profiles]


def sidecar_path(plan: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def write_sidecar(plan: str | Path, info: PlanInfo) -> Path:
    """Write ``info`` next to ``plan`` (atomic); returns the sidecar path."""
    path = sidecar_path(plan)
    atomic_write_text(path, json.dumps(info.to_dict(), indent=1, sort_keys=True) + "\n")
    return path


def read_sidecar(plan: str | Path, path: str | Path | None = None) -> PlanInfo:
    """The sidecar of ``plan`` (or ``path``); a missing or foreign file is a one-line error."""
    path = Path(path) if path is not None else sidecar_path(plan)
    if not path.is_file():
        raise DToPError(
            f"{path} not found: a .plan is run with the JSON sidecar `dtop-export trt` writes next to it "
            "(TensorRT version, GPU, profiles, preprocessing); rebuild the engine with `dtop-export trt`"
        )
    d = read_tagged_json(
        path, SIDECAR_FORMAT, "a dtop-export TensorRT sidecar", "rebuild the engine with `dtop-export trt`"
    )
    if int(d.get("format_version", 0)) > SIDECAR_VERSION:
        raise DToPError(f"{path} was written by a newer dtop-export: upgrade dtop-export")
    try:
        return PlanInfo.from_dict(d)
    except TypeError as e:
        raise DToPError(f"{path} is incomplete ({e}): rebuild the engine with `dtop-export trt`") from e


def describe_plan(plan: str | Path) -> dict[str, Any]:
    """What ``dtop-export info model.plan`` prints, read from the sidecar (no TensorRT or GPU needed): the
    TensorRT and GPU it was built with, profiles, precision, the ONNX it came from and the dtop metadata."""
    from dtop_export.contract import metadata_report

    plan = Path(plan)
    if not plan.is_file():
        raise DToPError(f"engine file {plan} not found")
    info = read_sidecar(plan)
    return {
        "file": str(plan),
        "size_mb": round(plan.stat().st_size / 2**20, 2),
        "tensorrt": info.tensorrt_version,
        "gpu": info.gpu,
        "precision": info.precision,
        "profiles": info.profiles,
        "onnx": info.onnx,
        "build": info.build,
        "io": {"input": info.input_name, "output": info.output_name},
    } | metadata_report(info.metadata)


def compatibility(info: PlanInfo, tensorrt_version: str, gpu: GpuInfo) -> tuple[str | None, str | None]:
    """(error, warning) for running an engine described by ``info`` with this TensorRT on ``gpu``.

    TensorRT plans are tied to the exact TensorRT version and to the GPU's compute capability; a different
    GPU model of the same compute capability loads but may run slower than on the one it was tuned for.
    """
    built_gpu = info.gpu.get("name", "?")
    built_cc = str(info.gpu.get("compute_capability", "?"))
    built = f"TensorRT {info.tensorrt_version} on {built_gpu} (compute capability {built_cc})"
    here = f"TensorRT {tensorrt_version} on {gpu.name} (compute capability {gpu.compute_capability})"
    rebuild = f"rebuild it here with `dtop-export trt {info.onnx.get('path', 'model.onnx')}`"
    if info.tensorrt_version != tensorrt_version:
        return f"the engine was built with {built}; this machine has {here}: {rebuild}", None
    if built_cc != gpu.compute_capability:
        return f"the engine was built for {built_gpu} (compute capability {built_cc}); this GPU is {gpu.name} " + (
            f"(compute capability {gpu.compute_capability}): {rebuild}"
        ), None
    if built_gpu != gpu.name:
        return None, f"the engine was tuned on {built_gpu}, running on {gpu.name}: rebuild here for best speed"
    return None, None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
