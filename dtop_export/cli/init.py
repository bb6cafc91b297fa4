"""``dtop-export init``: a checkpoint from a preset (random init, or pretrained backbone weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import app, output_option, refuse_existing
from dtop_export.errors import DToPError


@app.command()
def init(
    output: Annotated[Path, output_option("-o", "--output", help="Checkpoint file to write.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="Model preset (see `info --presets`).")] = (
        "r50-vitb16"
    ),
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Download timm's ImageNet weights for the backbone (network).")
    ] = False,
    backbone_weights: Annotated[
        Path | None,
        typer.Option("--backbone-weights", help="Local timm backbone weights (.safetensors/.pth) for offline use."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random initialisation.")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Create a checkpoint from a preset: random init (offline) or pretrained backbone weights."""
    if pretrained and backbone_weights is not None:
        raise DToPError("use either --pretrained or --backbone-weights, not both")
    refuse_existing(output, force=force)
    import torch

    from dtop_export.checkpoint import new_provenance, save_checkpoint
    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = build_model(cfg, pretrained=pretrained, backbone_weights=backbone_weights)
    source = (
        "pretrained"
        if pretrained
        else (f"backbone-weights:{backbone_weights.name}" if backbone_weights else "random-init")
    )
    prov = new_provenance(f"init --preset {preset}", backbone_init=source, seed=seed)
    save_checkpoint(output, model, default_preprocess(cfg.backbone, model.stride), provenance=prov)
    n = sum(p.numel() for p in model.parameters())
    typer.echo(f"wrote {output} (preset {preset}, {n / 1e6:.1f}M parameters, backbone {source})")
