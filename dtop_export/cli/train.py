"""``dtop-export train``: DToP on a landmark set (``torchrun ... -m dtop_export train`` for several processes)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ProgressOpt, above, app, at_least
from dtop_export.errors import DToPError

_SHORTCUTS = {
    "out": "out_dir",
    "preset": "model.preset",
    "init": "model.init",
    "backbone_weights": "model.backbone_weights",
    "dataset": "data.dataset",
    "data_root": "data.root",
    "epochs": "epochs",
    "batch_size": "sampler.batch_size",
    "lr": "optim.lr",
}


def setup_logging() -> None:
    """INFO on rank 0, warnings elsewhere (DDP), one line per message."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(message)s")
    root.setLevel(level)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (sections as in training/config.py).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue a run from its folder (or its train_state.pt).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (out_dir).")] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (model.preset).")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Fine-tune this checkpoint (model.init).")] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Download timm's ImageNet backbone weights (network).")
    ] = False,
    backbone_weights: Annotated[
        Path | None, typer.Option("--backbone-weights", help="Local timm backbone weights (offline).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="data.dataset: sample, folder, revisitop, sfm120k, gldv2, gldv1, nc-clean.")
    ] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="data.root: the dataset folder.")] = None,
    epochs: Annotated[int | None, typer.Option(callback=at_least(1), help="Number of epochs.")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            callback=at_least(2),
            help="Images per step per process (>= 2); with loss.name=contrastive, tuples per step per process "
            "(cirtorch's meaning: 1 query + 1 positive + loss.nnum negatives each).",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(callback=above(0), help="Base learning rate (optim.lr).")] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Train from scratch in a run folder that already holds a run (its checkpoints, state and logs are "
            "removed first).",
        ),
    ] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Train DToP (group-size batches, ArcFace or contrastive); checkpoints + state in the run folder.

    Several processes: torchrun --nproc_per_node=N -m dtop_export train --config cfg.yaml
    """
    sets = list(overrides or [])
    given = {
        "out": out,
        "preset": preset,
        "init": init,
        "backbone_weights": backbone_weights,
        "dataset": dataset,
        "data_root": data_root,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
    }
    for name, value in given.items():
        if value is not None:
            sets.append(f"{_SHORTCUTS[name]}={value}")
    if pretrained:
        sets.append("model.pretrained=true")
    if resume is not None and out is None and not any(s.split("=", 1)[0].strip() == "out_dir" for s in sets):
        # the run continues in its own folder, not in --config's out_dir (or the default runs/train)
        sets.append(f"out_dir={resume if resume.is_dir() else resume.parent}")
    source = ctx.get_parameter_source("progress")  # left out: the config's (default: on)
    if source is not None and source.name != "DEFAULT":
        sets.append(f"progress={str(progress).lower()}")
    setup_logging()
    from dtop_export.training.config import TrainConfig, dump_config, load_config

    if resume is not None and config is None:
        from dtop_export.training.state import read_state

        base = TrainConfig.from_dict(read_state(resume, mmap=True)["config"])  # Trainer reads it whole
        cfg = _apply(base, sets)
    else:
        cfg = load_config(config, sets)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    if cfg.model.pretrained and cfg.model.backbone_weights:
        raise DToPError("use either --pretrained or --backbone-weights, not both")
    from dtop_export.memory import check_image_size
    from dtop_export.training.loop import Trainer
    from dtop_export.training.state import clear_run

    # a group's input has the area of a base_size square: a lower bound of one step (training keeps activations too);
    # with the contrastive loss a batch is sampler.batch_size tuples of 2 + loss.nnum images each (cirtorch's meaning)
    images, per = cfg.images_per_step(), cfg.tuple_size()
    check_image_size(cfg.sampler.base_size, batch=images, option="sampler.base_size",
                     batch_option="sampler.batch_size" + (f" (tuples of {per} images)" if per > 1 else ""))  # fmt: skip
    _refuse_previous_run(Path(cfg.out_dir), resume, force)
    trainer = Trainer(cfg, resume=resume)
    if force and resume is None and int(os.environ.get("RANK", "0")) == 0:
        clear_run(cfg.out_dir)
    result = trainer.run()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    last = result.history[-1] if result.history else {}
    typer.echo(f"trained {result.epochs} epoch(s), {result.steps} steps, {result.images_per_second:.1f} img/s")
    if last.get("metrics"):
        from dtop_export.retrieval.metrics import format_map

        typer.echo(f"validation mAP {format_map(last['metrics'])} (E/M/H)")
    typer.echo(f"wrote {result.final}" + (f" (best: {result.best})" if result.best else ""))


def _refuse_previous_run(out: Path, resume: Path | None, force: bool) -> None:
    """Refuse, before any work, a run folder that already holds a run (checkpoints, state, logs) unless the run
    resumed is that one, or ``--force``."""
    from dtop_export.training.state import previous_run

    found = previous_run(out)
    if not found or force:
        return
    if resume is not None and (resume if resume.is_dir() else resume.parent).resolve() == out.resolve():
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    raise DToPError(
        f"run folder {out} already holds a training run ({names}): pass --resume {out} to continue it, "
        "--force to train from scratch there (its checkpoints and logs are replaced), or choose another -o"
    )


def _apply(cfg, sets: list[str]):  # noqa: ANN001, ANN202 - TrainConfig is imported lazily
    from dtop_export.training.config import TrainConfig, apply_overrides

    return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), sets))
