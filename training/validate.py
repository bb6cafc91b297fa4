"""Validation during training: mAP (revisitop Easy/Medium/Hard) of the in-memory model.

Runs ``dtop_export.retrieval.evaluate.evaluate`` — the toolkit's one implementation of the protocol — on a
:class:`training.embed.ModelEmbedder`, a duck-typed engine around the model (training never imports
``engines``). The default set is the embedded sample (``val.root: null``, built on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig
    from dtop_export.training.config import ValSection


def validate(
    model: DToP, preprocess: PreprocessConfig, cfg: ValSection, device: Any = "cpu", progress: bool = False
) -> dict[str, float]:
    """mAP in percent ``{'easy', 'medium', 'hard'}`` on ``<val.root>/<val.name>`` (model left in its mode)."""
    from dataclasses import replace

    from dtop_export.model.backbone import weight_standardization_cached
    from dtop_export.retrieval.datasets import default_data_root
    from dtop_export.retrieval.evaluate import evaluate
    from dtop_export.training.embed import ModelEmbedder

    root = cfg.root if cfg.root else default_data_root()
    engine = ModelEmbedder(model, replace(preprocess, stride=model.stride), device=str(device))
    was_training = model.training
    try:
        with weight_standardization_cached(model):  # the weights are fixed for the pass: standardised once
            res = evaluate(engine, root, cfg.name, scales=tuple(cfg.scales), progress=progress, image_size=cfg.size)
    finally:
        model.train(was_training)
    return {k: float(res.map[k]) for k in ("easy", "medium", "hard")}


def check_val_set(cfg: ValSection) -> None:
    """Refuse, before any work (the training set's scan, the model, a resumed run's epoch), a validation set that is
    not there: ``<val.root>/<val.name>/gnd_<val.name>.pkl`` (or a ``val.name`` folder holding one ``gnd_*.pkl``), in
    one line naming the ``val.*`` key to fix. The embedded sample (``val.name: sample``) is built on first use."""
    if not cfg.enabled:
        return
    from pathlib import Path

    from dtop_export.errors import DToPError
    from dtop_export.retrieval.datasets import DATASETS, default_data_root, resolve_dataset
    from dtop_export.retrieval.sample_data import NAME as SAMPLE

    if cfg.name == SAMPLE:
        return
    root = Path(cfg.root) if cfg.root else default_data_root()
    at = f"val.root {root}" if cfg.root else f"val.root (null: {root})"
    fix = f"the folder that holds {cfg.name}/gnd_{cfg.name}.pkl and jpg/, or val.enabled=false to train without one"
    folder = Path(cfg.name) if cfg.name not in DATASETS and Path(cfg.name).is_dir() else root / cfg.name
    pkls = [folder / f"gnd_{cfg.name}.pkl"] if cfg.name in DATASETS else sorted(folder.glob("gnd_*.pkl"))
    if not any(p.is_file() for p in pkls):
        if not root.is_dir():
            raise DToPError(f"validation set not found: {at} is not a folder: set val.root to {fix}")
        sets = sorted(p.parent.name for p in root.glob("*/gnd_*.pkl"))
        there = f"it holds {', '.join(sets[:8])}" if sets else "it holds no set"
        raise DToPError(
            f"validation set not found: no {folder / f'gnd_{cfg.name}.pkl'}: set val.name to a set under {at} "
            f"({there}) or val.root to {fix}"
        )
    try:
        resolve_dataset(cfg.name, root)
    except DToPError as e:
        raise DToPError(f"validation set val.name={cfg.name} under {at}: {e}") from None
