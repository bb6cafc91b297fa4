"""Shared fixtures: a random-init small DToP model and its checkpoint (no network, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtop_export.model import DToP, build_model, get_preset


@pytest.fixture(scope="session")
def small_model() -> DToP:
    torch.manual_seed(0)
    return build_model(get_preset("small")).eval()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory, small_model: DToP) -> Path:
    from dtop_export.checkpoint import new_provenance, save_checkpoint
    from dtop_export.preprocess import default_preprocess

    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, small_model, default_preprocess("dtop_tiny_r_s16", 16), provenance=new_provenance("test"))
    return path
