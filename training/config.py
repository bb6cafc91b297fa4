"""Training configuration: nested dataclasses, loaded from YAML with ``section.key=value`` overrides.

Defaults follow DESIGN.md ("What the paper leaves open"): the paper gives no training settings, so we
take the same authors' GLAM recipe — ArcFace with margin 0.3; SGD, lr 1e-3, momentum 0.9, weight decay
1e-5; batch 64; group-size sampling (Yokoo et al.); augmentation by scaling, random crop and
illumination. Every value is a field here and can be changed in the YAML file or on the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.training.config_build import build, plain, within

DATASETS = ("sample", "folder", "revisitop", "sfm120k", "gldv2", "gldv1", "nc-clean")
CONFIGS = Path(__file__).parent / "configs"
# The shipped recipe the demo trains with: small preset on the embedded training set.
SAMPLE_CONFIG = CONFIGS / "sample-small.yaml"


@dataclass
class ModelSection:
    """Which model to train.

    preset: a ``DToPConfig`` preset (``dtop-export info --presets``); ``overrides`` change single fields.
    init: start from this dtop-export checkpoint (fine-tuning) instead of a fresh model: its architecture and weights,
        so ``preset`` does not apply, ``pretrained`` and ``backbone_weights`` are refused, and ``overrides`` may only
        change what has no weights (``INIT_OVERRIDES``: dropout, WaveBlock, the head's BN at inference).
    pretrained: let timm download ImageNet weights for the backbone (network; explicit opt-in).
    backbone_weights: local timm backbone weights file (.safetensors/.pth) for offline machines.
    """

    preset: str = "r50-vitb16"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    pretrained: bool = False
    backbone_weights: str | None = None


@dataclass
class DataSection:
    """The training set (paper §4.1).

    dataset: ``sample`` (the embedded offline set, built on demand), ``folder`` (one sub-folder per
        class), ``revisitop`` (a revisitop-layout set; classes from its query positives), ``sfm120k``
        (cirtorch ``retrieval-SfM-120k.pkl`` + ``ims/``), ``gldv2`` (``train_clean.csv`` + ``train/a/b/c/``),
        ``gldv1`` (``train.csv`` id,url,landmark_id + local images), ``nc-clean`` (list of ``path label``).
    root: dataset folder. list_file: the csv/pkl/list file when it is not at its standard place.
    split: SfM-120k part (``train``/``val``). name: revisitop set name (``gnd_<name>.pkl``).
    min_per_class: drop classes with fewer images (ArcFace needs >= 1; 2 keeps only re-occurring landmarks).
    exclude_classes: class names (folder names / landmark ids) to leave out, e.g. to hold objects out of
        training (``sample``: ``[astronaut, camera, ...]`` are the evaluation set's query objects).
    max_images: keep only the first N usable images (quick runs).
    workers: DataLoader worker processes. size_cache: TSV of image sizes (default: in the output folder).
    """

    dataset: str = "sample"
    root: str | None = None
    list_file: str | None = None
    split: str = "train"
    name: str = "sample"
    min_per_class: int = 1
    exclude_classes: tuple[str, ...] = ()
    max_images: int | None = None
    workers: int = 2
    size_cache: str | None = None


@dataclass
class SamplerSection:
    """Group-size sampling (paper §3.2; Yokoo et al., CVPRW 2020).

    Images are assigned to the aspect-ratio group (W/H) nearest in log scale; every group has one fixed
    input size of area ≈ ``base_size``², both sides multiples of the model stride; a batch holds images of
    one group only, so every batch has its own H×W and DPE resamples per batch.
    batch_size: images per step on each process (the global batch is batch_size × processes × accum_steps); with
        ``loss.name: contrastive``, tuples per step (cirtorch's meaning), each of 1 query + 1 positive + ``loss.nnum``
        negatives: ``batch_size`` × (2 + nnum) images per step (5 tuples at nnum 5: 35 images).
    """

    base_size: int = 384
    aspect_ratios: tuple[float, ...] = (0.5, 0.667, 0.75, 1.0, 1.333, 1.5, 2.0)
    batch_size: int = 64
    drop_last: bool = True


@dataclass
class AugmentSection:
    """Training augmentation: scaling + random crop (area fraction ``scale``), flip, illumination."""

    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


@dataclass
class LossSection:
    """Loss. ``arcface`` for class-labelled sets (default), ``contrastive`` for SfM-120k tuples.

    ArcFace: logits s·cos(θ + m) for the true class, s·cos θ otherwise (Deng et al.; GLAM: m = 0.3).
    Contrastive (cirtorch): ½·D² for the positive, ½·max(0, margin − D)² per negative, each tuple
    (q, p, n1..n_nnum) with ``nnum`` hard negatives mined every epoch from ``pool_size`` random images
    among ``query_size`` random queries; one negative per cluster, none from the query's cluster.
    """

    name: str = "arcface"
    scale: float = 30.0
    margin: float = 0.3
    contrastive_margin: float = 0.7
    nnum: int = 5
    query_size: int = 2000
    pool_size: int = 20000


@dataclass
class OptimSection:
    """Optimiser and schedule.

    optimizer: ``sgd`` (GLAM: momentum 0.9) or ``adamw``. Weight decay is not applied to norms,
    biases, the position embedding or the [CLS] token. backbone_lr_mult scales the LR of the
    pretrained encoder (e.g. 0.1); layer_decay < 1 lowers it further layer by layer towards the stem
    (block i of L gets ``layer_decay ** (L - i)``); head_lr_mult scales that of the ArcFace class weights.
    Schedule per step: linear warm-up over ``warmup_epochs`` then cosine to ``min_lr_ratio``·lr.
    """

    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0


@dataclass
class ValSection:
    """Validation mAP (revisitop protocol, Easy/Medium/Hard) after every epoch; best checkpoint kept.

    root/name: a revisitop-layout set (``<root>/<name>/gnd_<name>.pkl`` + ``jpg/``); ``root: null`` means
    ``dtop_export.retrieval.datasets.default_data_root()``, where the embedded ``sample`` set is built on first use.
    metric: the protocol that picks the best checkpoint. size: longer image side (null: the set's own
    ``image_size``, 256 for the sample, else the model's preprocessing size). scales: multi-scale factors.
    """

    enabled: bool = True
    root: str | None = None
    name: str = "sample"
    metric: str = "medium"
    size: int | None = None
    scales: tuple[float, ...] = (1.0,)


@dataclass
class TrainConfig:
    """Everything ``dtop-export train`` needs (see each section's docstring).

    out_dir: run folder (checkpoints, training state, logs). epochs: passes over the set (or, for SfM-120k,
    over ``loss.query_size`` tuples). amp: ``auto`` (bf16 on CPU and bf16-capable GPUs, else fp16),
    ``bf16``, ``fp16`` or ``none``. accum_steps: micro-batches per optimiser step (batch norms and WaveBlock
    still work per micro-batch: not numerically one bigger batch). clip_grad: max gradient
    norm (0: off). threads: torch CPU threads. save_state_every: also write the training state every N
    optimiser steps (it is always written at the end of an epoch). keep_every_epoch: keep ``epoch-NNN.pt``
    besides ``last.pt``. max_steps_per_epoch: cut epochs short (quick runs). log_every: steps per CSV row.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    val: ValSection = field(default_factory=ValSection)
    out_dir: str = "runs/train"
    epochs: int = 10
    amp: str = "auto"
    accum_steps: int = 1
    clip_grad: float = 0.0
    seed: int = 0
    threads: int | None = None
    save_state_every: int = 0
    keep_every_epoch: bool = False
    max_steps_per_epoch: int | None = None
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`DToPError` for values training cannot run with."""
        if self.data.dataset not in DATASETS:
            raise DToPError(f"data.dataset must be one of {', '.join(DATASETS)}; got {self.data.dataset!r}")
        if self.loss.name not in ("arcface", "contrastive"):
            raise DToPError(f"loss.name must be arcface or contrastive; got {self.loss.name!r}")
        if self.loss.name == "contrastive" and self.data.dataset != "sfm120k":
            raise DToPError("loss.name=contrastive needs query/positive tuples: use data.dataset=sfm120k")
        if not 0 < self.optim.layer_decay <= 1:
            raise DToPError(f"optim.layer_decay must be in (0, 1]; got {self.optim.layer_decay}")
        if self.optim.optimizer not in ("sgd", "adamw"):
            raise DToPError(f"optim.optimizer must be sgd or adamw; got {self.optim.optimizer!r}")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise DToPError(f"amp must be auto, none, bf16 or fp16; got {self.amp!r}")
        if self.sampler.batch_size < 2:
            raise DToPError("sampler.batch_size must be >= 2 (the head's batch norm needs two images)")
        if self.sampler.base_size < 16 or not self.sampler.aspect_ratios:
            raise DToPError("sampler.base_size must be >= 16 and sampler.aspect_ratios non-empty")
        if any(r <= 0 for r in self.sampler.aspect_ratios):
            raise DToPError("sampler.aspect_ratios must be positive W/H ratios")
        if self.epochs < 1 or self.accum_steps < 1:
            raise DToPError("epochs and accum_steps must be >= 1")
        if self.val.metric not in ("easy", "medium", "hard"):
            raise DToPError(f"val.metric must be easy, medium or hard; got {self.val.metric!r}")
        if not self.val.scales:
            raise DToPError("val.scales must list at least one scale (1.0: single-scale)")
        _check_model_overrides(self.model.overrides)
        _check_model_init(self.model)
        lo, hi = self.augment.scale
        if not 0 < lo <= hi <= 1:
            raise DToPError(f"augment.scale must be 0 < lo <= hi <= 1; got {self.augment.scale}")
        for key, value, rule in _number_rules(self):
            if value is not None and not within(value, rule):
                raise DToPError(f"{key} must be {rule}; got {value}")

    def tuple_size(self) -> int:
        """Images per sample of a batch: a (query, positive, ``loss.nnum`` negatives) tuple with the contrastive loss,
        else one image."""
        return 2 + self.loss.nnum if self.loss.name == "contrastive" else 1

    def images_per_step(self) -> int:
        """Images one process's batch holds: ``sampler.batch_size`` samples of :meth:`tuple_size` images."""
        return self.sampler.batch_size * self.tuple_size()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists instead of tuples): goes into checkpoints' provenance and the YAML dump."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = build(cls, d, "")
        cfg.validate()
        return cfg


def _check_model_overrides(overrides: dict[str, Any]) -> None:
    """``model.overrides`` may only name ``DToPConfig`` fields (else ``replace`` fails with Python's
    "unexpected keyword argument" text, after the run folder was made)."""
    from dtop_export.model.config import DToPConfig

    valid = sorted(f.name for f in dataclasses.fields(DToPConfig) if f.init)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise DToPError(f"unknown model.overrides key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


# the model.overrides that apply to model.init's checkpoint: none of them has weights
INIT_OVERRIDES = ("dropout", "head_bn_at_inference", "waveblock", "waveblock_rate", "waveblock_ratio")


def _check_model_init(m: ModelSection) -> None:
    """With ``model.init`` the model is the checkpoint's: refuse what would otherwise be ignored."""
    if not m.init:
        return
    fixed = sorted(set(m.overrides) - set(INIT_OVERRIDES))
    if fixed:
        raise DToPError(
            f"model.overrides {', '.join(fixed)} cannot change model.init's model (the checkpoint's architecture, "
            f"which its weights fit); with model.init only {', '.join(INIT_OVERRIDES)} apply: drop the others"
        )
    if m.pretrained or m.backbone_weights:
        which = "model.pretrained" if m.pretrained else "model.backbone_weights"
        raise DToPError(f"{which} starts a fresh model, model.init fine-tunes a checkpoint: set one of them")


def _number_rules(cfg: TrainConfig) -> list[tuple[str, Any, str]]:
    """(key, value, allowed range) of the numeric fields that training cannot run with out of range (None: the
    field is left unset). Ranges: ``> 0``, ``>= 0``, ``>= 1``, or an interval such as ``in [0, 1)``."""
    o, a, loss, d = cfg.optim, cfg.augment, cfg.loss, cfg.data
    return [
        ("optim.lr", o.lr, "> 0"),
        ("optim.weight_decay", o.weight_decay, ">= 0"),
        ("optim.momentum", o.momentum, "in [0, 1)"),
        *((f"optim.betas[{i}]", b, "in [0, 1)") for i, b in enumerate(o.betas)),
        ("optim.backbone_lr_mult", o.backbone_lr_mult, ">= 0"),
        ("optim.head_lr_mult", o.head_lr_mult, ">= 0"),
        ("optim.warmup_epochs", o.warmup_epochs, ">= 0"),
        ("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]"),
        ("augment.hflip", a.hflip, "in [0, 1]"),
        ("augment.brightness", a.brightness, "in [0, 1]"),
        ("augment.contrast", a.contrast, "in [0, 1]"),
        ("augment.saturation", a.saturation, "in [0, 1]"),
        ("loss.scale", loss.scale, "> 0"),
        ("loss.margin", loss.margin, ">= 0"),
        ("loss.contrastive_margin", loss.contrastive_margin, "> 0"),
        ("loss.nnum", loss.nnum, ">= 1"),
        ("loss.query_size", loss.query_size, ">= 1"),
        ("loss.pool_size", loss.pool_size, ">= 1"),
        ("data.min_per_class", d.min_per_class, ">= 1"),
        ("data.max_images", d.max_images, ">= 1"),
        ("data.workers", d.workers, ">= 0"),
        ("val.size", cfg.val.size, ">= 1"),
        *((f"val.scales[{i}]", s, "> 0") for i, s in enumerate(cfg.val.scales)),
        ("clip_grad", cfg.clip_grad, ">= 0"),
        ("threads", cfg.threads, ">= 0"),  # 0: torch's default
        ("save_state_every", cfg.save_state_every, ">= 0"),
        ("max_steps_per_epoch", cfg.max_steps_per_epoch, ">= 1"),
        ("log_every", cfg.log_every, ">= 1"),
    ]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``optim.lr=1e-3`` -> (["optim", "lr"], 0.001); the value is parsed as YAML."""
    import yaml

    if "=" not in item:
        raise DToPError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-3" as a string: accept plain floats written that way.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


class _DuplicateKey(ValueError):
    """A key written twice in one YAML mapping."""


def _unique_key_loader() -> type:
    """PyYAML's safe loader refusing a key written twice in one mapping (``lr:`` under ``optim:`` twice, or two
    ``optim:`` sections): YAML keeps the last silently, so the first value a user edits may do nothing. Keys
    brought in by a merge (``<<: *base``) may be overridden, as YAML intends."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                with contextlib.suppress(TypeError):  # an unhashable key: the base loader says so
                    if key in seen:
                        raise _DuplicateKey(f"key {key!r} is written twice (lines {seen[key]} and {line})")
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply ``section.key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DToPError(f"config file {path} not found")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # noqa: S506
        except _DuplicateKey as e:
            raise DToPError(f"{path}: {e}; keep one (YAML would silently use the last)") from None
        except yaml.YAMLError as e:
            raise DToPError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise DToPError(f"{path} must hold a mapping of config sections at the top level")
        data = loaded or {}
    return TrainConfig.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` (a config as a dict, changed in place) with the ``section.key=value`` overrides set; a key under a
    value that is not a section (``epochs.x=3``) is one line."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise DToPError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def dump_config(cfg: TrainConfig) -> str:
    """YAML text of a config (what ``train --print-config`` shows and the run folder keeps)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
