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
