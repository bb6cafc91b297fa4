"""``dtop-export executorch``: a DToP checkpoint as an ExecuTorch program (``.pte``) for one square input size.

Pipeline per size S: load the checkpoint -> fold (BN, weight standardisation, head BN, whitening, as for the ONNX)
-> the XNNPACK form (:mod:`~dtop_export.edge.xnnpack_form`: position embedding resampled once for the S/stride
grid, norms and attention rewritten) -> ``torch.export`` at [1, 3, S, S] -> INT8 (optional, see below) ->
``to_edge_transform_and_lower`` with the XNNPACK partitioner (plus the glue pass) -> ``to_executorch`` -> the
deployment contract as the constant method ``dtop_metadata`` -> atomic write.

INT8 (:data:`INT8_RECIPE`): PT2E with ExecuTorch's XNNPACK quantizer, **dynamic**: the weights of the transformer
blocks' linear layers (:data:`INT8_ROLES` less :data:`DEFAULT_KEEP_FLOAT`: qkv, proj, fc1) int8 per output channel
(symmetric), their activations quantised per row at run time (XNNPACK's QD8 fully-connected kernels). Float: the
blocks' fc2, the branch FCs, the head and the whitening (like the ``Gemm`` nodes of ``dtop-export quantize``), the
convolutions, the norm statistics, softmax and GELU. Measured on a trained small checkpoint (benchmarks/README.md,
"ExecuTorch"): static per-tensor activations on every op XNNPACK quantises lost the INT8 contract (cosine min 0.50);
static on the linear/conv layers only leaves quantised tensors XNNPACK's graph compiler rejects (``cat``/``add``
across mixed scales); dynamic on all four block layers: cosine 0.998 but ΔmAP Hard -1.21, outside the contract;
with fc2 float -0.24 (PASS); the head and whitening quantised too: cosine 0.943. Dynamic activations need no
calibration: the ``--calib`` images (the one preprocessing path, the program's square resize) check the written
INT8 program, run by ExecuTorch, against the fp32 model instead, and the result travels in ``dtop.quantization``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export import __version__
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import torch

    from dtop_export.checkpoint import Checkpoint
    from dtop_export.preprocess import PreprocessConfig

INT8_RECIPE = "dynamic"
# The transformer blocks' linear layers INT8 can take, by the name of the layer in its block.
INT8_ROLES = ("qkv", "proj", "fc1", "fc2")
DEFAULT_KEEP_FLOAT = ("fc2",)
# What the lowered graph leaves to ExecuTorch's portable kernels: ops the glue pass cannot move (none on DToP) and
# the bookkeeping nodes that are not operators.
_NOT_OPERATORS = ("getitem", "executorch_call_delegate")


@dataclass
class Delegation:
    """What of the lowered graph runs inside XNNPACK: its partitions, and the operators left outside by name."""

    partitions: int
    outside: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """E.g. ``1 XNNPACK partition, nothing outside`` or ``3 XNNPACK partitions; outside: mean.dim x1``."""
        text = f"{self.partitions} XNNPACK partition{'s' if self.partitions != 1 else ''}"
        if not self.outside:
            return text + ", nothing outside"
        return text + "; outside: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.outside.items()))

    def to_dict(self) -> dict[str, Any]:
        outside = dict(sorted(self.outside.items()))
        return {"backend": "XnnpackBackend", "partitions": self.partitions, "outside": outside}


@dataclass
class PteResult:
    """What :func:`write_pte` wrote and how long each stage took."""

    path: Path
    size: int
    precision: str
    seconds: float
    size_bytes: int
    delegation: Delegation
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size": self.size,
            "precision": self.precision,
            "seconds": round(self.seconds, 2),
            "size_bytes": self.size_bytes,
            "delegation": self.delegation.to_dict(),
            "stage_seconds": self.stage_seconds,
            "rewrites": self.rewrites,
            "quantization": self.quantization,
        }


def square_preprocess(pp: PreprocessConfig, size: int) -> PreprocessConfig:
    """The preprocessing a program for ``size``² inputs takes: the whole image resized to that square."""
    return replace(pp, resize="square", size=size)


def program_contract(ckpt: Checkpoint, size: int, descriptor_dim: int, whiten: bool, precision: str) -> dict[str, str]:
    """The ``dtop.*`` strings a ``.pte`` carries: the ONNX export's keys for a static [1, 3, S, S] input, the square
    resize policy, and the ExecuTorch/torch releases that made it."""
    from importlib.metadata import version

    from dtop_export.contract import onnx_metadata
    from dtop_export.engines.executorch import PTE_FORMAT

    meta = onnx_metadata(ckpt, descriptor_dim, whiten, 0, (size, size), 1, precision=precision)
    meta.pop("dtop.opset")
    pp = square_preprocess(ckpt.preprocess, size)
    return meta | {
        "dtop.format": PTE_FORMAT,
        "dtop.toolkit_version": __version__,
        "dtop.resize_policy": json.dumps({"policy": pp.resize, "size": pp.size, "interpolation": pp.interpolation}),
        "dtop.backend": "xnnpack",
        "dtop.executorch_version": version("executorch"),
        "dtop.torch_version": version("torch"),
    }


def delegation_of(edge_program: Any) -> Delegation:
    """Partitions and operators outside the delegate of a lowered ``EdgeProgramManager``."""
    graph = edge_program.exported_program().graph_module.graph
    partitions = 0
    outside: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            partitions += 1
        elif name not in _NOT_OPERATORS:
            outside[name.removeprefix("aten.")] += 1
    return Delegation(partitions, dict(outside))


def _export(module: torch.nn.Module, example: torch.Tensor) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (example,), strict=False)


def _within(node: Any, kinds: set[str]) -> bool:
    """Whether an exported node comes from a module of one of ``kinds`` (qualified class names)."""
    for _, kind in (node.meta.get("nn_module_stack") or {}).values():
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if name in kinds:
            return True
    return False


def _role(node: Any) -> str:
    """The name of the innermost module a node comes from (``qkv`` for ``...blocks.3.attn.qkv``)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return str(stack[-1][0]).rsplit(".", 1)[-1] if stack else ""


def quantize_dynamic(module: torch.nn.Module, example: torch.Tensor, keep_float: Sequence[str] = ()) -> Any:
    """:data:`INT8_RECIPE` on the XNNPACK form: an exported program whose transformer-block linear layers of the
    :data:`INT8_ROLES` not in ``keep_float`` (never the statistics matmuls of
    :data:`~dtop_export.edge.xnnpack_form.STATISTICS_MODULES`) run dynamically quantised."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from dtop_export.edge.xnnpack_form import STATISTICS_MODULES
    from dtop_export.logs import quiet_logging

    def names(kinds: Any) -> set[str]:
        return {f"{k.__module__}.{k.__qualname__}" for k in kinds}

    blocks = names({type(b) for b in module.model.encoder.blocks})
    statistics = names(STATISTICS_MODULES)
    quantizer = XNNPACKQuantizer()
    quantizer.set_operator_type(
        torch.ops.aten.linear.default, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    )
    roles = set(INT8_ROLES) - set(keep_float)
    quantizer.set_filter_function(
        lambda node: _within(node, blocks) and not _within(node, statistics) and _role(node) in roles
    )
    with quiet_logging(), torch.no_grad():
        prepared = prepare_pt2e(_export(module, example).module(), quantizer)
        prepared(example)  # dynamic ranges: one pass records nothing but the graph's observers want a call
        converted = convert_pt2e(prepared)
    return _export(converted, example)


def lower_to_xnnpack(exported: Any) -> tuple[Any, Delegation]:
    """``exported`` lowered to XNNPACK (after the glue pass), with a placeholder :data:`METADATA_METHOD`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from dtop_export.edge.xnnpack_form import xnnpack_glue_pass
    from dtop_export.engines.executorch import METADATA_METHOD
    from dtop_export.logs import quiet_logging

    with quiet_logging():
        edge = to_edge_transform_and_lower(
            exported,
            transform_passes=[xnnpack_glue_pass()],
            partitioner=[XnnpackPartitioner()],
            constant_methods={METADATA_METHOD: "{}"},  # the contract is set by emit_program, once known
        )
    return edge, delegation_of(edge)


def emit_program(edge: Any, metadata: dict[str, str], keep: bool = False) -> bytes:
    """The ``.pte`` bytes of the lowered ``edge`` with ``metadata`` as its contract. ``to_executorch`` transforms the
    programs in place: ``keep`` emits a copy, so that ``edge`` can be emitted again."""
    from dtop_export.engines.executorch import METADATA_METHOD

    if keep:
        edge = copy.deepcopy(edge)
    methods = getattr(edge, "_config_methods", None)  # the constant methods to_executorch emits
    if not isinstance(methods, dict) or METADATA_METHOD not in methods:  # pragma: no cover - another ExecuTorch
        raise DToPError("this ExecuTorch keeps constant methods elsewhere: install the release [edge] pins")
    methods[METADATA_METHOD] = json.dumps(metadata, sort_keys=True)
    return edge.to_executorch().buffer


def check_int8(fp32: torch.nn.Module, program: bytes, tensors: Sequence[np.ndarray]) -> dict[str, Any]:
    """:func:`~dtop_export.int8_check.agreement` of the INT8 ``program``'s descriptors (run by ExecuTorch) with the
    fp32 model's on ``tensors`` ([1, 3, S, S] each)."""
    import torch

    from dtop_export.engines.executorch import load_program_bytes, native_log, set_threads
    from dtop_export.int8_check import agreement

    loaded = load_program_bytes(program, "the INT8 program")
    set_threads(None)  # the CPUs this process may run on, not the machine's
    fp32_out, int8_out = [], []
    with torch.no_grad(), native_log():  # the thread pool's first use probes the CPU, at Info level on stderr
        method = loaded.load_method("forward")
        for x in tensors:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            fp32_out.append(fp32(t).numpy())
            int8_out.append(method.execute([t])[0].numpy())
    return agreement(fp32_out, int8_out, "the fp32 model in PyTorch (eager, the same fold)")


def check_record(check: dict[str, Any], images: int, source: str) -> dict[str, Any]:
    """``check`` (:func:`check_int8`, on ``images`` images of ``source``) as ``dtop.quantization`` records it, with the
    keys of quantize's and openvino's checks (:meth:`~dtop_export.int8_check.CheckInputs.record`): ``held_out`` true,
    since the dynamic recipe calibrates nothing, so every check image is one calibration never saw."""
    from dtop_export.int8_check import CheckInputs

    return check | CheckInputs([], images, held_out=True).record() | {"source": source}


def refuse_below_contract(check: dict[str, Any], source: str, keep_float: Sequence[str]) -> None:
    """:func:`~dtop_export.int8_check.refuse_below_contract` for an INT8 program (its images only check it: the
    dynamic recipe calibrates nothing): nothing written, what to try instead."""
    from dtop_export.int8_check import refuse_below_contract as refuse

    more = [r for r in ("fc1", "proj", "qkv") if r not in keep_float][:1]
    roles = ",".join(r for r in INT8_ROLES if r in {*keep_float, *more})
    fix = [f"keeping more block layers float (--keep-float {roles})"] if more else []
    remedies = [*fix, "checking it on images like yours (--calib DIR)", "shipping the fp32 program (drop --int8)"]
    refuse(check, "the INT8 program", source, remedies, inputs="check images")


def check_keep_float(keep_float: Sequence[str]) -> None:
    """One line for ``--keep-float`` roles that are not :data:`INT8_ROLES`, or that leave nothing to quantise."""
    unknown = sorted(set(keep_float) - set(INT8_ROLES))
    if unknown:
        raise DToPError(f"unknown INT8 role(s) {', '.join(unknown)}: choose from {', '.join(INT8_ROLES)}")
    if set(keep_float) >= set(INT8_ROLES):
        raise DToPError("--keep-float leaves no layer to quantise: drop a role, or drop --int8")


def write_pte(
    checkpoint: str | Path | Checkpoint,
    output: str | Path,
    size: int,
    *,
    int8: bool = False,
    calib: Sequence[np.ndarray] = (),
    calibration_source: str = "",
    keep_float: Sequence[str] = (),
    whiten: bool = True,
    on_stage: Callable[[str], None] | None = None,
    staged: str | Path | None = None,
) -> PteResult:
    """Write the ``.pte`` of ``checkpoint`` for ``size``² inputs to ``output`` (atomic). ``int8``: the dynamic
    INT8 recipe, checked against the fp32 program on ``calib`` (preprocessed [1, 3, size, size] tensors); a program
    below the INT8 contract there is refused (:func:`refuse_below_contract`), not written. ``staged``: write the
    bytes there instead (a temporary file of :func:`~dtop_export.atomic.atomic_paths` that the caller puts at
    ``output`` once every program it makes is built and checked); the result still names ``output``."""
    import torch

    from dtop_export.atomic import atomic_write_bytes, output_folder
    from dtop_export.checkpoint import Checkpoint, load_checkpoint
    from dtop_export.edge.xnnpack_form import xnnpack_form
    from dtop_export.engines.executorch import require_executorch
    from dtop_export.export import StageTimer

    output = Path(output)
    if output.suffix.lower() != ".pte":
        raise DToPError(f"output {output} should end in .pte")
    output_folder(output)
    require_executorch()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    whiten = whiten and ckpt.whitening is not None
    check_keep_float(keep_float)
    bad = [tuple(x.shape) for x in calib if tuple(x.shape) != (1, 3, size, size)]
    if bad:
        raise DToPError(f"calibration tensors must be [1, 3, {size}, {size}], got {bad[0]}")
    stage = StageTimer(on_stage)
    stage("fold")
    module, rewrites = xnnpack_form(ckpt, size, whiten=whiten)
    example = torch.zeros(1, 3, size, size)
    stage("export")
    exported = _export(module, example)
    quantization: dict[str, Any] = {}
    if int8:
        stage("quantize")
        fp32_module = copy.deepcopy(module)
        exported = quantize_dynamic(module, example, keep_float)
        quantised = [r for r in INT8_ROLES if r not in keep_float]
        quantization = {
            "recipe": INT8_RECIPE,
            "tool": "PT2E XNNPACKQuantizer (torchao prepare_pt2e/convert_pt2e)",
            "weights": "int8 per output channel, symmetric: the transformer blocks' linear layers "
            f"({', '.join(quantised)})",
            "activations": "int8 per row, computed at run time (XNNPACK QD8)",
            "float": ", ".join(
                [*(f"block {r}" for r in keep_float), "branch FCs, head, whitening, convolutions (stem, ELM)"]
                + ["norm statistics, softmax, GELU"]
            ),
            "float_roles": list(keep_float),
        }
    stage("lower")
    precision = "int8" if int8 else "fp32"
    meta = program_contract(ckpt, size, module.descriptor_dim, whiten, precision)
    meta["dtop.rewrites"] = json.dumps(rewrites, sort_keys=True)
    edge, delegation = lower_to_xnnpack(exported)
    meta["dtop.delegation"] = json.dumps(delegation.to_dict(), sort_keys=True)
    if int8 and calib:
        stage("check")
        check = check_int8(fp32_module, emit_program(edge, meta, keep=True), calib)
        quantization["check"] = check_record(check, len(calib), calibration_source)
        refuse_below_contract(check, calibration_source, keep_float)
    if quantization:
        meta["dtop.quantization"] = json.dumps(quantization, sort_keys=True)
    stage("emit")
    data = emit_program(edge, meta)
    stage("write")
    if staged is None:
        atomic_write_bytes(output, data)
    else:
        Path(staged).write_bytes(data)
    stages = stage.seconds(2)
    return PteResult(
        path=output,
        size=size,
        precision=precision,
        seconds=time.perf_counter() - stage.start,
        size_bytes=len(data),
        delegation=delegation,
        stage_seconds=stages,
        rewrites=rewrites,
        quantization=quantization,
        metadata=meta,
    )


def check_program(path: str | Path, threads: int | None = None) -> dict[str, Any]:
    """What ``dtop-export check model.pte`` reports: the contract and delegation the program carries, the ExecuTorch
    that made it and the one running it, and one forward pass on a seeded random input at its size (descriptor
    size, finite, unit norm within 1e-4). ``passed`` is False when the forward pass breaks the contract."""
    from importlib.metadata import version

    from dtop_export.contract import metadata_report
    from dtop_export.engines.executorch import ExecuTorchEngine

    path = Path(path)
    t0 = time.perf_counter()
    with ExecuTorchEngine(path, threads=threads) as engine:
        load_s = time.perf_counter() - t0
        h, w = engine.static_hw or (engine.preprocess.size, engine.preprocess.size)
        x = np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32)
        t1 = time.perf_counter()
        d = engine.embed(x)
        run_s = time.perf_counter() - t1
        meta = engine.metadata
    norm = float(np.linalg.norm(d[0])) if d.size else float("nan")
    problems = []
    if d.shape != (1, engine.descriptor_dim):
        problems.append(f"descriptor shape {list(d.shape)}, expected [1, {engine.descriptor_dim}]")
    if not np.isfinite(d).all():
        problems.append("descriptor not finite")
    elif abs(norm - 1.0) > 1e-4:
        problems.append(f"descriptor norm {norm:.6f}, expected 1")
    made_with, running = meta.get("dtop.executorch_version", "unknown"), version("executorch")
    return {
        "file": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "precision": engine.precision,
        "input": f"float32 [1, 3, {h}, {w}]",
        "delegation": json.loads(meta.get("dtop.delegation", "null")),
        "executorch": {"made_with": made_with, "running": running, "same": made_with == running},
        "forward": {"load_s": round(load_s, 3), "run_s": round(run_s, 3), "norm": norm},
        "problems": problems,
        "passed": not problems,
    } | metadata_report(meta)
