"""Model commands: ``init`` (create a checkpoint from a preset) and ``info`` (describe a file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dtop_export.cli._app import app, console
from dtop_export.errors import DToPError

# init ------------------------------------------------------------------------------------------------


@app.command()
def init(
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint file to write.")],
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
    if output.exists() and not force:
        raise DToPError(f"{output} exists: pass --force to overwrite it")
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


# info ------------------------------------------------------------------------------------------------


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="A checkpoint (.pt) or an exported model (.onnx).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    presets: Annotated[bool, typer.Option("--presets", help="List the model presets.")] = False,
) -> None:
    """Describe a checkpoint (config, parameters per component, whitening, provenance) or an ONNX file."""
    if presets:
        _info_presets(as_json)
        return
    if path is None:
        raise DToPError("give a checkpoint or .onnx path, or --presets")
    if path.suffix.lower() == ".onnx":
        from dtop_export.export import read_onnx_metadata

        _print_info(read_onnx_metadata(path), as_json, title=str(path))
        return
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.model import parameter_counts

    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    report: dict[str, Any] = {
        "file": str(path),
        "sha256": ckpt.sha256,
        "config": ckpt.config.to_dict(),
        "stride": model.stride,
        "parameters": parameter_counts(model),
        "whitening": None
        if ckpt.whitening is None
        else {
            "kind": ckpt.whitening.kind,
            "in_dim": int(ckpt.whitening.proj.shape[1]),
            "out_dim": ckpt.whitening.out_dim,
            **ckpt.whitening.info,
        },
        "preprocess": ckpt.preprocess.to_dict(),
        "provenance": ckpt.provenance,
    }
    _print_info(report, as_json, title=str(path))


def _info_presets(as_json: bool) -> None:
    from dtop_export.model.config import DEFAULT_PRESET, PRESETS

    rows = {
        name: {
            "backbone": c.backbone,
            "img_size": c.img_size,
            "k": c.num_layers,
            "N": c.descriptor_dim,
            "default": name == DEFAULT_PRESET,
        }
        for name, c in PRESETS.items()
    }
    _print_info({"presets": rows}, as_json, title="presets")


def _print_info(report: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"[bold]{title}[/bold]")
    for section, value in report.items():
        if isinstance(value, dict):
            table = Table(title=section, show_header=False, title_justify="left")
            table.add_column("key", style="cyan")
            table.add_column("value")
            for k, v in value.items():
                if isinstance(v, float):
                    v = f"{v:.6g}"
                elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
                    v = f"{v:,}"
                elif isinstance(v, (dict, list)):
                    v = json.dumps(v, default=str)
                table.add_row(escape(str(k)), escape(str(v)))
            con.print(table)
        else:
            con.print(f"[cyan]{section}[/cyan]: {escape(str(value))}")
