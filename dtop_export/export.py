"""Export a DToP checkpoint to one self-contained ONNX file.

Pipeline: load checkpoint -> fold (BN, weight standardisation, head BN, whitening) -> torch.export
(dynamo) with dynamic batch/height/width -> onnxslim clean-up -> metadata -> full ONNX check ->
atomic write. The DPE resampling stays in the graph as ``Resize`` with sizes computed from the
input's ``Shape``, so one file serves every resolution that is a multiple of the stride.

Contract of the exported file: input ``images`` float32 [batch, 3, height, width] (normalised RGB,
height and width multiples of ``stride``), output ``descriptors`` float32 [batch, d], L2-normalised.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export import __version__
from dtop_export.atomic import atomic_path
from dtop_export.contract import INPUT_NAME, OUTPUT_NAME, onnx_metadata, opset_of, set_metadata
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import onnx
    import onnx_ir
    import torch

    from dtop_export.checkpoint import Checkpoint

MIN_OPSET = 18  # torch.onnx (dynamo) emits opset 18 natively; down-conversion is not supported
# (LayerNormalization, native since 17, stays one node that TensorRT keeps accurate in FP16)
MAX_OPSET = 23
DEFAULT_OPSET = 18
# Ops that only exist for training and must never reach a deployed graph.
TRAINING_ONLY_OPS = {
    "Dropout",
    "BatchNormalization",
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Bernoulli",
    "Multinomial",
}


@dataclass
class ExportResult:
    """What an export produced and how long each stage took."""

    path: Path
    seconds: float
    size_bytes: int
    opset: int
    nodes: int
    op_counts: dict[str, int]
    metadata: dict[str, str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    fold_stats: dict[str, int] = field(default_factory=dict)


def parse_hw(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (or a single ``S`` for a square) into (H, W)."""
    try:
        parts = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise DToPError(f"cannot read size {text!r}: write HxW, e.g. 512x384")
    return parts[0], parts[1]


class StageTimer:
    """Times an artefact maker's stages: call it with each stage's name as the stage starts (``on_stage`` hears the
    name too); :meth:`seconds` gives each stage's duration once the last has ended."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.start = time.perf_counter()
        self.starts: dict[str, float] = {}
        self.on_stage = on_stage

    def __call__(self, name: str) -> None:
        self.starts[name] = time.perf_counter()
        if self.on_stage:
            self.on_stage(name)

    def seconds(self, digits: int = 3) -> dict[str, float]:
        """{stage: seconds} up to now (the last stage ends at this call)."""
        ends = [*list(self.starts.values())[1:], time.perf_counter()]
        return {n: round(end - t, digits) for (n, t), end in zip(self.starts.items(), ends)}


def _gc_paused(fn: Callable[..., ExportResult]) -> Callable[..., ExportResult]:
    """Run ``fn`` with Python's cyclic garbage collector paused (reference counting still frees memory).

    Tracing allocates millions of small objects, and the collector's repeated full passes over them cost
    about 2 s of an r50-vitb16 export; the cycles left are collected when the collector resumes.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ExportResult:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_gc_paused
def export_onnx(
    checkpoint: str | Path | Checkpoint,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    static_hw: tuple[int, int] | None = None,
    batch: int | None = None,
    whiten: bool = True,
    slim: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``checkpoint`` to ``output`` (atomic). See the module docstring for the contract.

    ``static_hw``/``batch`` fix those axes for runtimes that need static shapes; ``whiten=False`` leaves
    the checkpoint's whitening out; ``on_stage`` receives a short name as each stage starts.
    """

    from dtop_export.checkpoint import Checkpoint, load_checkpoint
    from dtop_export.fold import fold_for_deployment

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise DToPError(
            f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} "
            "(torch.onnx emits 18 natively and converts up)"
        )
    stride = ckpt.preprocess.stride
    if static_hw is not None and (static_hw[0] % stride or static_hw[1] % stride):
        raise DToPError(f"--static {static_hw[0]}x{static_hw[1]} is not a multiple of the model stride {stride}")
    if batch is not None and batch < 1:
        raise DToPError(f"--batch must be >= 1, got {batch}")
    if whiten is False or ckpt.whitening is None:
        whiten = False

    stage = StageTimer(on_stage)
    stage("fold")
    model = ckpt.build_model()
    deploy, fold_stats = fold_for_deployment(model, ckpt.whitening if whiten else None)

    stage("trace")
    hw = static_hw or (ckpt.config.img_size, ckpt.config.img_size)
    program = _trace(deploy, hw, batch=batch, dynamic_hw=static_hw is None, stride=stride, opset=opset)
    _optimize(program.model)
    proto = program.model_proto
    descriptor_dim = deploy.descriptor_dim
    del program, deploy, model  # ~1.5 GB of weights and the traced graphs: keep memory and GC work low
    _name_input_dims(proto, dynamic_batch=batch is None, dynamic_hw=static_hw is None)

    if slim:
        stage("slim")
        proto = _slim(proto)

    stage("shapes")
    meta = onnx_metadata(ckpt, descriptor_dim, whiten, opset, static_hw, batch)
    proto = finalize_model(proto, meta)

    stage("check")
    lint = graph_problems(proto)
    if lint:
        raise RuntimeError(f"exported graph is not deployable: {'; '.join(lint)}")
    import onnx

    data = proto.SerializeToString()
    output = Path(output)
    # the file is written while the checker reads the same bytes (the write releases the GIL); a failed check
    # waits for the writer, then atomic_path removes the temporary file
    with atomic_path(output) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        written = pool.submit(_write_synced, Path(tmp), data)
        onnx.checker.check_model(data)  # the strict shape inference ran in finalize_model
        stage("write")
        written.result()
    stage_seconds = stage.seconds()
    from collections import Counter

    return ExportResult(
        path=output,
        seconds=time.perf_counter() - stage.start,
        size_bytes=output.stat().st_size,
        opset=opset,
        nodes=len(proto.graph.node),
        op_counts=dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        metadata=meta,
        stage_seconds=stage_seconds,
        fold_stats=fold_stats,
    )


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (atomic_path's own fsync then finds nothing to do)."""
    path.write_bytes(data)
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())


def _trace(
    deploy: torch.nn.Module,
    hw: tuple[int, int],
    *,
    batch: int | None,
    dynamic_hw: bool,
    stride: int,
    opset: int,
) -> torch.onnx.ONNXProgram:
    """``torch.export`` once, then the ONNX translation (not optimised yet: see :func:`_optimize`).

    Height and width are declared as multiples of ``stride`` up front: declared as free dims, torch.export
    fails on the stem's ``//`` guards and ``torch.onnx.export`` silently traces the whole model a second
    time with the suggested fix (which is this one).
    """
    import warnings

    import torch

    example = torch.zeros(batch or 2, 3, *hw)
    dynamic: dict[int, Any] = {}
    if batch is None:
        dynamic[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_hw:
        blocks = 16384 // stride
        dynamic[2] = stride * torch.export.Dim("height_blocks", max=blocks)
        dynamic[3] = stride * torch.export.Dim("width_blocks", max=blocks)
    with warnings.catch_warnings(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        warnings.simplefilter("ignore")
        program = torch.export.export(
            deploy, (example,), dynamic_shapes={"images": dynamic} if dynamic else None, strict=False
        )
        return torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            optimize=False,
            verbose=False,
        )


def _optimize(model: onnx_ir.Model) -> None:
    """onnxscript's optimiser as ``torch.onnx.export(optimize=True)`` runs it (``optimize_ir``, then
    ``onnx_fusions.fuse``; in place), less one rewrite rule.

    ``SlicesSplit`` (two Slices of one tensor -> Split) is the only default rule with a two-output pattern,
    which onnxscript matches by indexing the whole graph again for every Slice it tries: O(slices x nodes),
    2.6 of the optimiser's 4.1 s on r50-vitb16. It never applies to a DToP graph: the result is the same
    nodes, attributes and weights with and without it, dynamic or static shapes (tests/test_export.py).
    """
    import onnxscript
    from onnxscript import rewriter

    try:
        from onnxscript.rewriter.rules.common import slice_split_rule
    except ImportError:  # another onnxscript: run its optimiser as it is
        slice_split_rule = None
    default_rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", ())
    if slice_split_rule in default_rules:
        rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default_rules if r is not slice_split_rule)
    try:
        onnxscript.optimizer.optimize_ir(model)
    finally:
        if default_rules:
            rewriter._DEFAULT_REWRITE_RULES = default_rules
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _name_input_dims(proto: onnx.ModelProto, *, dynamic_batch: bool, dynamic_hw: bool) -> None:
    """Name the symbolic input dims ``batch``/``height``/``width`` wherever they appear as a whole dim."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    wanted = {0: "batch"} if dynamic_batch else {}
    if dynamic_hw:
        wanted |= {2: "height", 3: "width"}
    rename = {dims[i].dim_param: name for i, name in wanted.items() if dims[i].dim_param}
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if v.type.HasField("tensor_type"):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param in rename:
                    d.dim_param = rename[d.dim_param]


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and graph clean-up with onnxslim (keeps dynamic dims symbolic).

    onnxslim's own shape inference is skipped: on r50-vitb16 it is 13 of its 15 s (the whole 0.5 GB model
    serialised per call) and its result is the same graph (same nodes and initializers; tested on the small
    preset); ``finalize_model`` infers the shapes once afterwards.
    """
    import onnxslim

    return onnxslim.slim(proto, no_shape_infer=True)


def finalize_model(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Set producer and metadata and run the strict shape inference (type-checked, with data propagation).

    Shape inference runs on a weight-free view of the model (large initializers become external references
    for the duration), which gives the same result without serialising the weights; the caller runs the
    structural checker on the bytes it writes.
    """
    proto.producer_name = "dtop-export"
    proto.producer_version = __version__
    set_metadata(proto, metadata)
    return infer_shapes_weightless(proto)


def infer_shapes_weightless(proto: onnx.ModelProto, min_bytes: int = 4096) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (strict, type-checked, data propagation) without copying weights.

    Initializers of ``min_bytes`` or more are swapped for external-data stubs (dims and type kept), inferred,
    and put back; small ones stay, since data propagation reads shape constants.
    """
    import onnx

    stored: dict[str, bytes] = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= min_bytes:
            stored[t.name] = t.raw_data
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value="weights-held-in-memory")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    finally:
        _restore(proto, stored)
    _restore(inferred, stored)
    return inferred


def _restore(proto: onnx.ModelProto, stored: dict[str, bytes]) -> None:
    for t in proto.graph.initializer:
        if t.name in stored and not t.raw_data:
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = stored[t.name]


def graph_problems(proto: onnx.ModelProto) -> list[str]:
    """Deployment invariants of an exported DToP graph; empty when all hold."""
    problems = []
    ops = {n.op_type for n in proto.graph.node}
    bad = sorted(ops & TRAINING_ONLY_OPS)
    if bad:
        problems.append(f"training-only ops left: {', '.join(bad)}")
    opset = opset_of(proto)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET}")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        problems.append(f"graph I/O is {inputs} -> {outputs}, expected [{INPUT_NAME}] -> [{OUTPUT_NAME}]")
    return problems
