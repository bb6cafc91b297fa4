"""The whole toolkit on the embedded default (``dtop-export demo``), one stage after another.

embedded sets -> train (or ``--checkpoint``) -> whitening -> ONNX -> TensorRT FP16 (when a GPU and TensorRT are
there; otherwise the FP16 audit emulates it on the CPU) -> parity report -> evaluation table -> retrieval
picture. Every stage writes its artefacts into the work folder atomically; a re-run reuses a stage whose
artefacts exist, whose settings are unchanged and whose inputs were themselves reused
(:class:`~dtop_export.pipeline.stages.StageRunner`; ``force`` rebuilds everything). ``demo.json`` records the
stages and their facts.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.atomic import atomic_path, atomic_write_text
from dtop_export.bench.harness import machine_info
from dtop_export.errors import DToPError
from dtop_export.pipeline.stages import Reporter, Stage, StageRunner
from dtop_export.retrieval.metrics import format_map

if TYPE_CHECKING:
    from dtop_export.retrieval.datasets import RevisitopDataset

STATE_FILE = "demo.json"
# TensorRT profiles of the demo's engine: the sample set's images are at most 256 px on the longer side.
TRT_PROFILE = (["1x3x64x64"], ["1x3x256x256"], ["8x3x512x512"])


@dataclass
class DemoSettings:
    """What ``dtop-export demo`` was asked to do."""

    workdir: Path = Path("dtop-demo")
    preset: str = "small"
    checkpoint: Path | None = None
    epochs: int = 15
    steps_per_epoch: int | None = None
    batch_size: int = 32
    seed: int = 0
    fp16_emulate: bool = False
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        """One :class:`DToPError` line for settings that cannot work, before anything is written."""
        from dtop_export.model import PRESETS

        if self.epochs < 1:
            raise DToPError(f"--epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise DToPError(f"--steps-per-epoch must be >= 1, got {self.steps_per_epoch}")
        if self.batch_size < 1:
            raise DToPError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise DToPError(f"checkpoint {self.checkpoint} not found")
        if self.checkpoint is None and self.preset not in PRESETS:
            raise DToPError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.workdir.exists() and not self.workdir.is_dir():
            raise DToPError(f"--workdir {self.workdir} is a file: choose a folder")


@dataclass
class DemoResult:
    """The stages of a demo run and its wall time."""

    runner: StageRunner
    seconds: float

    @property
    def stages(self) -> list[Stage]:
        return self.runner.stages

    @property
    def passed(self) -> bool:
        """Every artefact met its parity contract."""
        parity = self.runner.get("parity")
        return bool(parity is not None and parity.facts.get("passed", False))

    def failures(self) -> list[str]:
        """One line per artefact that failed its parity contract."""
        parity = self.runner.get("parity")
        return list(parity.facts.get("failures", [])) if parity is not None else []

    def summary(self) -> list[str]:
        """The lines a person reads at the end: training mAP, FP16 preview, parity per engine, evaluation."""
        facts = {s.name: s.facts for s in self.stages}
        lines = []
        tr = facts.get("train", {})
        if tr.get("map_after"):
            lines.append(f"training: mAP E/M/H {format_map(tr.get('map_before'))} -> {format_map(tr.get('map_after'))}")
        au = facts.get("fp16-audit", {})
        if au:
            lines.append(
                f"FP16 preview (CPU emulation, no TensorRT here): cos min {au['cosine_min']:.6f}, "
                + ("PASS" if au.get("passed") else "FAIL (not gating: no FP16 artefact was built)")
            )
        for e in facts.get("parity", {}).get("engines", []):
            lines.append(
                f"parity {e['label']}: cos min {e['cosine_min']:.6f}, max-abs {e['max_abs']:.1e}, "
                + (e.get("verdict") or ("PASS" if e["passed"] else "FAIL"))
            )
        ev = facts.get("evaluate", {})
        if ev.get("map"):
            lines.append(f"ONNX Runtime on the sample set: mAP E/M/H {format_map(ev['map'])}")
        lines.append(f"total {self.seconds:.0f} s; summary in {self.runner.state_path}")
        return lines


def run_demo(settings: DemoSettings, reporter: Reporter | None = None) -> DemoResult:
    """Run (or reuse) every stage of the demo in ``settings.workdir``; see the module docstring."""
    settings.check()
    s = settings
    s.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = StageRunner(s.workdir, STATE_FILE, s.force, reporter)
    run.summary["machine"] = machine_info()
    say = run.reporter
    work = s.workdir
    data_root = work / "data"
    train_root = data_root / "train-sample"
    train_dir = work / "train"
    trained = train_dir / "final.pt"
    model_pt, model_onnx, plan = work / "model.pt", work / "model.onnx", work / "model.plan"
    audit_json, parity_json = work / "fp16-audit.json", work / "parity.json"
    eval_json, picture = work / "evaluation.json", work / "retrieval.png"

    @functools.cache
    def sample_set() -> RevisitopDataset:
        """The embedded evaluation set in the work folder (built by the data stage), read once."""
        from dtop_export.retrieval.datasets import resolve_dataset

        return resolve_dataset("sample", data_root)

    # 1. data ------------------------------------------------------------------------------------------
    def build_data(st: Stage) -> None:
        from dtop_export.training.sample import build_training_sample

        data_root.mkdir(exist_ok=True)
        with say.status("building the embedded evaluation and training sets"):
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
    train_key: dict[str, Any] = (
        {"checkpoint": str(s.checkpoint.resolve()), "mtime": s.checkpoint.stat().st_mtime}
        if s.checkpoint is not None
        else {
            "preset": s.preset,
            "epochs": s.epochs,
            "steps_per_epoch": s.steps_per_epoch,
            "batch_size": s.batch_size,
            **({"seed": s.seed} if s.seed else {}),  # seed 0 keeps the key (and caches) of earlier runs
        }
    )

    def build_train(st: Stage) -> None:
        from dtop_export.checkpoint import load_checkpoint

        train_dir.mkdir(exist_ok=True)
        if s.checkpoint is not None:
            load_checkpoint(s.checkpoint)  # fails early with a clear message on a bad file
            _copy(s.checkpoint, trained)
            st.status = "skipped"
            st.note = f"starting from {s.checkpoint} (copied to {trained})"
            st.facts = {"source": str(s.checkpoint)}
            return
        from dtop_export.training.config import SAMPLE_CONFIG, load_config
        from dtop_export.training.loop import Trainer
        from dtop_export.training.state import clear_run, interrupted_run

        _training_logs()
        sets = [
            f"model.preset={s.preset}",
            f"data.root={train_root}",
            f"val.root={data_root}",
            f"out_dir={train_dir}",
            f"epochs={s.epochs}",
            f"sampler.batch_size={s.batch_size}",
            f"seed={s.seed}",
            f"progress={str(s.progress).lower()}",
        ]
        if s.steps_per_epoch is not None:
            sets.append(f"max_steps_per_epoch={s.steps_per_epoch}")
        cfg = load_config(SAMPLE_CONFIG, sets)
        # an interrupted training of these settings continues; any other run there goes first (its logs got appended to)
        saved = None if s.force else interrupted_run(train_dir, cfg.to_dict(), {"progress", "out_dir", "threads"})
        if saved is None:
            clear_run(train_dir)
        else:
            say.note(continuing_line(*saved, cfg.epochs))
        trainer = Trainer(cfg, resume=train_dir if saved is not None else None)
        trainer.continue_hint = "run the same `dtop-export demo` again to continue (--force starts over)"
        result = trainer.run()
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
            f"trained {s.preset}: {result.epochs} epoch(s), {result.steps} steps, "
            f"{result.images_per_second:.1f} img/s; validation mAP E/M/H "
            f"{format_map(prov.get('initial_metrics'))} -> {format_map(prov.get('metrics'))}"
        )

    run.stage("train", train_title(s.checkpoint), [trained], build_train, train_key, _loads_checkpoint(trained))

    # 3. whiten ------------------------------------------------------------------------------------------
    def build_whiten(st: Stage) -> None:
        from dtop_export.checkpoint import load_checkpoint
        from dtop_export.training.whitening import whiten_checkpoint

        if s.checkpoint is not None and load_checkpoint(trained).whitening is not None:
            _copy(trained, model_pt)
            st.status = "skipped"
            st.note = "kept the checkpoint's own whitening"
            return
        size = sample_set().image_size or 256
        _, wh = whiten_checkpoint(trained, model_pt, pairs=train_root, size=size, progress=s.progress)
        st.facts = {
            "kind": wh.kind,
            "pairs": wh.info.get("pairs"),
            "images": wh.info.get("images"),
            "shrinkage": wh.info.get("shrinkage"),
            "condition_number": wh.info.get("condition_number"),
        }
        st.note = (
            f"learned {wh.kind} whitening {wh.info['in_dim']} -> {wh.out_dim} from {wh.info.get('pairs')} pairs "
            f"(Ledoit-Wolf shrinkage {wh.info.get('shrinkage', 0):.3f}, condition number "
            f"{wh.info.get('condition_number', 0):.0f})"
        )

    run.stage(
        "whiten",
        "learn whitening (supervised Lw)",
        [model_pt],
        build_whiten,
        {"shrinkage": "ledoit-wolf"},
        valid=_loads_checkpoint(model_pt),
    )

    # 4. onnx --------------------------------------------------------------------------------------------
    def build_onnx(st: Stage) -> None:
        from dtop_export.export import export_onnx

        with say.status("exporting") as update:
            res = export_onnx(model_pt, model_onnx, on_stage=lambda name: update(f"exporting: {name}"))
        st.facts = {"mib": round(res.size_bytes / 2**20, 1), "nodes": res.nodes, "opset": res.opset}
        st.note = (
            f"wrote {model_onnx} ({res.size_bytes / 2**20:.1f} MiB, opset {res.opset}, {res.nodes} nodes, "
            "dynamic batch/height/width, whitening folded in)"
        )

    run.stage("onnx", "export ONNX", [model_onnx], build_onnx)

    # 5. tensorrt ----------------------------------------------------------------------------------------
    def build_trt(st: Stage) -> None:
        from dtop_export.engines.tensorrt.install import unusable_reason
        from dtop_export.engines.tensorrt.profiles import make_profiles
        from dtop_export.pipeline.artefacts import build_tensorrt_fp16

        why = unusable_reason()  # the demo runs what it builds: a GPU-less TensorRT-RTX plan is not enough
        if why is not None:
            st.status, st.changed = "skipped", False
            st.note = f"TensorRT engine not built: {why}"
            if "--target" in why:
                st.note += f" (e.g. `dtop-export trt {model_onnx} --fp16 --target sm86`)"
            return
        with say.status("building the TensorRT FP16 engine (minutes)"):
            res = build_tensorrt_fp16(model_onnx, plan, make_profiles(*TRT_PROFILE))
        st.facts = {"seconds": round(res.seconds, 1), "path": str(plan)}
        st.note = f"wrote {plan} (FP16) in {res.seconds:.0f} s"

    trt_stage = run.stage("tensorrt", "TensorRT FP16 engine", [plan], build_trt)
    if trt_stage.status == "skipped":
        trt_stage.outputs = []

        # 5b. without TensorRT: the FP16 engine's accuracy, emulated on the CPU -------------------------
        def build_audit(st: Stage) -> None:
            from dtop_export.fp16.audit import fp16_audit

            with say.status("emulating TensorRT's FP16 (FP32 islands) on the CPU"):
                res = fp16_audit(model_onnx, sample_set())
            atomic_write_text(audit_json, json.dumps(res.to_dict(), indent=2, default=str) + "\n")
            say.note(res.table())
            final = res.final
            st.facts = {
                "passed": res.passed,
                "cosine_min": final.cosine_min,
                "map_delta": final.map_delta,
                "keep_fp32_nodes": res.keep_fp32_nodes,
                "failures": final.failures(),
            }
            worst = max((abs(v) for v in final.map_delta.values() if v == v), default=0.0)  # NaN: no positives
            verdict = (
                "within the FP16 contract" if res.passed else "OUTSIDE the FP16 contract (cos >= 0.999, |ΔmAP| <= 0.2)"
            )
            st.note = f"FP16 preview: cos min {final.cosine_min:.6f}, |ΔmAP| <= {worst:.2f}: {verdict}"
            if not res.passed:
                st.note += f" — {'; '.join(final.failures())}"
            if res.keep_fp32_nodes:
                st.note += f"; keep in FP32: {','.join(res.keep_fp32_nodes)}"

        run.stage("fp16-audit", "FP16 audit (TensorRT FP16 emulated on the CPU)", [audit_json], build_audit, leaf=True)

    # 6. parity ------------------------------------------------------------------------------------------
    def build_parity(st: Stage) -> None:
        from dtop_export.engines import load_engine
        from dtop_export.engines.pytorch import TorchEngine
        from dtop_export.parity import parity

        ref = TorchEngine.from_checkpoint(model_pt)
        engines = [load_engine(model_onnx)]
        if trt_stage.status in ("built", "reused") and plan.exists():
            engines.append(load_engine(plan))
        if s.fp16_emulate:
            engines.append(TorchEngine.from_checkpoint(model_pt, precision="fp16"))
        try:
            report = parity(ref, engines, sample_set(), progress=s.progress)
        finally:
            for e in engines:
                e.close()
        atomic_write_text(parity_json, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(parity_json.with_suffix(".md"), report.table() + "\n")
        say.note(report.table())
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
        {"fp16_emulate": s.fp16_emulate},
    )

    # 7. evaluate + picture -------------------------------------------------------------------------------
    def build_eval(st: Stage) -> None:
        from dtop_export.engines import load_engine
        from dtop_export.retrieval.evaluate import evaluate_dataset
        from dtop_export.retrieval.visualize import retrieval_picture

        ds = sample_set()
        captured: dict[str, Any] = {}
        with load_engine(model_onnx) as engine:
            res = evaluate_dataset(
                engine, ds, progress=s.progress, on_extract=lambda db, q: captured.update(db=db, q=q)
            )
        atomic_write_text(eval_json, json.dumps({"model": str(model_onnx), **res.to_dict()}, indent=2) + "\n")
        say.note(res.table())
        retrieval_picture(ds, captured["db"], captured["q"], picture)
        st.facts = {"map": res.map, "mp": {k: {str(n): v for n, v in d.items()} for k, d in res.mp.items()}}
        st.note = f"wrote {eval_json} and {picture} (5 queries, top-5: green correct, red wrong, orange junk)"

    run.stage("evaluate", "evaluation (ONNX Runtime) and retrieval picture", [eval_json, picture], build_eval)
    result = DemoResult(run, time.perf_counter() - t_start)
    run.summary["seconds"] = round(result.seconds, 1)
    run.save()
    return result


def train_title(checkpoint: Path | None) -> str:
    """The training stage's header: what it does, or that ``--checkpoint`` replaces it."""
    if checkpoint is None:
        return "train on the embedded training set"
    return f"training skipped: --checkpoint {checkpoint}"


def continuing_line(epoch: int, step: int, epochs: int) -> str:
    """What a re-run says when it continues an interrupted training: the 1-based epoch it goes on with (``epoch``: the
    0-based one the state was saved in, or the next after a finished one) and the step the state was saved at."""
    return f"continuing the interrupted training: epoch {min(epoch + 1, epochs)}/{epochs}, step {step}"


def _loads_checkpoint(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        from dtop_export.checkpoint import load_checkpoint

        try:
            load_checkpoint(path)
        except (DToPError, OSError):
            return False
        return True

    return check


def _training_logs() -> None:
    """Show the trainer's per-epoch lines (logger ``dtop_export.training``) without raising every library to
    INFO."""
    log = logging.getLogger("dtop_export.training")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
