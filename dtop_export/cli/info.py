"""``dtop-export info``: describe a checkpoint, an exported model, or the presets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dtop_export.cli.common import app, console
from dtop_export.errors import DToPError


@app.command()
def info(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A checkpoint (.pt), an exported model (.onnx, IR .xml, ExecuTorch .pte, TensorRT .plan), a shard "
            "folder (embed -o DIR), an .npy of descriptors or a faiss index (index -o X.faiss)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    presets: Annotated[bool, typer.Option("--presets", help="List the model presets.")] = False,
) -> None:
    """Describe a checkpoint (config, parameters per component, whitening, provenance), an exported model
    (ONNX, OpenVINO IR, ExecuTorch program, TensorRT plan: I/O and the deployment metadata), or a corpus's files
    (a shard folder, an .npy of descriptors, a faiss index: settings, counts and an integrity check; exit 1 when
    that check fails)."""
    if presets:
        _info_presets(as_json)
        return
    if path is None:
        raise DToPError("give a checkpoint (.pt) or an exported model (.onnx, .xml, .pte, .plan), or --presets")
    from dtop_export.engines import IR_SUFFIXES, PLAN_SUFFIXES, PTE_SUFFIXES

    suffix = path.suffix.lower()
    corpus = _describe_corpus(path, suffix)
    if corpus is not None:
        _print_info(corpus, as_json, title=str(path))
        if str(corpus.get("check", "")).startswith("FAIL"):
            raise typer.Exit(1)
        return
    if suffix in (".onnx", *IR_SUFFIXES, *PTE_SUFFIXES, *PLAN_SUFFIXES):
        _print_info(_describe_model(path, suffix), as_json, title=str(path))
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


def _describe_corpus(path: Path, suffix: str) -> dict[str, Any] | None:
    """A shard folder, an ``.npy`` of descriptors or a faiss index (or one of its sidecars) described; None for
    anything else."""
    if path.is_dir():
        from dtop_export.corpus.integrity import describe_folder

        return describe_folder(path)
    if not path.is_file():
        return None
    if suffix == ".npy":
        from dtop_export.corpus.integrity import describe_npy

        return describe_npy(path)
    name = path.name
    for tail in (".json", ".ids.parquet"):  # an index's sidecar: describe its index
        if name.endswith(".faiss" + tail):
            path, suffix = path.with_name(name[: -len(tail)]), ".faiss"
    if suffix == ".faiss":
        from dtop_export.corpus.index import describe_index

        return describe_index(path)
    return None


def _describe_model(path: Path, suffix: str) -> dict[str, Any]:
    from dtop_export.engines import IR_SUFFIXES, PTE_SUFFIXES

    if suffix == ".onnx":
        from dtop_export.contract import read_onnx_metadata

        return read_onnx_metadata(path)
    if suffix in IR_SUFFIXES:
        from dtop_export.openvino_ir import describe_ir

        return describe_ir(path)
    if suffix in PTE_SUFFIXES:
        from dtop_export.engines.executorch import describe_pte

        return describe_pte(path)
    from dtop_export.engines.tensorrt.sidecar import describe_plan

    return describe_plan(path)


def _info_presets(as_json: bool) -> None:
    from dtop_export.model.config import DEFAULT_PRESET, PRESETS

    rows = {
        name: {
            "backbone": c.backbone,
            "img_size": c.img_size,
            "k": c.num_layers,
            "N": c.descriptor_dim,
            "default": name == DEFAULT_PRESET,
            "parameters": _preset_parameters(c),
        }
        for name, c in PRESETS.items()
    }
    _print_info({"presets": rows}, as_json, title="presets")


def _preset_parameters(cfg: Any) -> dict[str, int]:
    """A preset's parameters, backbone (stem, transformer, position embedding) and DToP (branches, ELM, head), from
    the model built on the meta device: shapes only, no memory, no initialisation (~1 s for all presets)."""
    import torch

    from dtop_export.model import build_model, parameter_counts

    with torch.device("meta"):
        counts = parameter_counts(build_model(cfg))
    backbone = counts["stem"] + counts["transformer"] + counts["pos_embed"]
    return {"backbone": backbone, "dtop": counts["total"] - backbone}


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
