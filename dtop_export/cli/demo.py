"""``demo``: the whole toolkit on the embedded default, one stage after another, with a final summary.

embedded sets -> train (or ``--checkpoint``) -> whitening -> ONNX -> TensorRT (when a GPU and TensorRT are
there) -> parity report -> evaluation table -> retrieval picture. Every stage writes its artefacts into
``--workdir`` atomically; a re-run reuses a stage whose artefacts exist, whose settings are unchanged and
whose inputs were themselves reused (``--force`` rebuilds everything). ``demo.json`` records the stages.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dtop_export.cli._app import app, console
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.evaluate import RevisitopDataset

STATE_FILE = "demo.json"
STATE_VERSION = 1


@dataclass
class Stage:
    """One demo stage: what it makes, the settings that decide whether a previous result still holds."""

    name: str
    title: str
    outputs: list[Path]
    key: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # built | reused | skipped | failed
    seconds: float = 0.0
    note: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    changed: bool = True  # False when a run wrote nothing (e.g. no TensorRT here)


class DemoRun:
    """Runs stages in order and decides, per stage, whether a previous run's artefacts can be reused."""

    def __init__(self, workdir: Path, force: bool, progress: bool) -> None:
        self.workdir = workdir
        self.force = force
        self.progress = progress
        self.con = console()
        self.stages: list[Stage] = []
        self.previous: dict[str, Any] = {}
        self.upstream_rebuilt = False
        state = workdir / STATE_FILE
        if state.is_file() and not force:
            try:
                data = json.loads(state.read_text())
                if data.get("version") == STATE_VERSION:
                    self.previous = {s["name"]: s for s in data.get("stages", [])}
            except (OSError, ValueError):
                self.previous = {}

    def stage(
        self,
        name: str,
        title: str,
        outputs: list[Path],
        build: Callable[[Stage], None],
        key: dict[str, Any] | None = None,
        valid: Callable[[], bool] | None = None,
        leaf: bool = False,
    ) -> Stage:
        """Run (or reuse) one stage; its ``build`` fills ``facts`` and may mark it skipped. Rebuilding a stage
        rebuilds every later one, except after a ``leaf`` (whose files no later stage reads)."""
        st = Stage(name, title, outputs, dict(key or {}))
        self.stages.append(st)
        n = len(self.stages)
        prev = self.previous.get(name)
        reusable = (
            not self.force
            and not self.upstream_rebuilt
            and prev is not None
            and prev.get("status") in ("built", "reused", "skipped")
            and prev.get("key") == _jsonable(st.key)
            and all(p.exists() for p in outputs)
            and (valid is None or valid())
        )
        self.con.rule(f"[bold][{n}] {title}")
        if reusable:
            st.status, st.facts, st.note = "reused", dict(prev.get("facts", {})), prev.get("note", "")
            made = ", ".join(_rel(p, self.workdir) for p in outputs)
            self.con.print(f"reusing {made} (--force rebuilds)", markup=False)
            self.save()
            return st
        t0 = time.perf_counter()
        try:
            build(st)
        except BaseException:
            st.status, st.seconds = "failed", time.perf_counter() - t0
            self.save()
            raise
        st.seconds = time.perf_counter() - t0
        if st.status == "pending":
            st.status = "built"
        if st.changed and not leaf:
            self.upstream_rebuilt = True
        if st.note:
            self.con.print(st.note, markup=False, soft_wrap=True)
        self.save()
        return st

    def save(self) -> None:
        from dtop_export._io import atomic_write_text

        data = {
            "version": STATE_VERSION,
            "stages": [
                {
                    "name": s.name,
                    "title": s.title,
                    "status": s.status,
                    "seconds": round(s.seconds, 2),
                    "outputs": [_rel(p, self.workdir) for p in s.outputs],
                    "key": _jsonable(s.key),
                    "note": s.note,
                    "facts": _jsonable(s.facts),
                }
                for s in self.stages
            ],
        }
        atomic_write_text(self.workdir / STATE_FILE, json.dumps(data, indent=2) + "\n")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)


def _loads_checkpoint(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        from dtop_export.checkpoint import load_checkpoint

        try:
            load_checkpoint(path)
        except (DToPError, OSError):
            return False
        return True

    return check


def _fmt_map(m: dict[str, float] | None) -> str:
    if not m:
        return "—"
    return " / ".join(f"{m[k]:.2f}" for k in ("easy", "medium", "hard"))


@app.command()
def demo(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Model preset to train (see `info --presets`).")] = (
        "small"
    ),
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where every artefact goes.")] = Path("dtop-demo"),
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Start from this checkpoint instead of training (its whitening is kept)."),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs on the embedded training set.")] = 15,
    steps_per_epoch: Annotated[
        int | None, typer.Option("--steps-per-epoch", help="Cap the optimiser steps per epoch (quick runs).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training images per step.")] = 32,
    fp16_emulate: Annotated[
        bool,
        typer.Option(
            "--fp16-emulate/--no-fp16-emulate",
            help="Also hold the model run in FP16 on the CPU (model.half()) to the FP16 contract in the parity "
            "report: a preview of a TensorRT FP16 engine where there is no GPU.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Rebuild every stage, even if its files exist.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Run the whole toolkit on the embedded data: train, whiten, export, parity, evaluate, picture.

    About 6 minutes on 2 CPU cores with the small preset; re-runs reuse what is already built (--force
    rebuilds). Exit code 1 when an artefact fails its parity contract.
    """
    if epochs < 1:
        raise DToPError(f"--epochs must be >= 1, got {epochs}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise DToPError(f"--steps-per-epoch must be >= 1, got {steps_per_epoch}")
    if checkpoint is not None and not checkpoint.is_file():
        raise DToPError(f"checkpoint {checkpoint} not found")
    from dtop_export.model import PRESETS

    if checkpoint is None and preset not in PRESETS:
        raise DToPError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if workdir.exists() and not workdir.is_dir():
        raise DToPError(f"--workdir {workdir} is a file: choose a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = DemoRun(workdir, force, progress)
    data_root = workdir / "data"
    train_root = data_root / "train-sample"
    train_dir = workdir / "train"
    model_pt = workdir / "model.pt"
    model_onnx = workdir / "model.onnx"
    plan = workdir / "model.plan"
    audit_json = workdir / "fp16-audit.json"
    parity_json = workdir / "parity.json"
    eval_json = workdir / "evaluation.json"
    picture = workdir / "retrieval.png"

    @functools.cache
    def sample_set() -> RevisitopDataset:
        """The embedded evaluation set in the workdir (built by the data stage), read once."""
        from dtop_export.evaluate import resolve_dataset

        return resolve_dataset("sample", data_root)

    # 1. data ------------------------------------------------------------------------------------------
    def build_data(st: Stage) -> None:
        from training.sample import build_training_sample

        data_root.mkdir(exist_ok=True)
        with run.con.status("building the embedded evaluation and training sets"):
            ds = sample_set()
            build_training_sample(train_root)
        classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
        views = sum(len(list((train_root / c).glob("*.jpg"))) for c in classes)
        st.facts = {"eval_images": ds.n_images, "eval_queries": ds.n_queries, "train_views": views}
        st.note = (
            f"evaluation set {ds.folder}: {ds.n_images} database images, {ds.n_queries} queries; "
            f"training set {train_root}: {views} views of {len(classes)} photos"
        )

    run.stage(
        "data",
        "embedded data sets (scikit-image's photos, offline)",
        [data_root / "sample" / "gnd_sample.pkl", train_root / "RECIPE.json"],
        build_data,
    )

    # 2. train -------------------------------------------------------------------------------------------
    trained = train_dir / "final.pt"
    train_key: dict[str, Any] = (
        {"checkpoint": str(checkpoint.resolve()), "mtime": checkpoint.stat().st_mtime}
        if checkpoint is not None
        else {"preset": preset, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size}
    )

    def build_train(st: Stage) -> None:
        from dtop_export.checkpoint import load_checkpoint

        train_dir.mkdir(exist_ok=True)
        if checkpoint is not None:
            load_checkpoint(checkpoint)  # fails early with a clear message on a bad file
            _copy(checkpoint, trained)
            st.status = "skipped"
            st.note = f"training skipped: starting from {checkpoint}"
            st.facts = {"source": str(checkpoint)}
            return
        from training.config import load_config
        from training.loop import Trainer

        _training_logs()

        sets = [
            f"model.preset={preset}",
            f"data.root={train_root}",
            f"val.root={data_root}",
            f"out_dir={train_dir}",
            f"epochs={epochs}",
            f"sampler.batch_size={batch_size}",
            f"progress={str(progress).lower()}",
        ]
        if steps_per_epoch is not None:
            sets.append(f"max_steps_per_epoch={steps_per_epoch}")
        cfg = load_config(_sample_config(), sets)
        result = Trainer(cfg).run()
        if result.final is None:
            raise DToPError("training finished without writing a checkpoint")
        prov = load_checkpoint(result.final).provenance
        st.facts = {
            "epochs": result.epochs,
            "steps": result.steps,
            "images_per_second": round(result.images_per_second, 1),
            "map_before": prov.get("initial_metrics"),
            "map_after": prov.get("metrics"),
        }
        st.note = (
            f"trained {preset}: {result.epochs} epoch(s), {result.steps} steps, {result.images_per_second:.1f} img/s; "
            f"validation mAP E/M/H {_fmt_map(prov.get('initial_metrics'))} -> {_fmt_map(prov.get('metrics'))}"
        )

    run.stage(
        "train", "train on the embedded training set", [trained], build_train, train_key, _loads_checkpoint(trained)
    )

    # 3. whiten ------------------------------------------------------------------------------------------
    def build_whiten(st: Stage) -> None:
        from dtop_export.checkpoint import load_checkpoint
        from training.whitening import whiten_checkpoint

        if checkpoint is not None and load_checkpoint(trained).whitening is not None:
            _copy(trained, model_pt)
            st.status = "skipped"
            st.note = "kept the checkpoint's own whitening"
            return
        size = sample_set().image_size or 256
        _, wh = whiten_checkpoint(trained, model_pt, pairs=train_root, size=size, progress=progress)
        st.facts = {"kind": wh.kind, "pairs": wh.info.get("pairs"), "images": wh.info.get("images")}
        st.note = f"learned {wh.kind} whitening {wh.info['in_dim']} -> {wh.out_dim} from {wh.info.get('pairs')} pairs"

    run.stage("whiten", "learn whitening (supervised Lw)", [model_pt], build_whiten, valid=_loads_checkpoint(model_pt))

    # 4. onnx --------------------------------------------------------------------------------------------
    def build_onnx(st: Stage) -> None:
        from dtop_export.export import export_onnx

        with run.con.status("exporting") as status:
            res = export_onnx(model_pt, model_onnx, on_stage=lambda s: status.update(f"exporting: {s}"))
        st.facts = {"mib": round(res.size_bytes / 2**20, 1), "nodes": res.nodes, "opset": res.opset}
        st.note = (
            f"wrote {model_onnx} ({res.size_bytes / 2**20:.1f} MiB, opset {res.opset}, {res.nodes} nodes, "
            "dynamic batch/height/width, whitening folded in)"
        )

    run.stage("onnx", "export ONNX", [model_onnx], build_onnx)

    # 5. tensorrt ----------------------------------------------------------------------------------------
    def build_trt(st: Stage) -> None:
        from engines.tensorrt import build_engine, make_profiles, require_tensorrt_and_gpu

        try:
            require_tensorrt_and_gpu()
        except DToPError as e:
            st.status, st.changed = "skipped", False
            st.note = f"TensorRT engine not built: {e}"
            return
        profiles = make_profiles(["1x3x64x64"], ["1x3x256x256"], ["8x3x512x512"])
        with run.con.status("building the TensorRT FP16 engine (minutes)"):
            res = build_engine(model_onnx, plan, fp16=True, profiles=profiles)
        st.facts = {"seconds": round(res.seconds, 1), "path": str(plan)}
        st.note = f"wrote {plan} (FP16) in {res.seconds:.0f} s"

    trt_stage = run.stage("tensorrt", "TensorRT FP16 engine", [plan], build_trt)
    if trt_stage.status == "skipped":
        trt_stage.outputs = []

        # 5b. without TensorRT: the FP16 engine's accuracy, emulated on the CPU -------------------------
        def build_audit(st: Stage) -> None:
            from dtop_export._io import atomic_write_text
            from dtop_export.checks import fp16_audit

            with run.con.status("emulating TensorRT's FP16 (FP32 islands) on the CPU"):
                res = fp16_audit(model_onnx, sample_set())
            atomic_write_text(audit_json, json.dumps(res.to_dict(), indent=2, default=str) + "\n")
            run.con.print(res.table(), soft_wrap=True, markup=False)
            final = res.final
            st.facts = {
                "passed": res.passed,
                "cosine_min": final.cosine_min,
                "map_delta": final.map_delta,
                "keep_fp32_nodes": res.keep_fp32_nodes,
            }
            worst = max((abs(v) for v in final.map_delta.values()), default=0.0)
            st.note = (
                f"FP16 preview: cos min {final.cosine_min:.6f}, |ΔmAP| <= {worst:.2f}: "
                + (
                    "within the FP16 contract"
                    if res.passed
                    else "OUTSIDE the FP16 contract (cos >= 0.999, |ΔmAP| <= 0.2)"
                )
                + (f"; keep in FP32: {','.join(res.keep_fp32_nodes)}" if res.keep_fp32_nodes else "")
            )

        run.stage("fp16-audit", "FP16 audit (TensorRT FP16 emulated on the CPU)", [audit_json], build_audit, leaf=True)

    # 6. parity ------------------------------------------------------------------------------------------
    def build_parity(st: Stage) -> None:
        from dtop_export._io import atomic_write_text
        from dtop_export.parity import parity
        from engines.base import load_engine
        from engines.pytorch import TorchEngine

        ds = sample_set()
        ref = TorchEngine.from_checkpoint(model_pt)
        engines = [load_engine(model_onnx)]
        if trt_stage.status in ("built", "reused") and plan.exists():
            engines.append(load_engine(plan))
        if fp16_emulate:
            engines.append(TorchEngine.from_checkpoint(model_pt, precision="fp16"))
        try:
            report = parity(ref, engines, ds, progress=progress)
        finally:
            for e in engines:
                e.close()
        atomic_write_text(parity_json, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(parity_json.with_suffix(".md"), report.table() + "\n")
        run.con.print(report.table(), soft_wrap=True, markup=False)
        st.facts = {
            "passed": report.passed,
            "engines": [
                {"label": e.label, "cosine_min": e.cosine_min, "max_abs": e.max_abs, "passed": e.passed}
                for e in report.engines
            ],
            "failures": report.failures(),
        }
        st.note = "parity: PASS, every engine within its contract" if report.passed else "parity: FAIL"

    run.stage(
        "parity",
        "parity report (every artefact vs PyTorch fp32)",
        [parity_json],
        build_parity,
        {"fp16_emulate": fp16_emulate},
    )

    # 7. evaluate + picture -------------------------------------------------------------------------------
    def build_eval(st: Stage) -> None:
        from dtop_export._io import atomic_write_text
        from dtop_export.evaluate import evaluate_dataset
        from dtop_export.visualize import retrieval_picture
        from engines.base import load_engine

        ds = sample_set()
        captured: dict[str, Any] = {}
        with load_engine(model_onnx) as engine:
            res = evaluate_dataset(engine, ds, progress=progress, on_extract=lambda db, q: captured.update(db=db, q=q))
        atomic_write_text(eval_json, json.dumps({"model": str(model_onnx), **res.to_dict()}, indent=2) + "\n")
        run.con.print(res.table(), soft_wrap=True, markup=False)
        retrieval_picture(ds, captured["db"], captured["q"], picture)
        st.facts = {"map": res.map, "mp": {s: {str(k): v for k, v in d.items()} for s, d in res.mp.items()}}
        st.note = f"wrote {eval_json} and {picture} (5 queries, top-5: green correct, red wrong, orange junk)"

    run.stage("evaluate", "evaluation (ONNX Runtime) and retrieval picture", [eval_json, picture], build_eval)

    _summary(run, time.perf_counter() - t_start)
    parity_facts = next(s for s in run.stages if s.name == "parity").facts
    if not parity_facts.get("passed", False):
        for line in parity_facts.get("failures", []):
            typer.echo(f"FAIL {line}", err=True)
        raise typer.Exit(1)


def _training_logs() -> None:
    """Show the trainer's per-epoch lines (logger ``training``) without raising every library to INFO."""
    import logging

    log = logging.getLogger("training")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _copy(src: Path, dest: Path) -> None:
    from dtop_export._io import atomic_path

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _sample_config() -> Path:
    """The shipped config the demo trains with (training/configs/sample-small.yaml)."""
    import training

    path = Path(training.__file__).parent / "configs" / "sample-small.yaml"
    if not path.is_file():
        raise DToPError(f"{path} is missing: reinstall dtop-export")
    return path


def _summary(run: DemoRun, seconds: float) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"dtop-export demo: {run.workdir}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("artefacts / result")
    colours = {"built": "green", "reused": "cyan", "skipped": "yellow", "failed": "red"}
    for s in run.stages:
        what = escape(", ".join(_rel(p, run.workdir) for p in s.outputs) or s.note)
        if s.name == "parity":
            what += "  " + ("[green]PASS[/green]" if s.facts.get("passed") else "[red]FAIL[/red]")
        table.add_row(s.name, f"[{colours.get(s.status, 'white')}]{s.status}[/]", f"{s.seconds:.1f} s", what)
    run.con.print()
    run.con.print(table)
    facts = {s.name: s.facts for s in run.stages}
    lines = []
    tr = facts.get("train", {})
    if tr.get("map_after"):
        lines.append(f"training: mAP E/M/H {_fmt_map(tr.get('map_before'))} -> {_fmt_map(tr.get('map_after'))}")
    au = facts.get("fp16-audit", {})
    if au:
        lines.append(
            f"FP16 preview (CPU emulation, no TensorRT here): cos min {au['cosine_min']:.6f}, "
            + ("PASS" if au.get("passed") else "FAIL (not gating: no FP16 artefact was built)")
        )
    for e in facts.get("parity", {}).get("engines", []):
        lines.append(
            f"parity {e['label']}: cos min {e['cosine_min']:.6f}, max-abs {e['max_abs']:.1e}, "
            + ("PASS" if e["passed"] else "FAIL")
        )
    ev = facts.get("evaluate", {})
    if ev.get("map"):
        lines.append(f"ONNX Runtime on the sample set: mAP E/M/H {_fmt_map(ev['map'])}")
    lines.append(f"total {seconds:.0f} s; summary in {run.workdir / STATE_FILE}")
    for line in lines:
        run.con.print(line, soft_wrap=True, markup=False)
