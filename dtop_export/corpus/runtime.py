"""The engine side of a corpus job, shared by the in-process and the Ray runner: opening MODEL, reading its
contract without running it, and per-actor statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.contract import Engine
    from dtop_export.preprocess import PreprocessConfig


@dataclass
class ActorStats:
    """Images one inference actor (or this process) embedded and the seconds it spent in ``embed``."""

    name: str
    images: int = 0
    busy_s: float = 0.0
    startup_s: float = 0.0  # loading the engine and warming it up (a Ray actor's, once)

    @property
    def images_per_s(self) -> float:
        return self.images / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class ModelContract:
    """What the driver needs to know about the model without running it."""

    preprocess: PreprocessConfig
    descriptor_dim: int


def model_contract(model: str) -> ModelContract:
    """The preprocessing and descriptor size of MODEL, read without running it (a checkpoint's config, an ONNX
    file's metadata without its weights, an OpenVINO IR's ``.xml``, a TensorRT plan's sidecar: a driver without a
    GPU can plan a GPU job); a model whose metadata lacks the descriptor size is opened once, single-threaded."""
    from dtop_export.bench.spec import parse_spec
    from dtop_export.contract import preprocess_from_metadata, read_metadata

    spec = parse_spec(model)
    meta: dict[str, str] | None = None
    if spec.kind == "checkpoint":
        from dtop_export.checkpoint import load_checkpoint

        ckpt = load_checkpoint(spec.path)
        dim = ckpt.whitening.out_dim if ckpt.whitening is not None else ckpt.config.descriptor_dim
        return ModelContract(ckpt.preprocess, int(dim))
    if _is_plan(spec):
        from dtop_export.engines.tensorrt.sidecar import read_sidecar

        meta = read_sidecar(spec.path).metadata
    elif spec.kind == "onnx":
        meta = read_metadata(spec.path)
    elif spec.kind == "pte":
        from dtop_export.engines.executorch import pte_metadata

        meta = pte_metadata(spec.path)
    elif spec.kind == "xml":
        from dtop_export.engines.openvino import ir_metadata

        meta = ir_metadata(spec.path)
        meta = meta if "dtop.descriptor_dim" in meta else None  # the engine reads it from the output's shape
    if meta is not None:
        if "dtop.descriptor_dim" not in meta:
            raise DToPError(f"{spec.path} carries no dtop metadata (dtop.descriptor_dim): export it with dtop-export")
        return ModelContract(preprocess_from_metadata(meta), int(meta["dtop.descriptor_dim"]))
    with open_model(model, threads=1) as engine:
        return ModelContract(engine.preprocess, engine.descriptor_dim)


def engine_options(
    model: str | EngineSpec, threads: int | None = None, precision: str | None = None, shared_cores: bool = False
) -> tuple[Path, dict[str, Any]]:
    """(file, engine options) of MODEL (a file or ``FILE:options`` as ``bench`` takes them, or the
    :class:`EngineSpec` :func:`resolve_engine` made of one) with ``threads`` CPU
    threads (every CPU engine takes them, PyTorch sets torch's; a TensorRT plan has none) and ``precision`` (the
    runtimes that choose one at load time: PyTorch, OpenVINO; a file for ONNX Runtime or TensorRT carries its
    own, so only ``fp32``/None is accepted there; an ExecuTorch ``.pte`` checks it against its own; ``auto``: the
    file and options ``bench --recommend`` chose for this checkpoint on this CPU). ``shared_cores``: other work (a
    corpus job's decoding) runs on the engine's cores, so ONNX Runtime's idle threads sleep instead of spinning
    (``spin=false``, unless MODEL sets it): measured on 2 cores, a spinning session left the decoding 0.79 of a
    perfect overlap, a sleeping one 1.00. Bad options are a :class:`DToPError`, before any work."""
    from dtop_export.bench.spec import PRECISIONS, EngineSpec, parse_spec

    spec = model if isinstance(model, EngineSpec) else parse_spec(model)
    if not spec.path.is_file():
        raise DToPError(f"model file {spec.path} not found")
    options = dict(spec.options)
    if options.get("precision") == "auto" and precision in (None, "auto"):  # MODEL:auto is --precision auto
        del options["precision"]
        precision = "auto"
    if precision == "auto":  # the file + options `bench --recommend` measured fastest within contract here
        from dtop_export.bench.recommend import resolve_auto

        path, options = resolve_auto(spec.path)
        spec, precision = parse_spec(str(path)), None
    if threads and not _is_plan(spec):
        options["threads"] = threads
    if shared_cores and spec.kind == "onnx" and options.get("runtime") != "openvino":
        options.setdefault("spin", False)
    if precision is None and "precision" not in options and spec.kind == "xml":
        from dtop_export.engines.openvino import recorded_precision, xml_metadata

        # what the IR runs at unless told: named, so that a corpus job's settings say it (a job begun when such an
        # IR ran at fp32 is not continued at bf16) and every replica opens it the same way
        recorded = recorded_precision(xml_metadata(spec.path))[1]  # the .xml alone: no OpenVINO import
        if recorded is not None:
            options["precision"] = recorded
    if precision is not None:
        if precision not in PRECISIONS:
            raise DToPError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
        if spec.kind in ("checkpoint", "xml", "pte") or options.get("runtime") == "openvino":
            options["precision"] = precision
        elif precision != "fp32":
            raise DToPError(
                f"{spec.path.name} runs at the precision it was built with: make a {precision} file "
                f"(`dtop-export quantize`, `trt --fp16`) or run it in OpenVINO ({spec.path.name}:openvino)"
            )
    return spec.path, options


def resolve_engine(model: str, precision: str | None = None) -> EngineSpec:
    """What MODEL with ``precision`` runs, threads left out: ``--precision auto`` resolved (on the machine that calls
    this: a corpus job's driver, whose choice every Ray actor then opens) and an OpenVINO IR's recorded precision
    named. :func:`engine_options` and :func:`open_model` take it as MODEL, with ``precision`` None."""
    from dtop_export.bench.spec import EngineSpec

    path, options = engine_options(model, None, precision)
    return EngineSpec(path, options)


def node_threads(threads: int | None) -> int | None:
    """``threads`` capped at the CPUs this process may run on: what a Ray actor or Serve replica opens its engine
    with. The driver sizes them from Ray's logical CPUs (``--num-cpus``, a CPU quota), which a node's affinity can
    undercut; on the node the engine fits the node instead of being refused there."""
    if not threads:
        return threads
    from dtop_export.host import usable_cpus

    return min(threads, usable_cpus())


def check_model_options(
    model: str | EngineSpec, threads: int | None = None, precision: str | None = None, local_threads: bool = True
) -> None:
    """MODEL's engine options (``MODEL:key=value``, ``threads``, ``precision``) checked as :func:`open_model` will
    use them, without opening it: a corpus job refuses a typo before its output folder exists, not when the engine
    opens. ``local_threads=False`` where the engine runs elsewhere (a Ray actor checks threads on its node)."""
    from dtop_export.engines import check_engine_options

    path, options = engine_options(model, threads, precision, shared_cores=True)
    check_engine_options(path, options, local_threads=local_threads)


def _is_plan(spec: EngineSpec) -> bool:
    from dtop_export.engines import PLAN_SUFFIXES

    return spec.path.suffix.lower() in PLAN_SUFFIXES


def gpu_reason(spec: EngineSpec) -> str | None:
    """Why the model of ``spec`` runs on an NVIDIA GPU (``a TensorRT plan``, ``device=cuda``,
    ``provider=cuda``), or None."""
    from dtop_export.engines.ort import PROVIDERS

    if _is_plan(spec):
        return "a TensorRT plan"
    device, provider = str(spec.options.get("device", "cpu")), str(spec.options.get("provider", "cpu"))
    if spec.kind == "checkpoint" and device.startswith("cuda"):
        return f"device={device}"
    if spec.kind == "onnx" and provider in PROVIDERS and provider != "cpu":
        return f"provider={provider}"
    return None


def check_placement(model: str, use_ray: bool, gpus_per_actor: float) -> None:
    """Refuse, before any output, a GPU model where it cannot get one: a Ray job whose actors reserve no GPU
    (Ray hides every GPU from them), or a PyTorch checkpoint on CUDA in a process that sees none (the check
    :class:`~dtop_export.engines.pytorch.TorchEngine` makes when it loads, made before the job writes)."""
    from dtop_export.bench.spec import parse_spec

    spec = parse_spec(model)
    why = gpu_reason(spec)
    if why is None:
        return
    if use_ray:
        if not gpus_per_actor:
            raise DToPError(
                f"{model} runs on a GPU ({why}): give --gpus-per-actor (1 for a GPU per actor); Ray hides the GPUs "
                "from actors that reserve none"
            )
    elif spec.kind == "checkpoint":
        from dtop_export.engines.pytorch import check_device

        check_device(str(spec.options["device"]))


def check_gpu_decode(model: str, use_ray: bool) -> None:
    """``--gpu-decode`` needs the in-process runner and a PyTorch model on a CUDA device this process sees."""
    from dtop_export.bench.spec import parse_spec

    if use_ray:
        raise DToPError("--gpu-decode runs in-process only: leave out --ray (Ray's read tasks decode on the CPUs)")
    spec = parse_spec(model)
    device = str(spec.options.get("device", "cpu"))
    if spec.kind != "checkpoint" or not device.startswith("cuda"):
        raise DToPError(
            f"--gpu-decode decodes on the engine's CUDA device: give a checkpoint on one (MODEL.pt:device=cuda), "
            f"not {model}"
        )
    from dtop_export.engines.pytorch import check_device

    check_device(device)


def open_model(
    model: str | EngineSpec, threads: int | None = None, precision: str | None = None, shared_cores: bool = False
) -> Engine:
    """The engine of MODEL with the options of :func:`engine_options`."""
    from dtop_export.engines import load_engine

    path, options = engine_options(model, threads, precision, shared_cores)
    return load_engine(path, **options)
