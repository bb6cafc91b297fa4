"""``dtop-export demo``: every artefact of a tiny-budget run exists and is valid; re-runs reuse them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_export.pipeline.stages import Reporter
from dtop_export.retrieval.visualize import COLOURS

EXE = [sys.executable, "-m", "dtop_export"]
TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--no-progress"]


class Notes(Reporter):
    """A reporter that keeps the stage headers and notes the demo prints; ``stop_at``: raise Stop at that stage."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stages: list[str] = []
        self.notes: list[str] = []
        self.stop_at = stop_at

    def stage(self, number: int, title: str) -> None:
        self.stages.append(f"[{number}] {title}")
        if number == self.stop_at:
            raise Stop

    def note(self, text: str) -> None:
        self.notes.append(text)


class Stop(Exception):
    pass


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("demo") / "work"
    r = run("demo", "--workdir", work, *TINY)
    return work, r


def _stages(work: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((work / "demo.json").read_text())["stages"]}


def test_demo_writes_every_artefact(demo_dir: tuple[Path, subprocess.CompletedProcess]) -> None:
    import onnx

    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.model import get_preset

    work, r = demo_dir
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = _stages(work)
    trt = stages["tensorrt"]
    assert list(stages) == ["data", "train", "whiten", "onnx", "tensorrt"] + (
        ["fp16-audit"] if trt["status"] == "skipped" else []
    ) + ["parity", "evaluate"]
    assert all(stages[s]["status"] == "built" for s in ("data", "train", "whiten", "onnx", "parity", "evaluate"))

    trained = load_checkpoint(work / "train" / "final.pt")
    assert trained.config == get_preset("small")
    assert stages["train"]["facts"]["steps"] == 2
    model = load_checkpoint(work / "model.pt")
    assert model.whitening is not None and model.whitening.proj.shape[0] == model.build_model().descriptor_dim

    graph = onnx.load(str(work / "model.onnx"))
    onnx.checker.check_model(graph)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["dtop.whitening"])["applied"] is True

    report = json.loads((work / "parity.json").read_text())
    assert report["passed"] is True and report["n_queries"] == 20 and report["n_images"] == 90
    ort = next(e for e in report["engines"] if e["engine"]["name"] == "onnxruntime")
    assert ort["passed"] and ort["cosine_min"] >= 0.9999 and max(abs(v) for v in ort["map_delta"].values()) <= 0.5
    assert [e["engine"]["name"] for e in report["engines"]] == (
        ["onnxruntime", "tensorrt"] if stages["tensorrt"]["status"] == "built" else ["onnxruntime"]
    )

    ev = json.loads((work / "evaluation.json").read_text())
    assert set(ev["map"]) == {"easy", "medium", "hard"} and ev["engine"]["name"] == "onnxruntime"
    # the evaluation and the parity run saw the same ONNX descriptors
    assert ev["map"] == pytest.approx(ort["map"], abs=1e-3)

    png = Image.open(work / "retrieval.png")
    assert png.format == "PNG"
    img = np.asarray(png.convert("RGB"))
    rows = (img.shape[0] - 24 - 4) // (160 + 18 + 4)
    assert rows == 5 and img.shape[1] == 6 * (160 + 4) + 4  # 5 queries, the query + top-5 each
    colours = {tuple(c) for c in img[24 + 1 :: 160 + 18 + 4, 4 + 80 :: 164][:5].reshape(-1, 3)}
    assert tuple(COLOURS["query"]) in colours
    assert colours & {tuple(COLOURS["positive"]), tuple(COLOURS["negative"]), tuple(COLOURS["junk"])}

    # TensorRT: built where a GPU and TensorRT exist; otherwise said so, and its FP16 emulated on the CPU
    assert trt["status"] in ("built", "skipped")
    if trt["status"] == "skipped":
        from dtop_export.engines.tensorrt.install import RTX, installed_flavours

        # with TensorRT-RTX (the dev extra) the note says how to build a plan for a named GPU, else what to install
        hint = "--fp16 --target sm86" if RTX in installed_flavours() else "pip install 'dtop-export[cuda12]'"
        assert "TensorRT engine not built" in trt["note"] and hint in r.stdout
        audit = json.loads((work / "fp16-audit.json").read_text())
        final = audit["runs"][-1]
        assert audit["images"] == 110 and final["finite"] and final["fp32_nodes"] > 0
        assert 0.99 < final["cosine_min"] < 1.0 and stages["fp16-audit"]["facts"]["passed"] == audit["passed"]
        assert "FP16 preview" in r.stdout
    out = r.stdout
    assert "dtop-export demo" in out and "PASS" in out and "total" in out
    assert not list(work.rglob(".*.tmp"))  # atomic writes left nothing behind


def test_demo_rerun_reuses_everything(demo_dir: tuple[Path, subprocess.CompletedProcess]) -> None:
    work, first = demo_dir
    assert first.returncode == 0
    files = [work / "train" / "final.pt", work / "model.pt", work / "model.onnx", work / "parity.json"]
    before = {p: p.stat().st_mtime_ns for p in files}
    r = run("demo", "--workdir", work, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = _stages(work)
    assert {n: s["status"] for n, s in stages.items() if n != "tensorrt"} == dict.fromkeys(
        ["data", "train", "whiten", "onnx", *(["fp16-audit"] if "fp16-audit" in stages else []), "parity", "evaluate"],
        "reused",
    )
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # the reused facts still reach the summary
    assert "PASS" in r.stdout and "mAP E/M/H" in r.stdout


def test_demo_rebuilds_from_a_given_checkpoint(
    demo_dir: tuple[Path, subprocess.CompletedProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--checkpoint replaces training; its whitening is kept; downstream stages are rebuilt, not reused. (In the
    test's process, the FP16 preview on 8 of the set's 110 images and parity + evaluation at 96 px instead of the
    set's 256: the stages are what is tested, the full-size runs are the first run's; this saves ~45 s of CI.)"""
    import dataclasses

    from dtop_export.fp16 import audit
    from dtop_export.pipeline.demo import DemoSettings, run_demo
    from dtop_export.retrieval import datasets

    work, first = demo_dir
    assert first.returncode == 0
    real_audit, real_resolve = audit.fp16_audit, datasets.resolve_dataset
    monkeypatch.setattr(
        audit, "fp16_audit", lambda onnx_path, ds: real_audit(onnx_path, ds.images[:8], image_size=ds.image_size)
    )
    monkeypatch.setattr(
        datasets, "resolve_dataset", lambda *a, **kw: dataclasses.replace(real_resolve(*a, **kw), image_size=96)
    )
    result = run_demo(DemoSettings(workdir=work, checkpoint=work / "model.pt", progress=False))
    assert result.passed
    stages = _stages(work)
    assert stages["data"]["status"] == "reused"
    assert stages["train"]["status"] == "skipped" and stages["whiten"]["status"] == "skipped"
    assert "kept the checkpoint's own whitening" in stages["whiten"]["note"]
    assert stages["onnx"]["status"] == "built" and stages["parity"]["status"] == "built"
    report = json.loads((work / "parity.json").read_text())
    assert report["passed"] and [e["engine"]["precision"] for e in report["engines"]] == ["fp32"]
    assert report["image_size"] == 96  # the patch reached the rebuilt stages


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--checkpoint", "no/such.pt"], "checkpoint no/such.pt not found"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_demo_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = run("demo", "--workdir", tmp_path / "w", *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


def test_the_training_stage_says_that_a_checkpoint_replaces_it(small_ckpt: Path, tmp_path: Path) -> None:
    """`demo --checkpoint X.pt` headed its stage 2 `train on the embedded training set`, and trained nothing (a README
    walkthrough): the header says training is skipped (stopped at that header: the stage itself is
    test_demo_rebuilds_from_a_given_checkpoint's)."""
    from dtop_export.pipeline.demo import DemoSettings, run_demo

    said = Notes(stop_at=2)
    with pytest.raises(Stop):
        run_demo(DemoSettings(workdir=tmp_path / "w", checkpoint=small_ckpt, progress=False), said)
    assert said.stages[1] == f"[2] training skipped: --checkpoint {small_ckpt}"
    # a re-run's line when it continues a training: the epoch it goes on with, 1-based, and the state's step
    from dtop_export.pipeline.demo import continuing_line

    assert continuing_line(5, 67, 15) == "continuing the interrupted training: epoch 6/15, step 67"
    assert continuing_line(15, 300, 15) == "continuing the interrupted training: epoch 15/15, step 300"


def test_demo_workdir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = run("demo", "--workdir", f)
    assert r.returncode == 2 and "is a file" in r.stderr


@pytest.mark.isolated
def test_demo_continues_an_interrupted_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the demo's training said 'continue with --resume dtop-demo/train' (demo has no --resume), and the
    demo run again trained from scratch into the same folder, its log rows appended to the old run's; now the
    line says to run the demo again, which continues the interrupted training (a README audit)."""
    from dtop_export.pipeline.demo import DemoSettings, run_demo
    from dtop_export.training import loop

    resumed: list[object] = []
    init = loop.Trainer.__init__

    def patched(self: loop.Trainer, cfg: object, resume: object = None, callbacks: object = None) -> None:
        init(self, cfg, resume=resume)
        resumed.append(resume)

        def interrupt(tr: loop.Trainer) -> None:
            if resume is None and tr.global_step == 3:  # mid-way through the second epoch
                raise KeyboardInterrupt

        self.callbacks.append(interrupt)

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop  # training is what this test is about: no whitening, export, ...

    def no_validation(*args: object, **kwargs: object) -> object:
        cfg = load_config(*args, **kwargs)
        cfg.val.enabled = False  # minutes on 2 shared cores, and not what is tested
        # no DataLoader worker forked from the test process: it holds a Ray driver (grpc threads) and ~40 native
        # threads, and after this test forked one here the first CI run of it crashed later (SIGSEGV in a subprocess
        # call of tests/test_search.py, Python's GC list corrupted); every other in-process training test has 0
        cfg.data.workers = 0
        return cfg

    from dtop_export.training import config

    load_config = config.load_config
    monkeypatch.setattr(config, "load_config", no_validation)
    monkeypatch.setattr(loop.Trainer, "__init__", patched)
    monkeypatch.setattr("dtop_export.training.whitening.whiten_checkpoint", stop)
    settings = DemoSettings(workdir=tmp_path / "w", epochs=2, steps_per_epoch=2, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        run_demo(settings, Notes())
    said = str(interrupted.value)  # the CLI's 'interrupted: ...' line
    assert "state saved at step" in said and "run the same `dtop-export demo` again to continue" in said
    assert "--resume" not in said
    again = Notes()
    with pytest.raises(Stop):
        run_demo(settings, again)
    # the re-run says that it continues (it said nothing): interrupted at step 3, in the second epoch
    assert "continuing the interrupted training: epoch 2/2, step 3" in again.notes
    train = tmp_path / "w" / "train"
    assert resumed == [None, train] and (train / "final.pt").is_file()
    steps = [int(row.split(",")[1]) for row in (train / "log.csv").read_text().splitlines()[1:]]
    epochs = [row.split(",")[0] for row in (train / "epochs.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and epochs == ["1", "2"], (steps, epochs)
