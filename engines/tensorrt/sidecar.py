"""The JSON sidecar of a ``.plan`` (``model.plan.json``): the backend (TensorRT or TensorRT-RTX) and its version,
the GPU or named target, profiles, precision (FP32 islands, the parsed network's types), the ONNX it was built
from (SHA-256, and paths relative to the plan's folder: ``onnx.relative_to`` is ``plan``; older sidecars hold them
relative to where the build ran) and the model's deployment metadata. The runner reads it before TensorRT does, so
an engine built by another backend, version or for another GPU fails with that message instead of crashing."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_write_text, read_tagged_json
from dtop_export.engines.tensorrt.install import RTX_COMPUTE_CAPABILITIES, Flavour, GpuInfo, flavour_of
from dtop_export.engines.tensorrt.profiles import Profile
from dtop_export.errors import DToPError

SIDECAR_FORMAT = "dtop-export/tensorrt-plan"
SIDECAR_VERSION = 2  # 2: backend (tensorrt | rtx), named-target builds (gpu.name None, gpu.target)


@dataclass
class PlanInfo:
    """Everything the JSON sidecar of a ``.plan`` records."""

    tensorrt_version: str
    gpu: dict[str, Any]  # name (None for a named-target build), compute_capability, index, target ("sm86")
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
    backend: str = "tensorrt"  # "tensorrt" or "rtx" (TensorRT-RTX); version-1 sidecars are TensorRT's

    @property
    def flavour(self) -> Flavour:
        return flavour_of(self.backend)

    def built_with(self) -> str:
        """``TensorRT-RTX 1.7.1.116 for sm86 (no GPU)`` or ``TensorRT 10.13.0.35 on NVIDIA H100 (compute
        capability 9.0)``."""
        name, cc = self.gpu.get("name"), self.gpu.get("compute_capability", "?")
        where = f"on {name} (compute capability {cc})" if name else f"for {self.gpu.get('target') or cc} (no GPU)"
        return f"{self.flavour.label} {self.tensorrt_version} {where}"

    def onnx_file(self, plan: str | Path | None, key: str = "path") -> str:
        """The ONNX recorded under ``key`` (``path``: the source, ``built_from``: what TensorRT parsed) as a path that
        works from any folder: resolved against the real folder of ``plan``'s sidecar (links followed: a plan reached
        through a linked folder, or a link to a plan with one to its sidecar). A sidecar without ``relative_to``
        recorded it relative to the folder the build ran in, which is unknown: given as recorded."""
        recorded = str(self.onnx.get(key) or "model.onnx")
        if plan is None or self.onnx.get("relative_to") != "plan":
            return recorded
        return os.path.normpath(Path(os.path.realpath(sidecar_path(plan))).parent / recorded)

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


def onnx_record(plan: str | Path, onnx_path: Path, built_from: Path, sha256: str) -> dict[str, str]:
    """The sidecar's ``onnx``: the source ONNX and the one TensorRT parsed, relative to ``plan``'s folder
    (:meth:`PlanInfo.onnx_file` resolves them), so a rebuild hint works from any folder, also once the plan's
    folder was copied elsewhere with its ONNX. Both are in their folders' real paths (linked folders followed, as the
    reader resolves them: ``..`` after a linked folder is the parent of where it points); a file that is itself a
    link is named as the link (the FP16 ONNX written with the first plan replaces a link at its destination)."""
    folder = os.path.realpath(Path(plan).absolute().parent)

    def relative(path: Path) -> str:  # the folder's real path, not the file's: the FP16 ONNX's destination may be a
        real = os.path.join(os.path.realpath(Path(path).absolute().parent), Path(path).name)  # link it replaces
        try:
            return os.path.relpath(real, folder)
        except ValueError:  # on another drive (Windows)
            return real

    return {"path": relative(onnx_path), "sha256": sha256, "built_from": relative(built_from), "relative_to": "plan"}


def sidecar_text(info: PlanInfo) -> str:
    """The sidecar file's text for ``info``."""
    return json.dumps(info.to_dict(), indent=1, sort_keys=True) + "\n"


def write_sidecar(plan: str | Path, info: PlanInfo) -> Path:
    """Write ``info`` next to ``plan`` (atomic); returns the sidecar path."""
    path = sidecar_path(plan)
    atomic_write_text(path, sidecar_text(info))
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
        info = PlanInfo.from_dict(d)
    except TypeError as e:
        raise DToPError(f"{path} is incomplete ({e}): rebuild the engine with `dtop-export trt`") from e
    expected = info.build.get("plan_bytes")  # sidecars before 2026-12 do not record it
    size = Path(plan).stat().st_size if Path(plan).is_file() else None
    if expected is not None and size is not None and size != expected:
        raise DToPError(
            f"{path} describes a plan of {expected} bytes, but {plan} has {size}: they are not from the same build "
            "(a build stopped between writing the two, or a file copied over one): rebuild with `dtop-export trt`"
        )
    return info


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
        "backend": info.flavour.label,
        "tensorrt": info.tensorrt_version,
        "built_with": info.built_with(),
        "gpu": info.gpu,
        "precision": info.precision,
        "profiles": info.profiles,
        "onnx": {
            k: info.onnx_file(plan, k) if k in ("path", "built_from") else v  # paths from here
            for k, v in info.onnx.items()
            if k != "relative_to"
        },
        "build": info.build,
        "io": {"input": info.input_name, "output": info.output_name},
    } | metadata_report(info.metadata)


def compatibility(
    info: PlanInfo, tensorrt_version: str, gpu: GpuInfo, flavour: Flavour | None = None, plan: str | Path | None = None
) -> tuple[str | None, str | None]:
    """(error, warning) for running an engine described by ``info`` (the sidecar of ``plan``: the rebuild hint names
    its ONNX from there) with ``flavour`` (default: the plan's own) ``tensorrt_version`` on ``gpu``.

    Plans are tied to the backend that built them (TensorRT or TensorRT-RTX), its exact version and the GPU's
    compute capability; a different GPU model of the same compute capability loads but may run slower than on
    the one it was tuned for (a named-target build was tuned on none: no warning).
    """
    flavour = flavour or info.flavour
    built = info.built_with()
    here = f"{flavour.label} {tensorrt_version} on {gpu.name} (compute capability {gpu.compute_capability})"
    built_gpu, built_cc = info.gpu.get("name"), str(info.gpu.get("compute_capability", "?"))
    onnx = info.onnx_file(plan)
    rebuild = f"rebuild it here with `dtop-export trt {onnx}`"
    if info.backend == "rtx" and gpu.compute_capability not in RTX_COMPUTE_CAPABILITIES:
        rebuild = (
            f"TensorRT-RTX has no kernels for compute capability {gpu.compute_capability}: build on this GPU with "
            f"TensorRT proper (pip install 'dtop-export[cuda12]'; `dtop-export trt {onnx} --backend tensorrt`)"
        )
    elif info.backend == "rtx":
        rebuild = f"rebuild it with `dtop-export trt {onnx} --target sm{gpu.compute_capability.replace('.', '')}`"
    if info.backend != flavour.key:
        return f"the engine was built with {built}; it runs only with {info.flavour.label}, not {here}", None
    if info.tensorrt_version != tensorrt_version:
        return f"the engine was built with {built}; this machine has {here}: {rebuild}", None
    if built_cc != gpu.compute_capability:
        return f"the engine was built with {built}; this GPU is {gpu.name} " + (
            f"(compute capability {gpu.compute_capability}): {rebuild}"
        ), None
    if built_gpu and built_gpu != gpu.name:
        return None, f"the engine was tuned on {built_gpu}, running on {gpu.name}: rebuild here for best speed"
    return None, None
