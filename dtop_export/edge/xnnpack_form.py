"""The deploy-folded DToP model in the form XNNPACK delegates whole, for one fixed input size.

Every rewrite computes the same function up to float rounding (tests/test_executorch.py holds the result to the
folded model at cosine 1 - 1e-6); what each replaces, and why:

* the position embedding's bicubic resample (:class:`FixedPosEmbed`): computed once for the program's token grid
  and stored as a constant. Left in the graph it lowers to ``index``/``clamp`` gathers outside XNNPACK (~40% of
  a small-preset forward at 256²).
* LayerNorm and GroupNorm (:class:`LinearLayerNorm`, :class:`LinearGroupNorm`): XNNPACK has neither. Means become
  matmuls with a constant averaging vector (LayerNorm over the last axis) or an averaging matrix over each group's
  channels applied to per-channel means (GroupNorm, so the NHWC convolutions around it need no transposes); then
  subtract, square, add eps, reciprocal square root, scale, shift — all XNNPACK operators. The per-channel means
  are taken in two levels, 8×8 (or 4×4, 2×2) average pools first: XNNPACK's global mean sums a 128×128 map
  (the stem at 256²) with a relative error of 4e-5, which the trained model carried to 1e-4 in its descriptor;
  pooled first, 4e-7.
* attention (:class:`BmmAttention`): timm's 4-D ``q @ k.T`` decomposes into ``expand`` copies that XNNPACK does not
  take (and its fused SDPA into masking ops); two 3-D batched matmuls around a last-axis softmax, with the
  1/sqrt(d) scale folded into the query weights, are three XNNPACK operators.
* the L2 normalisations (:class:`L2Normalize`): ``x * rsqrt(max(x·x, eps²))`` with the sum of squares as a matmul
  (``F.normalize``'s ``linalg_vector_norm`` and ``clamp_min`` + ``div`` stay outside).
* :func:`xnnpack_glue_pass`: after decomposition, the [CLS] ``select``s become ``slice`` + ``view``, the local
  branch's global average ``mean`` (keepdim False) a keepdim mean + ``view``, and same-shape ``expand``s vanish.

Imports torch and timm; executorch inside :func:`xnnpack_glue_pass`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dtop_export.errors import DToPError, ShapeError

if TYPE_CHECKING:
    from dtop_export.checkpoint import Checkpoint
    from dtop_export.fold import DToPDeploy

L2_EPS = 1e-12  # F.normalize's default


class FixedPosEmbed(nn.Module):
    """The DPE's output for one token grid, as a constant: [1, 1 + h·w, D]."""

    def __init__(self, pos_embed: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        with torch.no_grad():
            self.register_buffer("table", pos_embed(*grid).detach().clone())

    def forward(self, height: int, width: int) -> torch.Tensor:
        if (int(height), int(width)) != self.grid:
            raise ShapeError(f"this program was built for a {self.grid[0]}x{self.grid[1]} token grid")
        return self.table


class LinearLayerNorm(nn.Module):
    """LayerNorm over the last axis with both means as matmuls by a constant 1/D vector."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        if len(ln.normalized_shape) != 1:
            raise DToPError(f"LayerNorm over {tuple(ln.normalized_shape)} is not supported (last axis only)")
        d = ln.normalized_shape[0]
        self.eps = ln.eps
        self.register_buffer("average", torch.full((1, d), 1.0 / d))
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - F.linear(x, self.average)
        y = xc * torch.rsqrt(F.linear(xc * xc, self.average) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class LinearGroupNorm(nn.Module):
    """GroupNorm (+ timm's fused activation): per-channel global average pools, then a [C, C] matrix that averages
    each group's channel means and hands every channel its group's value."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        c, g = gn.num_channels, gn.num_groups
        per = c // g
        group = torch.arange(c) // per
        self.register_buffer("group_average", (group[:, None] == group[None, :]).float() / per)
        self.eps = gn.eps
        shape = (1, c, 1, 1)
        self.weight = nn.Parameter(gn.weight.detach().reshape(shape).clone()) if gn.weight is not None else None
        self.bias = nn.Parameter(gn.bias.detach().reshape(shape).clone()) if gn.bias is not None else None
        self.drop = getattr(gn, "drop", nn.Identity())
        self.act = getattr(gn, "act", nn.Identity())

    def _group_mean(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return F.linear(channel_mean(x).reshape(b, c), self.group_average).reshape(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - self._group_mean(x)
        y = xc * torch.rsqrt(self._group_mean(xc * xc) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return self.act(self.drop(y))


def channel_mean(x: torch.Tensor, max_terms: int = 256) -> torch.Tensor:
    """``x.mean((2, 3), keepdim=True)`` summed in levels: average pools (8×8, 4×4 or 2×2, whichever divides the map)
    until at most ``max_terms`` values per channel remain, then the global mean (shapes are static when exported)."""
    while x.shape[2] * x.shape[3] > max_terms:
        k = next((k for k in (8, 4, 2) if x.shape[2] % k == 0 and x.shape[3] % k == 0), 1)
        if k == 1:
            break
        x = F.avg_pool2d(x, k)
    return x.mean((2, 3), keepdim=True)


class BmmAttention(nn.Module):
    """timm's plain multi-head self-attention as qkv linear -> two 3-D batched matmuls around a softmax -> proj."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.inner = attn.num_heads * attn.head_dim
        self.qkv = attn.qkv
        self.proj = attn.proj
        with torch.no_grad():  # scale the queries in the weights, not at run time
            self.qkv.weight[: self.inner] *= attn.scale
            if self.qkv.bias is not None:
                self.qkv.bias[: self.inner] *= attn.scale

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise DToPError("masked attention is not part of a DToP program")
        b, n, _ = x.shape
        h, d, a = self.heads, self.head_dim, self.inner
        qkv = self.qkv(x)

        def heads(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
            t = t.reshape(b, n, h, d).permute(*order)
            return t.reshape(b * h, *t.shape[2:])

        q = heads(qkv[:, :, :a], (0, 2, 1, 3))  # [B·h, N, d]
        k = heads(qkv[:, :, a : 2 * a], (0, 2, 3, 1))  # [B·h, d, N]
        v = heads(qkv[:, :, 2 * a :], (0, 2, 1, 3))
        out = torch.bmm(torch.bmm(q, k).softmax(dim=-1), v)
        return self.proj(out.reshape(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, a))


class L2Normalize(nn.Module):
    """``F.normalize(x, dim=-1)`` as ``x * rsqrt(max(x·x, eps²))``, the sum of squares a matmul by ones."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("ones", torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.clamp(F.linear(x * x, self.ones), min=L2_EPS * L2_EPS))


class EdgeDeploy(nn.Module):
    """images [1, 3, S, S] -> L2-normalised (whitened) descriptors: :class:`~dtop_export.fold.DToPDeploy` with
    :class:`L2Normalize` in place of ``F.normalize``."""

    def __init__(self, deploy: DToPDeploy) -> None:
        super().__init__()
        self.model = deploy.model
        self.whiten = deploy.whiten
        self.descriptor_dim = deploy.descriptor_dim
        self.normalize = L2Normalize(deploy.model.descriptor_dim)
        self.normalize_whitened = L2Normalize(deploy.whiten.out_features) if deploy.whiten is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(self.model(images))
        if self.whiten is not None and self.normalize_whitened is not None:
            x = self.normalize_whitened(self.whiten(x))
        return x


# Modules whose matmuls compute statistics (means, sums of squares), never weights: INT8 leaves them float.
STATISTICS_MODULES = (LinearLayerNorm, LinearGroupNorm, L2Normalize)


def _plain_attention(m: nn.Module) -> bool:
    """A timm ``Attention`` without the options :class:`BmmAttention` does not reproduce."""
    from timm.layers.attention import Attention

    return (
        isinstance(m, Attention)
        and getattr(m, "gate", None) is None
        and all(isinstance(getattr(m, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
    )


def _replace(module: nn.Module, counts: dict[str, int]) -> None:
    for name, child in list(module.named_children()):
        new: nn.Module | None = None
        if isinstance(child, nn.LayerNorm):
            new, key = LinearLayerNorm(child), "layer_norm"
        elif isinstance(child, nn.GroupNorm):
            new, key = LinearGroupNorm(child), "group_norm"
        elif _plain_attention(child):
            new, key = BmmAttention(child), "attention"
        if new is None:
            _replace(child, counts)
        else:
            setattr(module, name, new)
            counts[key] = counts.get(key, 0) + 1


@torch.no_grad()
def xnnpack_form(ckpt: Checkpoint, size: int, whiten: bool = True) -> tuple[EdgeDeploy, dict[str, int]]:
    """The deploy-folded model of ``ckpt`` (whitening folded unless ``whiten=False`` or it has none) for
    ``size``×``size`` inputs, rewritten for XNNPACK; and what was folded and rewritten."""
    from dtop_export.fold import fold_for_deployment

    stride = ckpt.preprocess.stride
    if size < stride or size % stride:
        raise DToPError(f"size {size} is not a multiple of the model stride {stride}: try {_near(size, stride)}")
    deploy, stats = fold_for_deployment(ckpt.build_model(), ckpt.whitening if whiten else None)
    encoder = deploy.model.encoder
    encoder.pos_embed = FixedPosEmbed(encoder.pos_embed, (size // stride, size // stride))
    counts: dict[str, int] = {"position_embedding": 1}
    _replace(deploy, counts)
    return EdgeDeploy(deploy).eval(), {**stats, **{f"rewritten_{k}": v for k, v in counts.items()}}


def _near(size: int, stride: int) -> str:
    lower = max(stride, size // stride * stride)
    return f"{lower} or {lower + stride}" if lower != size else str(lower)


def xnnpack_glue_pass() -> Any:
    """An ExecuTorch pass (edge dialect, before partitioning) that turns the glue XNNPACK does not take into
    operators it does: ``select_copy`` -> ``slice_copy`` + ``view_copy``; a 4-D ``mean.dim`` over H, W without
    keepdim -> keepdim mean + ``view_copy``; an ``expand_copy`` to its own shape -> nothing."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    edge = exir_ops.edge.aten

    class XnnpackGlue(ExportPass):
        def call_operator(self, op: Any, args: Any, kwargs: Any, meta: Any) -> Any:
            if op == edge.select_copy.int:
                x, dim, index = args
                shape = list(x.to_tensor().shape)
                dim %= len(shape)
                index %= shape[dim]
                sliced = super().call_operator(edge.slice_copy.Tensor, (x, dim, index, index + 1, 1), {}, meta)
                return super().call_operator(edge.view_copy.default, (sliced, shape[:dim] + shape[dim + 1 :]), {}, meta)
            if op == edge.mean.dim and not kwargs.get("dtype"):
                x, dims = args[0], args[1]
                keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
                shape = list(x.to_tensor().shape)
                if len(shape) == 4 and not keepdim and sorted(d % 4 for d in dims) == [2, 3]:
                    mean = super().call_operator(edge.mean.dim, (x, [2, 3], True), {}, meta)
                    return super().call_operator(edge.view_copy.default, (mean, shape[:2]), {}, meta)
            if op == edge.expand_copy.default:
                x, size = args[0], args[1]
                shape = list(x.to_tensor().shape)
                if len(size) == len(shape) and all(s in (-1, n) for s, n in zip(size, shape)):
                    return x
            return super().call_operator(op, args, kwargs, meta)

    return XnnpackGlue()
