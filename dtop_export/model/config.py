"""DToP model configuration and presets.

Every architectural choice of the paper (Song et al., "Boosting vision transformers for image retrieval",
WACV 2023, §3.3 and §4.1) is a field here. Where the paper is silent, the default is documented on the
field and follows the same authors' previous retrieval recipe (GLAM, WACV 2022), MobileNetV2 (IRB) and
WaveBlock (Wang et al., TIP 2022). The official repository holds no code, so these docstrings are the one
place that records each choice.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dtop_export.errors import DToPError

FuseMode = Literal["sum", "concat", "max"]
PosEmbedMode = Literal["bicubic", "bilinear"]


@dataclass
class DToPConfig:
    """Configuration of a DToP model. Serialisable with :meth:`to_dict` / :meth:`from_dict`.

    Backbone
        backbone: timm model name, or a name registered in :mod:`dtop_export.model.backbone`.
            Paper default: the hybrid R50+ViT-B/16 (``vit_base_r50_s16_384``, D=768, L=12, stride 16).
            Plain ViT-B/16 / DeiT-B/16 give the "no CNN stem" rows of Table 3 and Table 2.
        backbone_kwargs: extra keyword arguments for the backbone constructor.
        img_size: native training resolution; fixes the learnable position-embedding grid
            w'×h' = img_size/stride (24×24 for 384 and stride 16).

    Dynamic position embedding (DPE, Eq. 2)
        pos_embed_mode: resampling of the w'×h' grid to the batch's w×h. ``bicubic`` (timm's choice for
            position embeddings, Keys a=-0.75, half-pixel centres) or ``bilinear``; never antialiased, so
            ONNX Runtime and TensorRT's Resize reproduce it exactly.

    Multi-layer features (Eq. 5-6)
        num_layers: k, the number of last encoder layers whose [CLS] and patch tokens are collected (6).
        norm_features: apply the encoder's final LayerNorm to each collected layer (our choice: the
            pre-norm residual stream grows with depth, the shared norm puts the k layers on one scale).

    Branches (Eq. 7-10) and ablations (Table 3)
        global_branch: multi-layer [CLS] features -> FC(kD->N). When False, the plain last-layer [CLS]
            token is used instead (the paper's baseline) unless ``local_branch`` is the only branch.
        local_branch: multi-layer patch features -> 1x1 conv kD->D -> FUSE(Y, ELM(Y)) -> GAP -> FC(D->N).
        elm: enhanced locality module in the local branch; False sets Y' = Y.
        fuse: FUSE of Eq. 9 (the paper studies alternatives only in its supplement). ``sum`` (default,
            Y + ELM(Y), a residual), ``concat`` (1x1 conv 2D->D), ``max`` (element-wise maximum).
        aspp_rates: dilation rates of ASPP, {6, 12, 18} in the paper; the n dilated 3x3 branches
            (conv-BN-ReLU, D->D) are concatenated and reduced nD->D by a 1x1 conv-BN-ReLU.
        aspp_separable: use depthwise-separable dilated convs in ASPP (DeepLabv3+ style). Off by default:
            the paper says dilated convolution.
        irb_expansion: IRB expansion ratio D'/D (MobileNetV2 uses 6; 2 keeps ELM light). IRB is
            1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 squeeze-BN, with the identity residual.
        waveblock: WaveBlock feature augmentation around IRB (training only, identity in eval).
        waveblock_ratio / waveblock_rate: a random horizontal band of ``ratio*h`` rows is kept, every
            other row is multiplied by ``rate`` (Wang et al.: ratio 0.3, rate 1.5 here).

    Head (Eq. 12)
        descriptor_dim: N, the descriptor size (1536).
        dropout: dropout before the head FC (GLAM-style 0.1; the paper gives no value).
        head_bn: BN after the head FC, used while training.
        head_bn_at_inference: keep that BN at inference. The paper removes it (§4.1): default False.
    """

    backbone: str = "vit_base_r50_s16_384"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 384
    pos_embed_mode: PosEmbedMode = "bicubic"
    num_layers: int = 6
    norm_features: bool = True
    global_branch: bool = True
    local_branch: bool = True
    elm: bool = True
    fuse: FuseMode = "sum"
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    aspp_separable: bool = False
    irb_expansion: float = 2.0
    waveblock: bool = True
    waveblock_ratio: float = 0.3
    waveblock_rate: float = 1.5
    descriptor_dim: int = 1536
    dropout: float = 0.1
    head_bn: bool = True
    head_bn_at_inference: bool = False

    def __post_init__(self) -> None:
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DToPError` for values no model can be built from."""
        if self.num_layers < 1:
            raise DToPError(f"num_layers (k) must be >= 1, got {self.num_layers}")
        if self.descriptor_dim < 1:
            raise DToPError(f"descriptor_dim (N) must be >= 1, got {self.descriptor_dim}")
        if self.fuse not in ("sum", "concat", "max"):
            raise DToPError(f"fuse must be one of sum, concat, max; got {self.fuse!r}")
        if self.pos_embed_mode not in ("bicubic", "bilinear"):
            raise DToPError(f"pos_embed_mode must be bicubic or bilinear; got {self.pos_embed_mode!r}")
        if self.local_branch and self.elm and not self.aspp_rates:
            raise DToPError("aspp_rates must name at least one dilation rate when the ELM is on")
        if self.irb_expansion <= 1.0:
            raise DToPError(f"irb_expansion must be > 1 (IRB expands D to D' > D); got {self.irb_expansion}")
        if not 0.0 <= self.dropout < 1.0:
            raise DToPError(f"dropout must be in [0, 1); got {self.dropout}")
        if not 0.0 < self.waveblock_ratio <= 1.0:
            raise DToPError(f"waveblock_ratio must be in (0, 1]; got {self.waveblock_ratio}")

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the parts concatenated before the head: ``cls`` and/or ``local``."""
        parts = []
        if self.global_branch or not self.local_branch:
            parts.append("cls")
        if self.local_branch:
            parts.append("local")
        return tuple(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (str/int/float/bool/list/dict only), safe for ``weights_only`` loading."""
        d = dataclasses.asdict(self)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DToPConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DToPError(
                f"unknown DToP config field(s) {', '.join(unknown)}: the file was written by a newer "
                "dtop-export; upgrade it"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> DToPConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


# Presets -------------------------------------------------------------------------------------------

PRESETS: dict[str, DToPConfig] = {
    # The paper's model: R50+ViT-B/16 hybrid, k=6, N=1536, ASPP {6,12,18}, 384 native grid.
    "r50-vitb16": DToPConfig(),
    # Plain ViT-B/16 backbone (Table 3 rows without CNN stem).
    "vitb16": DToPConfig(backbone="vit_base_patch16_384"),
    # DeiT-B/16 backbone (Table 2).
    "deitb16": DToPConfig(backbone="deit_base_patch16_384"),
    # A tiny hybrid for tests, CI and the demo: ResNetV2 (1,1,1) stem, ViT D=192, L=6, N=256.
    "small": DToPConfig(
        backbone="dtop_tiny_r_s16",
        img_size=256,
        num_layers=4,
        descriptor_dim=256,
    ),
}
DEFAULT_PRESET = "r50-vitb16"


def get_preset(name: str) -> DToPConfig:
    """Return a copy of a named preset; unknown names list the choices."""
    if name not in PRESETS:
        raise DToPError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
