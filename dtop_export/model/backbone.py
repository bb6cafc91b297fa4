"""Transformer encoder with a (hybrid) timm ViT, DPE, and multi-layer outputs.

The backbone is a timm ``VisionTransformer``: plain (ViT-B/16, DeiT-B/16: 16x16 patch projection) or
hybrid (a ResNetV2 CNN stem whose feature map is fed as 1x1 patches). We keep timm's submodules and
parameter names, and replace what stands in the way of deployment:

* timm's position embedding becomes :class:`DynamicPosEmbed` (paper §3.3), initialised from it;
* the stem's TF-style *dynamic* "same" padding (``StdConv2dSame``, ``MaxPool2dSame``) becomes the
  equivalent *static* asymmetric padding. The two are identical whenever the input height and width
  are multiples of the stride, which DToP requires anyway, and the static form exports to ONNX in
  seconds instead of minutes (DESIGN.md, "Environment facts").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtop_export.errors import DToPError, ShapeError
from dtop_export.model.dpe import DynamicPosEmbed

# Backbones defined here rather than in timm's registry: name -> constructor(img_size, **kwargs).
_LOCAL_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _LOCAL_BACKBONES[fn.__name__] = fn
    return fn


@register_backbone
def dtop_tiny_r_s16(img_size: int = 256, **kwargs: object) -> nn.Module:
    """A tiny R+ViT hybrid with the paper's structure (stride 16): ResNetV2 (1,1,1) stem, D=192, L=6."""
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    stem = ResNetV2(
        layers=(1, 1, 1),
        channels=(128, 256, 512),
        stem_chs=32,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )
    args: dict = dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
    args.update(kwargs)
    return VisionTransformer(
        img_size=img_size,
        patch_size=1,
        num_classes=0,
        embed_layer=partial(HybridEmbed, backbone=stem),
        **args,
    )


def create_vit(
    name: str,
    img_size: int,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a timm ViT (plain or hybrid) without a classifier head.

    ``pretrained=True`` lets timm download weights (network needed); ``weights_file`` loads a local
    timm/safetensors state dict instead, for offline machines.
    """
    if name in _LOCAL_BACKBONES:
        if pretrained:
            raise DToPError(f"backbone {name!r} has no pretrained weights; drop --pretrained")
        vit = _LOCAL_BACKBONES[name](img_size=img_size, **kwargs)
    else:
        import timm

        if not timm.is_model(name):
            raise DToPError(f"unknown backbone {name!r}: use a timm ViT name such as vit_base_r50_s16_384")
        try:
            vit = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size, **kwargs)
        except (OSError, RuntimeError) as e:
            if pretrained:
                raise DToPError(
                    f"could not fetch pretrained weights for {name} ({e.__class__.__name__}); "
                    "on an offline machine pass --backbone-weights FILE instead"
                ) from e
            raise
    if weights_file is not None:
        _load_backbone_weights(vit, Path(weights_file), name)
    return vit


def _load_backbone_weights(vit: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise DToPError(f"backbone weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise DToPError(f"cannot read backbone weights {path}: {e.__class__.__name__}: {e}") from e
    if any(k.startswith("head.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, vit)
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise DToPError(f"{path} does not fit backbone {name}: {first.strip()}") from e
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise DToPError(f"{path} does not fit backbone {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")


# Static "same" padding ------------------------------------------------------------------------------


def _static_same_pad(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> tuple:
    """F.pad tuple (left, right, top, bottom) equal to TF 'SAME' when the input is a multiple of stride."""
    pads = []
    for k, s, d in zip(kernel, stride, dilation):
        total = max((k - 1) * d + 1 - s, 0)
        pads.append((total // 2, total - total // 2))
    (ph0, ph1), (pw0, pw1) = pads
    return (pw0, pw1, ph0, ph1)


def split_pad(pad: tuple[int, int, int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """An F.pad tuple (left, right, top, bottom) as (the symmetric part a conv's own ``padding`` (h, w) does,
    the asymmetric rest): a stride-1 "same" conv needs no separate pad, and so no copy of its input."""
    left, right, top, bottom = pad
    w, h = min(left, right), min(top, bottom)
    return (h, w), (left - w, right - w, top - h, bottom - h)


class StdConv2dStaticSame(nn.Conv2d):
    """timm's ``StdConv2dSame`` (weight standardisation) with the 'same' padding made static: its symmetric part in
    the conv's ``padding``, the rest (one row/column of a stride-2 conv) in ``static_pad``."""

    eps: float
    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.inference_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of a whole module, ``copy.deepcopy``) without a cached copy of the weights: the
        copy keeps caching on, if it was, and computes its own on first use."""
        state = super().__getstate__()
        if "_standardized" in state:
            state["_standardized"] = []
        return state

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def inference_weight(self) -> torch.Tensor:
        """:meth:`standardized_weight`; where :func:`cache_weight_standardization` turned caching on and no
        gradient is recorded, computed once per state of the weight (its storage, dtype, device and version
        counter) and reused: the same ops on the same weight, so the same bits. Traced (torch.compile,
        torch.export), recording a gradient, or on inference-mode weights (no version counter), it is computed
        in the pass."""
        cache = self.__dict__.get("_standardized")
        w = self.weight
        if (
            cache is None
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or w.is_inference()
        ):
            return self.standardized_weight()
        state = (w._version, w.dtype, w.device, self.eps)
        # the storage: the detached alias keeps it alive, so its address cannot come back as another weight's (a deep
        # copy's alias is a storage of its own, whose address no weight has)
        if not cache or cache[1] != state or cache[0].data_ptr() != w.data_ptr():
            cache[:] = [w.detach(), state, self.standardized_weight()]
        return cache[2]


def cache_weight_standardization(model: nn.Module, enabled: bool = True) -> int:
    """Turn on (off: and drop the copies) the caching of each stem conv's standardised weight in ``model`` (see
    :meth:`StdConv2dStaticSame.inference_weight`); returns how many convs. For models whose weights do not change
    while it is on, or change only through tracked in-place ops (an optimiser step, ``load_state_dict``,
    ``.to()``): a write the version counter does not see (``w.data.copy_(...)``, a numpy view) would not be
    noticed. It saves the standardisation in every pass where no gradient is recorded: 40-50 ms of each
    r50-vitb16 pass on a 2-core CPU (0.117 -> 0.071 s at 64 px, 0.349 -> 0.309 s at 256 px), at the cost of a
    copy of the stem's weights (94 MB for the ResNet50 of r50-vitb16)."""
    convs = [m for m in model.modules() if isinstance(m, StdConv2dStaticSame)]
    for m in convs:
        if not enabled:
            m.__dict__.pop("_standardized", None)
        elif "_standardized" not in m.__dict__:
            m.__dict__["_standardized"] = []
    return len(convs)


@contextlib.contextmanager
def weight_standardization_cached(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`cache_weight_standardization` for the duration of the block (a descriptor pass over many images);
    left as it was on exit (on, if it was)."""
    was_on = any("_standardized" in m.__dict__ for m in model.modules() if isinstance(m, StdConv2dStaticSame))
    cache_weight_standardization(model)
    try:
        yield model
    finally:
        if not was_on:
            cache_weight_standardization(model, enabled=False)


class MaxPool2dStaticSame(nn.MaxPool2d):
    """timm's ``MaxPool2dSame`` with the 'same' padding (-inf) made static."""

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.static_pad, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


def make_same_padding_static(module: nn.Module) -> int:
    """Swap dynamic TF-'same' conv/pool layers for static-padding twins in place; returns how many.

    Parameters and their names are untouched, so state dicts stay compatible with timm's.
    """
    from timm.layers.pool2d_same import MaxPool2dSame
    from timm.layers.std_conv import StdConv2d, StdConv2dSame

    count = 0
    for m in module.modules():
        if isinstance(m, StdConv2dSame) or type(m) is StdConv2d:
            k, s, d = m.kernel_size, m.stride, m.dilation
            pad = _static_same_pad(k, s, d) if getattr(m, "same_pad", False) else (0, 0, 0, 0)
            if any(pad):  # "same" (timm pads in forward, the conv's own padding is 0): split between the two
                (h, w), m.static_pad = split_pad(pad)
                m.padding = (m.padding[0] + h, m.padding[1] + w)
            else:
                m.static_pad = pad
            m.__class__ = StdConv2dStaticSame
            count += 1
        elif isinstance(m, MaxPool2dSame):
            k, s, d = (
                tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in (m.kernel_size, m.stride, m.dilation)
            )
            m.static_pad = _static_same_pad(k, s, d)
            m.__class__ = MaxPool2dStaticSame
            count += 1
    return count


# The encoder ----------------------------------------------------------------------------------------


class ViTEncoder(nn.Module):
    """Patch/hybrid embedding + DPE + transformer layers; returns the last ``k`` layers' tokens.

    ``forward(images [B, 3, H, W])`` -> list of k tensors [B, 1 + h·w, D] (layers L-k+1 … L, the
    [CLS] token first), and the token grid (h, w) with h = H / stride, w = W / stride.
    """

    def __init__(self, vit: nn.Module, num_layers: int, pos_embed_mode: str, norm_features: bool) -> None:
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "reg_token", None) is not None:
            raise DToPError("DToP needs a ViT with one [CLS] token and no register/distillation tokens")
        if getattr(vit, "no_embed_class", False):
            raise DToPError("DToP needs a ViT whose position embedding covers the [CLS] token")
        make_same_padding_static(vit)
        pe = vit.patch_embed
        self.patch_embed = pe
        self.cls_token = vit.cls_token
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm if norm_features else nn.Identity()
        self.embed_dim: int = vit.embed_dim
        self.depth = len(vit.blocks)
        if not 1 <= num_layers <= self.depth:
            raise DToPError(f"num_layers (k) must be in 1..{self.depth} for this backbone, got {num_layers}")
        self.num_layers = num_layers
        grid = tuple(pe.grid_size)
        self.pos_embed = DynamicPosEmbed(grid, self.embed_dim, mode=pos_embed_mode)
        self.pos_embed.load_from(vit.pos_embed.detach())
        ratio = getattr(pe, "feature_ratio", (1, 1))
        self.stride: int = int(pe.patch_size[0] * ratio[0])
        self.is_hybrid = hasattr(pe, "backbone")
        # timm's PatchEmbed asserts the native size; we check multiples of the stride ourselves.
        if hasattr(pe, "strict_img_size"):
            pe.strict_img_size = False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> patch embeddings as a feature map [B, D, h, w]."""
        pe = self.patch_embed
        x = images
        if self.is_hybrid:
            x = pe.backbone(x)
            if isinstance(x, (list, tuple)):
                x = x[-1]
        return pe.proj(x)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            check_input(images, self.stride)
        fmap = self.embed(images)
        h, w = fmap.shape[-2], fmap.shape[-1]
        x = fmap.flatten(2).transpose(1, 2)  # [B, h·w, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(h, w)
        x = self.norm_pre(x)
        outs = []
        first = self.depth - self.num_layers
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= first:
                outs.append(self.norm(x))
        return outs, (h, w)


def check_input(images: torch.Tensor, stride: int) -> None:
    """Raise :class:`ShapeError` unless ``images`` is a float [B, 3, H, W] with H, W multiples of stride."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise ShapeError(f"expected a float tensor, got {images.dtype}: normalise images first")
    h, w = images.shape[-2:]
    if h % stride or w % stride or h == 0 or w == 0:
        raise ShapeError(
            f"image size {h}x{w} is not a multiple of the model stride {stride}: resize to "
            f"{max(stride, round(h / stride) * stride)}x{max(stride, round(w / stride) * stride)}"
        )
