"""ONNX Runtime CPU graph optimisation of an exported DToP model (the ``optimize`` command).

Three rewrites, each exact up to float rounding and checked against the input model afterwards:

* **DPE resize as two matmuls.** The position-embedding grid [1, D, h', w'] is resampled per input
  size by one cubic ``Resize``. ONNX Runtime's CPU cubic resize is slow (~90 ms at 512² for a 24×24×768
  grid, 7% of an INT8 forward), so it becomes ``M_h · P · M_wᵀ`` with the [H, h'] / [W, w'] cubic
  interpolation matrices built in-graph from the requested size (Keys a, half-pixel centres, clamped
  borders: what PyTorch's ``bicubic`` and ONNX ``Resize`` compute). Standard ONNX ops only.
* **Attention as one ``com.microsoft.MultiHeadAttention``.** timm's attention exports as qkv → reshape →
  transpose → 3 slices → two scaled matmuls around a softmax; ONNX Runtime's transformer optimiser
  does not recognise that form. It is replaced by ``Split(qkv)`` + MultiHeadAttention (BSD layout), the
  fused CPU kernel.
* **ONNX Runtime's transformer fusions** (``onnxruntime.transformers.optimizer``, model type ``vit``):
  GELU (erf form) → ``Gelu``, plus whatever else matches (LayerNorm is already one node in opset ≥ 17).

The result uses ``com.microsoft`` operators: it is for ONNX Runtime only (CPU or CUDA), not TensorRT.
Quantise it with :mod:`dtop_export.quantize` for the fastest CPU path.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtop_export.atomic import atomic_path
from dtop_export.contract import load_onnx, metadata_of, set_metadata
from dtop_export.errors import DToPError
from dtop_export.logs import printed_to_log, quiet_logging
from dtop_export.onnx_graph import attr
from dtop_export.onnx_rewrites import MS_DOMAIN, fuse_attention, rewrite_dpe_resize

if TYPE_CHECKING:
    import onnx


@dataclass
class OptimizeResult:
    """What :func:`optimize_onnx` wrote: the rewrites applied and the self-check."""

    path: Path
    seconds: float
    size_bytes: int
    rewrites: dict[str, int]
    op_counts: dict[str, int]
    max_abs_diff: float | None = None
    checked_shapes: list[str] = field(default_factory=list)


# the command -----------------------------------------------------------------------------------------


def check_optimizable(onnx_path: Path, meta: dict[str, str]) -> None:
    """Refuse, from its metadata alone, an ONNX file that is not an fp32 export (``optimize`` reads it before
    loading the model: an fp16 or INT8 file was refused only after it was loaded)."""
    if meta.get("dtop.precision", "fp32") != "fp32":
        raise DToPError(f"{onnx_path} is {meta['dtop.precision']}: optimise the fp32 export, then quantise")


def optimize_onnx(
    onnx_path: str | Path,
    output: str | Path,
    *,
    resize: bool = True,
    attention: bool = True,
    ort_fusions: bool = True,
    check_sizes: tuple[int, ...] = (),
    tolerance: float = 1e-4,
) -> OptimizeResult:
    """Optimise ``onnx_path`` for ONNX Runtime CPU and write ``output`` (atomic).

    ``check_sizes``: square sizes at which the result is run against the input model on random images
    (batch 2); a max-abs difference above ``tolerance`` is an error and nothing is written.
    """
    import onnx

    t0 = time.perf_counter()
    onnx_path, output = Path(onnx_path), Path(output)
    model = load_onnx(onnx_path)
    meta = metadata_of(model)
    check_optimizable(onnx_path, meta)
    if any(o.domain == MS_DOMAIN for o in model.opset_import) and "dtop.optimized" in meta:
        raise DToPError(f"{onnx_path} is already optimised")
    rewrites = {"dpe_resize_as_matmul": 0, "multi_head_attention": 0}
    if resize:
        rewrites["dpe_resize_as_matmul"] = rewrite_dpe_resize(model)
    if attention:
        rewrites["multi_head_attention"] = fuse_attention(model)
    if ort_fusions:
        model, fused = _ort_transformer_fusions(model)
        if rewrites["multi_head_attention"]:
            fused.pop("MultiHeadAttention", None)  # ours, counted above
        rewrites.update({k: v for k, v in fused.items() if v})
    seconds = time.perf_counter() - t0
    meta.update(
        {
            "dtop.optimized": json.dumps({"for": "onnxruntime", "rewrites": rewrites}, sort_keys=True),
            "dtop.derived_from": onnx_path.name,
            "dtop.build_seconds": f"{seconds:.2f}",
        }
    )
    set_metadata(model, meta)
    max_abs = None
    checked: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dtop-opt-") as tmp:
        staged = Path(tmp) / "opt.onnx"
        onnx.save_model(model, str(staged))
        if check_sizes:
            max_abs, checked = _compare(onnx_path, staged, meta, check_sizes)
            if not max_abs <= tolerance:
                by = f"by {max_abs:.2e} (> {tolerance:g})" if np.isfinite(max_abs) else "by non-finite values"
                raise DToPError(
                    f"optimised model differs from {onnx_path} {by}: "
                    "run with --no-attention / --no-resize to find the rewrite, and report it"
                )
        with atomic_path(output) as out_tmp:
            out_tmp.write_bytes(staged.read_bytes())
    return OptimizeResult(
        path=output,
        seconds=time.perf_counter() - t0,
        size_bytes=output.stat().st_size,
        rewrites=rewrites,
        op_counts=dict(Counter(n.op_type for n in model.graph.node).most_common()),
        max_abs_diff=max_abs,
        checked_shapes=checked,
    )


def _ort_transformer_fusions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer optimiser (fusions only, no hardware-specific session optimisations)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    dims = _transformer_dims(model)
    # It print()s "failed in shape inference" for the symbolic H/W: harmless here, kept off stdout.
    with (
        tempfile.TemporaryDirectory(prefix="dtop-ortopt-") as tmp,
        quiet_logging(),
        printed_to_log(),
    ):
        src = Path(tmp) / "in.onnx"
        onnx.save_model(model, str(src))
        opt = optimize_model(
            str(src), model_type="vit", num_heads=dims[0], hidden_size=dims[1], opt_level=0, use_gpu=False
        )
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items()}
        out = opt.model
    # Ops the export already had as single nodes are not fusions.
    stats.pop("LayerNormalization", None)
    return out, stats


def _transformer_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(num_heads, hidden) from fused MultiHeadAttention nodes or the qkv weights; (0, 0) = let ORT detect."""
    heads = next(
        (int(attr(n, "num_heads")) for n in model.graph.node if n.op_type == "MultiHeadAttention"),
        0,
    )
    hidden = next(
        (
            int(t.dims[0])
            for t in model.graph.initializer
            if len(t.dims) == 2 and t.dims[1] == 3 * t.dims[0] and t.dims[0] >= 64
        ),
        0,
    )
    return heads, hidden


def check_shapes(input_dims: list[int | str | None], sizes: tuple[int, ...], stride: int) -> list[tuple[int, ...]]:
    """The input shapes :func:`optimize_onnx` checks at: batch 2 at H = each size and W = ¾ of it (non-square: H and W
    resampled differently), or whatever of that the file fixes (``input_dims``, its input's dims: a ``--batch``
    export's batch, a ``--static`` export's H x W, then checked at that one size)."""

    def fixed(i: int) -> int | None:
        d = input_dims[i] if len(input_dims) == 4 else None
        return d if isinstance(d, int) and d > 0 else None

    batch = fixed(0) or 2
    if fixed(2) and fixed(3):
        return [(batch, 3, fixed(2), fixed(3))]
    shapes = []
    for s in sizes:
        h = fixed(2) or max(stride, s // stride * stride)
        w = fixed(3) or max(stride, (s * 3 // 4) // stride * stride)
        shapes.append((batch, 3, h, w))
    return list(dict.fromkeys(shapes))


def _compare(a: Path, b: Path, meta: dict[str, str], sizes: tuple[int, ...]) -> tuple[float, list[str]]:
    """The largest |difference| of ``b``'s outputs from ``a``'s on random inputs (inf when a difference is not
    finite: a NaN on either side is never "no difference"), and the shapes it checked at."""
    import onnxruntime as ort

    stride = int(meta.get("dtop.stride", 16))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = []
    for what, path in ((a.name, a), (f"the optimised {a.name}", b)):
        try:
            sessions.append((what, ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise DToPError(f"ONNX Runtime cannot load {what}: {str(e).splitlines()[0]}") from e
    first = sessions[0][1].get_inputs()[0]
    rng = np.random.default_rng(0)
    worst = 0.0
    shapes = []
    for shape in check_shapes(first.shape, sizes, stride):
        x = rng.standard_normal(shape, dtype=np.float32)
        got = "x".join(map(str, shape))
        out = []
        for what, session in sessions:
            try:
                out.append(np.asarray(session.run(None, {first.name: x})[0], dtype=np.float64))
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise DToPError(f"{what} fails in ONNX Runtime at {got}: {str(e).splitlines()[0]}") from e
        diff = np.abs(out[0] - out[1])
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
        shapes.append(got)
    return worst, shapes
