"""Validation during training: mAP (revisitop Easy/Medium/Hard) of the in-memory model.

Runs ``dtop_export.evaluate.evaluate`` — the toolkit's one implementation of the protocol — on a
:class:`training.embed.ModelEmbedder`, a duck-typed engine around the model (training never imports
``engines``). The default set is the embedded sample (``val.root: null``, built on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig
    from training.config import ValSection


def validate(
    model: DToP, preprocess: PreprocessConfig, cfg: ValSection, device: Any = "cpu", progress: bool = False
) -> dict[str, float]:
    """mAP in percent ``{'easy', 'medium', 'hard'}`` on ``<val.root>/<val.name>`` (model left in its mode)."""
    try:
        from dtop_export.evaluate import default_data_root, evaluate
    except ImportError as e:  # pragma: no cover - part of the package
        raise DToPError("validation needs dtop_export.evaluate; set val.enabled=false to train without it") from e
    from dataclasses import replace

    from training.embed import ModelEmbedder

    root = cfg.root if cfg.root else default_data_root()
    engine = ModelEmbedder(model, replace(preprocess, stride=model.stride), device=str(device))
    was_training = model.training
    try:
        res = evaluate(engine, root, cfg.name, scales=tuple(cfg.scales), progress=progress, image_size=cfg.size)
    finally:
        model.train(was_training)
    return {k: float(res.map[k]) for k in ("easy", "medium", "hard")}
