"""Export a DToP checkpoint to one self-contained ONNX file.

Pipeline: load checkpoint -> fold (BN, weight standardisation, head BN, whitening) -> torch.export
(dynamo) with dynamic batch/height/width -> onnxslim clean-up -> metadata -> full ONNX check ->
atomic write. The DPE resampling stays in the graph as ``Resize`` with sizes computed from the
input's ``Shape``, so one file serves every resolution that is a multiple of the stride.

Contract of the exported file: input ``images`` float32 [batch, 3, height, width] (normalised RGB,
height and width multiples of ``stride``), output ``descriptors`` float32 [batch, d], L2-normalised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export import __version__
from dtop_export.atomic import atomic_path
from dtop_export.contract import INPUT_NAME, OUTPUT_NAME, onnx_metadata, opset_of, set_metadata
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import onnx

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
    import torch

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

    stages: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str) -> None:
        stages[name] = time.perf_counter()
        if on_stage:
            on_stage(name)

    stage("fold")
    model = ckpt.build_model()
    deploy, fold_stats = fold_for_deployment(model, ckpt.whitening if whiten else None)

    stage("trace")
    h, w = static_hw or (ckpt.config.img_size, ckpt.config.img_size)
    b = batch or 2
    example = torch.zeros(b, 3, h, w)
    dynamic: dict[int, Any] = {}
    if batch is None:
        dynamic[0] = torch.export.Dim("batch", min=1, max=4096)
    if static_hw is None:
        max_side = 16384 // stride * stride
        dynamic[2] = torch.export.Dim("height", min=stride, max=max_side)
        dynamic[3] = torch.export.Dim("width", min=stride, max=max_side)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            deploy,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": dynamic} if dynamic else None,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto

    if slim:
        stage("slim")
        proto = _slim(proto)

    stage("check")
    meta = onnx_metadata(ckpt, deploy.descriptor_dim, whiten, opset, static_hw, batch)
    proto = finalize_model(proto, meta)
    lint = graph_problems(proto)
    if lint:
        raise RuntimeError(f"exported graph is not deployable: {'; '.join(lint)}")

    stage("write")
    output = Path(output)
    with atomic_path(output) as tmp:
        import onnx

        onnx.save_model(proto, str(tmp))
    stages["end"] = time.perf_counter()
    names = list(stages)
    stage_seconds = {n: round(stages[names[i + 1]] - stages[n], 3) for i, n in enumerate(names[:-1])}
    from collections import Counter

    return ExportResult(
        path=output,
        seconds=time.perf_counter() - t_start,
        size_bytes=output.stat().st_size,
        opset=opset,
        nodes=len(proto.graph.node),
        op_counts=dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        metadata=meta,
        stage_seconds=stage_seconds,
        fold_stats=fold_stats,
    )


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and graph clean-up with onnxslim (keeps dynamic dims symbolic)."""
    import onnxslim

    return onnxslim.slim(proto)


def finalize_model(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Set producer and metadata, infer shapes, and run the full ONNX checker."""
    import onnx

    proto.producer_name = "dtop-export"
    proto.producer_version = __version__
    set_metadata(proto, metadata)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


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
