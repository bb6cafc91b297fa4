"""What a training run is built from, given its config: the model (a preset, or an ``--init`` checkpoint for
fine-tuning), the training set and its dataset, the group-size batch sampler and AMP's dtype. The Trainer
(``training/loop.py``) calls these in its set-up."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtop_export.errors import DToPError
from dtop_export.training.state import refuse_changed_set, set_fingerprint

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig
    from dtop_export.training.config import ModelSection, TrainConfig
    from dtop_export.training.datasets import TrainSet
    from dtop_export.training.sampler import GroupSizeBatchSampler

log = logging.getLogger(__name__)


def amp_settings(amp: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on, its dtype) for the config's ``amp`` (``none``, ``auto``, ``bf16``, ``fp16``) on ``device``:
    ``auto`` is bf16, fp16 on a GPU without bf16."""
    if amp == "none":
        return False, torch.float32
    if amp == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return True, torch.float16
        return True, torch.bfloat16
    return True, torch.bfloat16 if amp == "bf16" else torch.float16


def build_train_model(
    m: ModelSection, seed: int, device: torch.device, resume_state: dict[str, Any] | None = None
) -> tuple[DToP, PreprocessConfig, str]:
    """(model in train mode on ``device``, its preprocessing, where its weights came from for provenance): from
    ``m.init``'s checkpoint (``m.overrides`` only those without weights) or a fresh ``m.preset``. A resumed
    fine-tuning run is rebuilt from its ``resume_state`` (architecture, preprocessing, weights): the ``m.init`` file
    may have moved since."""
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(seed)
    if m.init:
        if resume_state is not None and resume_state.get("model_config") is not None:
            from dtop_export.checkpoint import Checkpoint
            from dtop_export.model.config import DToPConfig
            from dtop_export.preprocess import PreprocessConfig

            # the state's architecture (overrides applied), preprocessing and weights, as a checkpoint would hold them
            ckpt = Checkpoint(
                config=DToPConfig.from_dict(resume_state["model_config"]),
                state_dict=resume_state["model"],
                preprocess=PreprocessConfig.from_dict(resume_state["preprocess"]),
                path=Path(resume_state["_path"]),
            )
        else:
            if resume_state is not None and not Path(m.init).exists():
                raise DToPError(
                    f"model.init {m.init} not found: resuming this fine-tuning run needs it (its train_state.pt, "
                    "written by an older dtop-export, does not record the model's architecture): put the checkpoint "
                    "back there"
                )
            ckpt = load_checkpoint(m.init)
            if m.overrides:  # those without weights (config.INIT_OVERRIDES): dropout, WaveBlock, head BN at inference
                ckpt = replace(ckpt, config=ckpt.config.replace(**m.overrides))
        model = ckpt.build_model()  # on the meta device, then the weights: no initialisation computed
        preprocess = ckpt.preprocess
        init_source = f"checkpoint:{m.init}"
    else:
        mcfg = get_preset(m.preset)
        if m.overrides:
            try:
                mcfg = mcfg.replace(**m.overrides)
            except TypeError as e:
                raise DToPError(f"model.overrides: {e}") from None
        model = build_model(mcfg, pretrained=m.pretrained, backbone_weights=m.backbone_weights)
        preprocess = default_preprocess(mcfg.backbone, model.stride)
        init_source = (
            "pretrained"
            if m.pretrained
            else (f"backbone-weights:{m.backbone_weights}" if m.backbone_weights else "random-init")
        )
    model.to(device).train()
    return model, preprocess, init_source


def load_train_data(
    cfg: TrainConfig,
    out: Path,
    preprocess: PreprocessConfig,
    rank: int = 0,
    world: int = 1,
    resume_state: dict[str, Any] | None = None,
) -> tuple[TrainSet, dict[str, Any], Dataset]:
    """(training set, its fingerprint, the augmenting dataset over it: tuples for the contrastive loss, images
    otherwise). Rank 0 scans the images and writes the size cache (``out/image_sizes.tsv``) and
    ``skipped_images.tsv`` while the others wait; a resumed run is refused if the set changed since its state."""
    import torch.distributed as dist

    from dtop_export.training.datasets import load_train_set
    from dtop_export.training.scan import write_skipped_files
    from dtop_export.training.transforms import Augment, ImageDataset

    is_main = rank == 0
    cache = out / "image_sizes.tsv"
    if world > 1 and not is_main:
        dist.barrier()  # let rank 0 scan the images and write the size cache first
    ts = load_train_set(cfg.data, size_cache=cache if is_main else (cache if cache.exists() else None))
    if world > 1 and is_main:
        dist.barrier()
    fingerprint = set_fingerprint(ts)
    if resume_state is not None:
        refuse_changed_set(resume_state, fingerprint, out)
    a = cfg.augment
    aug = Augment(tuple(a.scale), a.hflip, a.brightness, a.contrast, a.saturation, train=True)
    dataset: Dataset
    if cfg.loss.name == "contrastive":
        from dtop_export.training.tuples import TupleDataset

        dataset = TupleDataset(ts, preprocess.mean, preprocess.std, aug)
    else:
        dataset = ImageDataset(ts, preprocess.mean, preprocess.std, aug)
    if is_main:
        log.info("%s", ts.summary())
        if ts.skipped_files:  # every one, with its reason (the warning named one per reason)
            write_skipped_files(out / "skipped_images.tsv", ts.skipped_files)
            log.info("skipped files and why: %s", out / "skipped_images.tsv")
    return ts, fingerprint, dataset


def make_sampler(
    cfg: TrainConfig, sizes: list[tuple[int, int]], stride: int, rank: int, world: int, merge_small: bool
) -> GroupSizeBatchSampler:
    """The group-size batch sampler over images of ``sizes`` (this process's shard), capped at
    ``max_steps_per_epoch`` optimiser steps."""
    from dtop_export.training.sampler import GroupSizeBatchSampler

    s = cfg.sampler
    sampler = GroupSizeBatchSampler(
        sizes,
        s.batch_size,
        stride,
        s.base_size,
        s.aspect_ratios,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        drop_last=s.drop_last,
        merge_small=merge_small,
    )
    sampler.max_batches = cfg.max_steps_per_epoch and cfg.max_steps_per_epoch * cfg.accum_steps
    return sampler
