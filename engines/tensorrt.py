"""TensorRT: build a serialized engine (``.plan``) from a dtop-export ONNX file and run it (10.x and 11.x).

Builder (Polygraphy's ``EngineFromNetwork`` in small): ONNX parser (errors name the node and its op),
one optimization profile per ``--min/--opt/--max`` triple, workspace memory-pool limit, timing cache
loaded and saved, optional TF32 off. Precision:

* **strongly typed** (default; the only mode on TensorRT 11): ``--fp16`` builds the FP16 ONNX of
  :mod:`dtop_export.fp16` (FP16 with FP32 islands made by ``Cast`` nodes); without it the float32 ONNX
  builds as FP32 (TF32 allowed unless turned off).
* **weakly typed** (TensorRT 10.0–10.11; deprecated from 10.12, removed in 11): the float32 ONNX with
  ``BuilderFlag.FP16`` and ``OBEY_PRECISION_CONSTRAINTS``, the islands' layers pinned to FP32.

Every plan gets a JSON sidecar (``model.plan.json``): TensorRT version, GPU name and compute capability,
profiles, precision, ONNX sha256, build time and the model's preprocessing metadata. The runner reads it
first, so an engine built by another TensorRT or for another GPU fails with that message instead of
crashing in deserialisation. The runner sets input shapes per call, splits batches larger than the
profile allows, rejects sizes outside every profile, and runs ``execute_async_v3`` on its own CUDA stream
with device buffers from torch.

Without TensorRT or a GPU every entry point fails at once with one line saying what is missing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dtop_export._io import atomic_write_bytes, atomic_write_text
from dtop_export.errors import DToPError, ShapeError
from engines.base import Engine

log = logging.getLogger(__name__)

INSTALL_HINT = "install it on a CUDA machine with: pip install 'dtop-export[gpu]'"
SIDECAR_FORMAT = "dtop-export/tensorrt-plan"
SIDECAR_VERSION = 1
DEFAULT_MIN, DEFAULT_OPT, DEFAULT_MAX = "1x3x224x224", "1x3x512x512", "8x3x1024x1024"
WEAK_TYPING_DEPRECATED = (10, 12)  # FP16 flag and layer precision deprecated from here, removed in 11


# what is installed --------------------------------------------------------------------------------------


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


# profiles -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One optimization profile of the ``images`` input: min/opt/max shapes [B, 3, H, W]."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[int]]) -> Profile:
        return cls(tuple(int(v) for v in d["min"]), tuple(int(v) for v in d["opt"]), tuple(int(v) for v in d["max"]))

    def accepts(self, chw: Sequence[int]) -> bool:
        """Whether an input [*, C, H, W] fits the non-batch dims."""
        return all(lo <= v <= hi for lo, v, hi in zip(self.min[1:], chw, self.max[1:]))

    def describe(self) -> str:
        """``1x3x224x224 .. 8x3x1024x1024 (opt 1x3x512x512)``."""
        return f"{format_shape(self.min)} .. {format_shape(self.max)} (opt {format_shape(self.opt)})"


def format_shape(shape: Sequence[int]) -> str:
    """(1, 3, 224, 224) -> ``1x3x224x224``."""
    return "x".join(str(int(v)) for v in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` (or trtexec's ``images:1x3x224x224``) -> (1, 3, 224, 224)."""
    body = text.strip().split(":")[-1]
    try:
        dims = tuple(int(v) for v in body.lower().replace("*", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise DToPError(f"cannot read shape {text!r}: write BxCxHxW with positive sizes, e.g. 1x3x512x512")
    return dims


def make_profiles(
    mins: Sequence[str] = (),
    opts: Sequence[str] = (),
    maxs: Sequence[str] = (),
    stride: int = 16,
) -> list[Profile]:
    """Profiles from repeated ``--min/--opt/--max`` options (the i-th of each form profile i).

    Nothing given: one profile ``1x3x224x224 .. 8x3x1024x1024 (opt 1x3x512x512)``. With one profile, a
    missing option takes that default. Every shape must be [B, 3, H, W] with min <= opt <= max and H, W
    multiples of ``stride``.
    """
    n = max(len(mins), len(opts), len(maxs), 1)
    if n > 1 and not (len(mins) == len(opts) == len(maxs)):
        raise DToPError(
            f"for {n} profiles give --min, --opt and --max {n} times each (got {len(mins)}, {len(opts)}, {len(maxs)})"
        )
    mins = list(mins) or [DEFAULT_MIN]
    opts = list(opts) or [DEFAULT_OPT]
    maxs = list(maxs) or [DEFAULT_MAX]
    profiles = []
    for lo_t, op_t, hi_t in zip(mins, opts, maxs):
        p = Profile(parse_shape(lo_t), parse_shape(op_t), parse_shape(hi_t))
        for label, shape in (("min", p.min), ("opt", p.opt), ("max", p.max)):
            if shape[1] != 3:
                raise DToPError(f"--{label} {format_shape(shape)}: the model takes 3 channels (Bx3xHxW)")
            if shape[2] % stride or shape[3] % stride:
                raise DToPError(
                    f"--{label} {format_shape(shape)}: height and width must be multiples of the model stride {stride}"
                )
        if not all(a <= b <= c for a, b, c in zip(p.min, p.opt, p.max)):
            raise DToPError(f"profile {p.describe()}: need min <= opt <= max in every dimension")
        profiles.append(p)
    return profiles


def select_profile(profiles: Sequence[Profile], chw: Sequence[int]) -> int:
    """Index of the profile that takes an input [*, C, H, W]: among those whose range holds it, the one
    whose opt size is closest. Raises :class:`ShapeError` naming the ranges when none does."""
    c, h, w = (int(v) for v in chw)
    fits = [i for i, p in enumerate(profiles) if p.accepts((c, h, w))]
    if not fits:
        ranges = "; ".join(f"H {p.min[2]}..{p.max[2]}, W {p.min[3]}..{p.max[3]}" for p in profiles)
        raise ShapeError(
            f"input {h}x{w} is outside the engine's optimization profile(s) ({ranges}): resize the image, "
            "or rebuild with --min/--max covering it"
        )
    return min(fits, key=lambda i: abs(profiles[i].opt[2] * profiles[i].opt[3] - h * w))


def split_batches(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Chunks ``(start, stop, pad)`` covering ``n`` images with at most ``max_batch`` each; a chunk smaller
    than ``min_batch`` is padded by ``pad`` copies of its last image (results of the padding are dropped)."""
    if n < 1:
        return []
    if min_batch < 1 or max_batch < min_batch:
        raise ValueError(f"bad batch range {min_batch}..{max_batch}")
    out = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        out.append((start, stop, max(0, min_batch - (stop - start))))
    return out


# sidecar ------------------------------------------------------------------------------------------------


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
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DToPError(f"cannot read the engine sidecar {path}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
        raise DToPError(f"{path} is not a dtop-export TensorRT sidecar (format {SIDECAR_FORMAT!r} expected)")
    if int(d.get("format_version", 0)) > SIDECAR_VERSION:
        raise DToPError(f"{path} was written by a newer dtop-export: upgrade dtop-export")
    try:
        return PlanInfo.from_dict(d)
    except TypeError as e:
        raise DToPError(f"{path} is incomplete ({e}): rebuild the engine with `dtop-export trt`") from e


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


# trtexec ------------------------------------------------------------------------------------------------


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    profiles: Sequence[Profile],
    *,
    input_name: str = "images",
    typing: str = "strong",
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    fp32_layers: Sequence[str] = (),
    tf32: bool = True,
) -> str:
    """The trtexec command line equivalent to :func:`build_engine` (shell-quoted).

    ``typing``: ``strong`` (``--stronglyTyped``; the ONNX's types decide, a no-op default on 11.x) or
    ``weak`` (10.x: ``--fp16`` with ``fp32_layers`` pinned by ``--layerPrecisions``/``--layerOutputTypes``
    and ``--precisionConstraints=obey``).
    """
    if typing not in ("strong", "weak"):
        raise ValueError(f"typing must be 'strong' or 'weak', got {typing!r}")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    for p in profiles:
        args += [
            f"--minShapes={input_name}:{format_shape(p.min)}",
            f"--optShapes={input_name}:{format_shape(p.opt)}",
            f"--maxShapes={input_name}:{format_shape(p.max)}",
        ]
    args.append(f"--memPoolSize=workspace:{round(workspace_gb * 1024)}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if typing == "strong":
        args.append("--stronglyTyped")
    else:
        args += ["--fp16", "--precisionConstraints=obey"]
        if fp32_layers:
            spec = ",".join(f"{name}*:fp32" for name in fp32_layers)
            args += [f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if not tf32:
        args.append("--noTF32")
    return shlex.join(args)


# builder ------------------------------------------------------------------------------------------------


def _make_logger(trt: ModuleType, verbose: bool = False) -> Any:
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


def parser_error_lines(parser: Any) -> list[str]:
    """One line per ONNX-parser error: ``node 'name' (Op): description``."""

    def call(obj: Any, name: str) -> Any:
        fn = getattr(obj, name, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - older bindings lack some accessors
            return None

    lines = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        desc = " ".join(str(call(err, "desc") or "unknown error").split())
        node_name, op, node = call(err, "node_name"), call(err, "node_operator"), call(err, "node")
        if node_name:
            where = f"node {node_name!r} ({op or '?'})"
        elif node is not None and int(node) >= 0:
            where = f"node #{int(node)}" + (f" ({op})" if op else "")
        else:
            where = "graph"
        lines.append(f"{where}: {desc}")
    return lines


def layer_owner(layer_name: str, node_names: Sequence[str]) -> str | None:
    """The ONNX node a TensorRT layer came from: the longest node name equal to the layer name or a prefix
    of it followed by a non-alphanumeric character (the parser names layers after their node and
    suffixes the extra layers it creates)."""
    best = None
    for n in node_names:
        if not n or not layer_name.startswith(n):
            continue
        rest = layer_name[len(n) :]
        if rest and rest[0].isalnum():
            continue
        if best is None or len(n) > len(best):
            best = n
    return best


def pin_layers_fp32(trt: ModuleType, network: Any, keep_nodes: Sequence[str], all_nodes: Sequence[str]) -> list[str]:
    """Weak typing: set ``precision`` and output types to FP32 on every layer that came from one of
    ``keep_nodes`` (by layer name, or by an output tensor named like the node's). Returns the layer names."""
    keep = set(keep_nodes)
    floats = {trt.float32, trt.float16}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        owner = layer_owner(layer.name, all_nodes)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if owner not in keep and not any(layer_owner(t.name, all_nodes) in keep for t in outputs):
            continue
        if not any(t.dtype in floats for t in outputs):
            continue
        layer.precision = trt.float32
        for j, t in enumerate(outputs):
            if t.dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


@dataclass
class BuildResult:
    """What :func:`build_engine` wrote."""

    plan: Path
    sidecar: Path
    info: PlanInfo
    seconds: float
    size_bytes: int
    built_onnx: Path


def prepare_fp16_onnx(
    onnx_path: Path, out_path: Path, keep_fp32_nodes: Sequence[str] = (), keep_fp32_ops: Sequence[str] | None = None
) -> tuple[Path, list[str]]:
    """The ONNX a strongly typed ``--fp16`` build parses: ``onnx_path`` itself when it is already FP16, else
    its FP16 conversion written to ``out_path``. Returns (path, FP32 island nodes)."""
    import onnx

    from dtop_export.fp16 import DEFAULT_KEEP_FP32_OPS, convert_to_fp16, fp32_nodes_of, is_fp16_model

    model = onnx.load(str(onnx_path))
    if is_fp16_model(model):
        if keep_fp32_nodes:
            raise DToPError(f"{onnx_path} is already FP16: pass the float32 export to add --keep-fp32 nodes")
        return onnx_path, fp32_nodes_of(model)
    converted = convert_to_fp16(model, keep_fp32_ops or DEFAULT_KEEP_FP32_OPS, keep_fp32_nodes)
    from dtop_export._io import atomic_path

    with atomic_path(out_path) as tmp:
        onnx.save_model(converted, str(tmp))
    return out_path, fp32_nodes_of(converted)


def _onnx_facts(onnx_path: Path) -> tuple[dict[str, str], list[str], bool]:
    """(dtop metadata, node names, is FP16) of an ONNX file, without loading its weights twice."""
    import onnx

    from dtop_export.fp16 import is_fp16_model, name_nodes

    model = onnx.load(str(onnx_path))
    name_nodes(model)
    meta = {p.key: p.value for p in model.metadata_props}
    return meta, [n.name for n in model.graph.node], is_fp16_model(model)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    fp16: bool = False,
    profiles: Sequence[Profile] | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    weak_typing: bool = False,
    tf32: bool = True,
    keep_fp32_nodes: Sequence[str] = (),
    fp16_onnx_path: str | Path | None = None,
    device: int = 0,
    verbose: bool = False,
) -> BuildResult:
    """Build ``plan_path`` (+ its sidecar) from the dtop-export ONNX ``onnx_path`` on this GPU.

    ``fp16``: strongly typed FP16 ONNX with FP32 islands (written to ``fp16_onnx_path``, default
    ``<plan>.fp16.onnx``), or with ``weak_typing`` (TensorRT 10.0–10.11) the FP16 flag with the islands'
    layers pinned to FP32. ``profiles`` default to :func:`make_profiles`'s. ``timing_cache`` is loaded
    when it exists and saved after the build. ``tf32=False`` for strict FP32 parity.
    """
    t0 = time.perf_counter()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise DToPError(f"ONNX file {onnx_path} not found")
    if workspace_gb <= 0:
        raise DToPError(f"--workspace must be > 0 GiB, got {workspace_gb:g}")
    if weak_typing and not fp16:
        raise DToPError("--weak-typing only applies to --fp16 builds")
    meta, node_names, onnx_is_fp16 = _onnx_facts(onnx_path)
    stride = int(meta.get("dtop.stride", 16))
    profiles = list(profiles) if profiles else make_profiles(stride=stride)
    trt, gpu = require_tensorrt_and_gpu(device)
    version = trt.__version__
    if weak_typing:
        vt = version_tuple(version)
        if vt[:1] != (10,):
            raise DToPError(
                f"--weak-typing needs TensorRT 10.x (this is {version}: 11 builds strongly typed only): drop "
                "--weak-typing, --fp16 then builds the FP16 ONNX with FP32 islands"
            )
        if onnx_is_fp16:
            raise DToPError(f"{onnx_path} is already FP16: --weak-typing builds from the float32 export")
        if vt[:2] >= WEAK_TYPING_DEPRECATED:
            log.warning("TensorRT %s deprecates weak typing (FP16 flag, layer precision); 11 removes it", version)

    # what the parser reads, and which nodes stay FP32
    keep_nodes: list[str] = []
    source = onnx_path
    if fp16 and not weak_typing:
        dst = Path(fp16_onnx_path) if fp16_onnx_path else plan_path.with_suffix(".fp16.onnx")
        source, keep_nodes = prepare_fp16_onnx(onnx_path, dst, keep_fp32_nodes)
    elif fp16:
        import onnx

        from dtop_export.fp16 import plan_fp32_islands

        keep_nodes = sorted(plan_fp32_islands(onnx.load(str(onnx_path)), keep_fp32_nodes=keep_fp32_nodes).islands)
    elif onnx_is_fp16:
        fp16 = True  # the file's types decide: an FP16 ONNX builds FP16 even without the flag

    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    strong = not weak_typing
    strong_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong and strong_flag is not None:  # 10.x opts in; 11.x is always strongly typed
        flags |= 1 << int(strong_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        lines = parser_error_lines(parser) or [logger.last_error or "unknown parser error"]
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        raise DToPError(
            f"TensorRT's ONNX parser rejected {source.name}: {lines[0]}{more}; "
            f"`dtop-export check {source} --target tensorrt` lists every problem"
        )
    if network.num_inputs != 1:
        raise DToPError(f"{source.name} has {network.num_inputs} inputs: a dtop-export model has one (images)")
    inp = network.get_input(0)
    input_name, net_shape = inp.name, tuple(inp.shape)
    _check_static_dims(net_shape, profiles)
    output_name = network.get_output(0).name if network.num_outputs else "descriptors"

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned: list[str] = []
    if weak_typing:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_layers_fp32(trt, network, keep_nodes, node_names)
    for p in profiles:
        prof = builder.create_optimization_profile()
        prof.set_shape(input_name, p.min, p.opt, p.max)
        config.add_optimization_profile(prof)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s was made on another device or TensorRT: starting a new one", timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DToPError(
            f"TensorRT could not build the engine: {logger.last_error or 'see the TensorRT log'} "
            "(try a larger --workspace or a narrower profile)"
        )
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))

    from dtop_export import __version__

    seconds = time.perf_counter() - t0
    info = PlanInfo(
        tensorrt_version=version,
        gpu={"name": gpu.name, "compute_capability": gpu.compute_capability, "index": gpu.index},
        profiles=[p.to_dict() for p in profiles],
        precision={
            "mode": "fp16" if fp16 else "fp32",
            "typing": "weak" if weak_typing else "strong",
            "tf32": bool(tf32),
            "fp32_nodes": keep_nodes,
            "fp32_layers_pinned": len(pinned),
        },
        onnx={"path": str(onnx_path), "sha256": sha256_file(onnx_path), "built_from": str(source)},
        build={
            "seconds": round(seconds, 2),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "workspace_gb": workspace_gb,
            "timing_cache": str(timing_cache) if timing_cache else None,
            "cuda": _torch_cuda_version(),
        },
        input_name=input_name,
        output_name=output_name,
        metadata={k: v for k, v in meta.items() if k.startswith("dtop.")},
        toolkit_version=__version__,
    )
    side = write_sidecar(plan_path, info)
    return BuildResult(plan_path, side, info, seconds, plan_path.stat().st_size, source)


def _check_static_dims(net_shape: Sequence[int], profiles: Sequence[Profile]) -> None:
    """A static ONNX dimension must equal min = opt = max of every profile."""
    if len(net_shape) != 4:
        raise DToPError(f"the network input has rank {len(net_shape)}: expected images [B, 3, H, W]")
    names = ("batch", "channels", "height", "width")
    for p in profiles:
        for d, (fixed, lo, op, hi) in enumerate(zip(net_shape, p.min, p.opt, p.max)):
            if fixed >= 0 and not fixed == lo == op == hi:
                raise DToPError(
                    f"the ONNX fixes {names[d]} = {fixed} but the profile asks {lo}..{hi}: make --min/--opt/--max "
                    f"use {fixed} there, or re-export without --static/--batch"
                )


def _torch_cuda_version() -> str | None:
    try:
        import torch

        return torch.version.cuda
    except ImportError:  # pragma: no cover
        return None


# runner -------------------------------------------------------------------------------------------------


class TensorRTEngine(Engine):
    """Runs a ``.plan`` built by :func:`build_engine` (its JSON sidecar next to it) on a CUDA GPU.

    Input shapes are set per call; a batch larger than the profile's maximum is split, one smaller than
    its minimum padded; a size outside every profile is a :class:`ShapeError`.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, sidecar: str | Path | None = None, device: int = 0) -> None:
        from dtop_export.checks import preprocess_from_metadata

        self.source = Path(path)
        if not self.source.is_file():
            raise DToPError(f"engine file {self.source} not found")
        self.info = read_sidecar(self.source, sidecar)
        trt, gpu = require_tensorrt_and_gpu(device)
        problem, warning = compatibility(self.info, trt.__version__, gpu)
        if problem:
            raise DToPError(f"{self.source}: {problem}")
        if warning:
            log.warning("%s: %s", self.source, warning)
        import torch

        self._trt = trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.source.read_bytes())
        if self.engine is None:
            raise DToPError(
                f"TensorRT could not load {self.source} ({self._logger.last_error or 'corrupt or foreign plan'}): "
                "rebuild it with `dtop-export trt`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input, self._output = self.info.input_name, self.info.output_name
        if self._input not in names or self._output not in names:
            raise DToPError(f"{self.source} has tensors {names}, expected {self._input} and {self._output}")
        self.profiles = [
            Profile(*(tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(self._input, k)))
            for k in range(self.engine.num_optimization_profiles)
        ]
        self.device = f"cuda:{device}"
        self._torch_device = torch.device(self.device)
        self.precision = str(self.info.precision.get("mode", "fp32"))
        meta = self.info.metadata
        self.preprocess = preprocess_from_metadata(meta)
        self.stride = self.preprocess.stride
        self.descriptor_dim = int(meta.get("dtop.descriptor_dim", 0)) or int(
            self.engine.get_tensor_shape(self._output)[-1]
        )
        self._stream = torch.cuda.Stream(device=self._torch_device)  # not the default stream
        self._contexts: dict[int, Any] = {}

    def _context(self, k: int) -> Any:
        ctx = self._contexts.get(k)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise DToPError(f"TensorRT could not create an execution context: {self._logger.last_error}")
            if self.engine.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(k, self._stream.cuda_stream)
            self._contexts[k] = ctx
        return ctx

    def _torch_dtype(self, name: str) -> Any:
        import torch

        dt = self.engine.get_tensor_dtype(name)
        table = {self._trt.float32: torch.float32, self._trt.float16: torch.float16}
        if dt not in table:
            raise DToPError(f"{self.source}: tensor {name} has type {dt}, expected float32 or float16")
        return table[dt]

    def _run(self, k: int, chunk: np.ndarray) -> np.ndarray:
        import torch

        ctx = self._context(k)
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(chunk).to(self._torch_device, dtype=self._torch_dtype(self._input))
            if not ctx.set_input_shape(self._input, tuple(chunk.shape)):
                raise ShapeError(f"{self.source}: TensorRT refused input shape {format_shape(chunk.shape)}")
            out = torch.empty(
                tuple(ctx.get_tensor_shape(self._output)),
                dtype=self._torch_dtype(self._output),
                device=self._torch_device,
            )
            ctx.set_tensor_address(self._input, x.data_ptr())
            ctx.set_tensor_address(self._output, out.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise DToPError(f"TensorRT execution failed: {self._logger.last_error or 'see the TensorRT log'}")
            result = out.float().cpu()
        self._stream.synchronize()
        return result.numpy()

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = self._check_images(images)
        k = select_profile(self.profiles, x.shape[1:])
        prof = self.profiles[k]
        outs = []
        for start, stop, pad in split_batches(x.shape[0], prof.min[0], prof.max[0]):
            chunk = x[start:stop]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self._run(k, np.ascontiguousarray(chunk))[: stop - start])
        return np.concatenate(outs).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "tensorrt_version": self.info.tensorrt_version,
            "gpu": self.info.gpu.get("name"),
            "typing": self.info.precision.get("typing"),
            "profiles": [p.describe() for p in self.profiles],
        }

    def close(self) -> None:
        self._contexts.clear()
