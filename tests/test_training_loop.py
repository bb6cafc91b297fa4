"""The training loop on the small preset: outputs, resume == uninterrupted, validation, DDP with gloo, CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_data import BASE, make_folder, make_revisitop, train_config, train_sets
from cli_helpers import cli

from dtop_export.checkpoint import load_checkpoint
from dtop_export.errors import DToPError
from dtop_export.training.config import TrainConfig, load_config
from dtop_export.training.loop import Trainer


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 classes x 8 images, 4 aspect groups (6 images each): 4 batches of 4 per epoch
    return make_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=8)


_cfg = train_config
_cli_sets = train_sets


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_train_writes_checkpoints_state_and_logs(tmp_path: Path, folder_data: Path) -> None:
    cfg = _cfg(tmp_path / "run", folder_data, "keep_every_epoch=true", "clip_grad=1.0", "accum_steps=2")
    res = Trainer(cfg).run()
    out = tmp_path / "run"
    assert res.final == out / "final.pt" and res.steps == 4  # 4 batches / accum 2 = 2 steps x 2 epochs
    for name in ("final.pt", "last.pt", "epoch-001.pt", "epoch-002.pt", "train_state.pt", "config.yaml"):
        assert (out / name).is_file(), name
    ck = load_checkpoint(out / "final.pt")
    prov = ck.provenance
    assert prov["source"] == "train" and prov["training_set"] == "folder" and prov["training_classes"] == 3
    assert prov["epoch"] == 2 and prov["step"] == 4 and prov["config"]["sampler"]["base_size"] == 64
    assert ck.config.descriptor_dim == 256 and ck.preprocess.stride == 16
    # the weights moved away from the initialisation
    torch.manual_seed(0)
    from dtop_export.model import build_model, get_preset

    init = build_model(get_preset("small")).state_dict()
    assert not torch.equal(init["head.fc.weight"], ck.state_dict["head.fc.weight"])
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # an audit of the loop: the lr column held the next step's LR (read after the scheduler stepped); it is the
    # LR each step trained with: warm-up of 1 optimiser step (not 2 micro-batches), then cosine over 4 steps
    from dtop_export.training.optim import lr_factor

    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3 * lr_factor(s, 4, 1) for s in range(4)])
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert len(list(csv.DictReader((out / "epochs.csv").open()))) == 2
    assert load_checkpoint(out / "epoch-001.pt").provenance["epoch"] == 1


class _Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted(tmp_path: Path, folder_data: Path) -> None:
    ref = Trainer(_cfg(tmp_path / "a", folder_data)).run()
    assert ref.steps == 8

    def crash_at_5(tr: Trainer) -> None:
        if tr.global_step == 5:
            raise _Crash

    cfg = _cfg(tmp_path / "b", folder_data, "save_state_every=3")
    with pytest.raises(_Crash):
        Trainer(cfg, callbacks=[crash_at_5]).run()
    assert not (tmp_path / "b" / "final.pt").exists()
    # the last state on disk is the end of epoch 1 (step 4): steps 5.. are redone on resume
    from dtop_export.training.state import read_state

    assert read_state(tmp_path / "b")["step"] == 4
    res = Trainer(cfg, resume=tmp_path / "b").run()
    assert res.steps == 8
    a, b = _weights(tmp_path / "a" / "final.pt"), _weights(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff[:5]}"
    # the step log was cut back to the state and continued: every step once
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "b" / "log.csv").open())]
    assert steps == list(range(1, 9))


def test_resume_refuses_a_training_set_that_changed(tmp_path: Path, folder_data: Path) -> None:
    """A review of the sampler: between epochs a resume took whatever the folder held then, so an image added, removed
    or moved to another class silently changed the epochs' batches, the classes and the schedule's length. The state
    records the set; a changed one is refused in one line that says what to do; the set restored resumes."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder_data, data)
    cfg = _cfg(tmp_path / "run", data, "epochs=1", "max_steps_per_epoch=1")
    Trainer(cfg).run()
    more = _cfg(tmp_path / "run", data, "epochs=2", "max_steps_per_epoch=1")
    a, b = sorted(p for p in data.iterdir() if p.is_dir())[:2]
    moved = sorted(a.iterdir())[0]
    said = []
    for change, undo in (
        (lambda: shutil.copy(moved, b / "extra.jpg"), lambda: (b / "extra.jpg").unlink()),  # one image more
        (lambda: moved.rename(b / "moved.jpg"), lambda: (b / "moved.jpg").rename(moved)),  # same count, relabelled
    ):
        change()
        with pytest.raises(DToPError, match="cannot resume: the training set changed since the state was saved") as e:
            Trainer(more, resume=tmp_path / "run").run()
        said.append(str(e.value))
        undo()
    assert "(24 -> 25 images, 3 -> 3 classes;" in said[0] and "(24 -> 24 images, 3 -> 3 classes;" in said[1]
    assert all(f"--init {tmp_path / 'run' / 'last.pt'}`)" in m and "\n" not in m for m in said)
    assert Trainer(more, resume=tmp_path / "run").run().steps == 2  # the set as it was: resumes


def _crash_at_step_3(out: Path, data: Path) -> TrainConfig:
    """One epoch stopped by an exception at step 3, a state saved every 2 steps; its config."""

    def crash_at_3(tr: Trainer) -> None:
        if tr.global_step == 3:
            raise _Crash

    cfg = _cfg(out, data, "epochs=1", "save_state_every=2")
    with pytest.raises(_Crash):
        Trainer(cfg, callbacks=[crash_at_3]).run()
    return cfg


def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, folder_data: Path) -> None:
    ref = Trainer(_cfg(tmp_path / "a", folder_data, "epochs=1")).run()
    cfg = _crash_at_step_3(tmp_path / "b", folder_data)
    from dtop_export.training.state import read_state

    st = read_state(tmp_path / "b")
    assert (st["step"], st["sampler"]["position"], st["epoch"]) == (2, 2, 0)  # inside the epoch
    Trainer(cfg, resume=tmp_path / "b").run()
    a, b = _weights(ref.final), _weights(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.isolated
def test_ctrl_c_saves_state_and_resumes_exactly(tmp_path: Path, folder_data: Path) -> None:
    ref = Trainer(_cfg(tmp_path / "a", folder_data, "epochs=1")).run()

    def interrupt_at_3(tr: Trainer) -> None:
        if tr.global_step == 3:
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path / "b", folder_data, "epochs=1")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[interrupt_at_3]).run()
    from dtop_export.training.state import read_state

    assert read_state(tmp_path / "b")["step"] == 3
    res = Trainer(cfg, resume=tmp_path / "b").run()
    a, b = _weights(ref.final), _weights(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an audit of the loop: the epoch's loss (history, epochs.csv, the epoch line) averaged only the steps after
    # the resume; the state carries the epoch's sums so far, so it is the loss of the epoch run through
    assert res.history[0]["loss"] == ref.history[0]["loss"]
    rows = [list(csv.DictReader((tmp_path / d / "epochs.csv").open())) for d in ("a", "b")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_resume_refuses_another_world_size_before_loading(
    tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an audit of the loop: it was refused only after the model and the data had loaded (~10 s at full size)
    cfg = _cfg(tmp_path / "a", folder_data, "epochs=1", "max_steps_per_epoch=1")
    Trainer(cfg).run()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DToPError, match=r"^cannot resume: the run used 1 process\(es\), this one has 2; resume it in"):
        Trainer(cfg, resume=tmp_path / "a")  # the constructor: no process group, model or data yet


def test_resume_refuses_a_different_config(tmp_path: Path, folder_data: Path) -> None:
    cfg = _cfg(tmp_path / "a", folder_data, "epochs=1", "max_steps_per_epoch=1")
    Trainer(cfg).run()
    other = _cfg(tmp_path / "a", folder_data, "epochs=1", "max_steps_per_epoch=1", "optim.lr=0.5")
    with pytest.raises(DToPError, match=r"optim\.lr changed"):
        Trainer(other, resume=tmp_path / "a")
    with pytest.raises(DToPError, match="no training state"):
        Trainer(cfg, resume=tmp_path / "nothing")


def test_cli_resume_continues_in_its_own_folder(
    tmp_path: Path, folder_data: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An audit of the loop: `train --resume runs/a -c cfg.yaml` (the config the run started with) went on in the
    config's out_dir (the default runs/train), leaving runs/a unfinished and a second folder with half the logs;
    resuming with fewer epochs than the run had trained rewrote its final.pt; a kill -9 mid-write left the state's
    temporary file (its full size) in the folder for good."""
    import yaml

    run = tmp_path / "a"
    run.mkdir()
    stale = [run / ".train_state.pt.k2x9q1.tmp", run / ".epoch-003.pt.ab12cd.tmp"]
    for p in stale:
        p.write_bytes(b"half a state")
    (run / ".notes.tmp").write_text("not ours")
    cfg = _cfg(run, folder_data, "epochs=1", "max_steps_per_epoch=1")
    with caplog.at_level("WARNING"):
        Trainer(cfg).run()
    assert not any(p.exists() for p in stale) and (run / ".notes.tmp").exists()
    assert ".train_state.pt.k2x9q1.tmp, a file left half-written" in caplog.text
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "out_dir": str(elsewhere)}))
    assert cli("train", "-c", str(tmp_path / "cfg.yaml"), "--resume", str(run), "--epochs", "2") == 0
    assert not elsewhere.exists() and load_checkpoint(run / "final.pt").provenance["step"] == 2
    assert [r["step"] for r in csv.DictReader((run / "log.csv").open())] == ["1", "2"]
    final = (run / "final.pt").read_bytes()
    capsys.readouterr()
    assert cli("train", "--resume", str(run), "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume with epochs=1: the run has already trained 2 epoch(s)"), err
    assert (run / "final.pt").read_bytes() == final
    # `train --resume RUN` without --config maps the state for its config (a full preset's state is ~1.4 GB; the
    # trainer reads it whole): the same config, the tensors not read
    from dtop_export.training.state import read_state

    mapped, whole = read_state(run, mmap=True), read_state(run)
    assert mapped["config"] == whole["config"]
    spans = [
        tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str((run / "train_state.pt").resolve()))
    ]

    def in_file(t: torch.Tensor) -> bool:
        return any(a <= t.data_ptr() < b for a, b in spans)

    assert mapped["model"] and all(in_file(t) for t in mapped["model"].values())
    assert not any(in_file(t) for t in whole["model"].values())


def test_a_peer_lost_under_ddp_is_one_line(tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an audit of the loop: a DToPError on one torchrun process was one line there, but the other process, waiting in
    # an all-reduce, ended with gloo's 60-line traceback ("Connection closed by peer ... GLHF!")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    tr = Trainer(_cfg(tmp_path / "run", folder_data))
    gloo = "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:21387. This is typically caused"

    def lost() -> None:
        raise RuntimeError(gloo)

    monkeypatch.setattr(tr, "_run", lost)
    with pytest.raises(DToPError, match=r"^process 0 of 2 stopped: another process of the group failed first"):
        tr.run()

    def bug() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(tr, "_run", bug)
    with pytest.raises(RuntimeError, match="mat1"):  # a bug of its own keeps its traceback
        tr.run()


def test_validation_and_best_checkpoint(tmp_path: Path, folder_data: Path) -> None:
    val = make_revisitop(tmp_path / "val", "tiny")
    cfg = _cfg(tmp_path / "run", folder_data, "val.enabled=true", f"val.root={val}", "val.name=tiny", "val.size=64")
    res = Trainer(cfg).run()
    assert res.best == tmp_path / "run" / "best.pt"
    ck = load_checkpoint(res.final)
    m = ck.provenance["metrics"]
    assert {"easy", "medium", "hard"} <= set(m) and all(0 <= m[k] <= 100 for k in ("easy", "medium", "hard"))
    assert set(ck.provenance["initial_metrics"]) >= {"easy", "medium", "hard"}
    best = load_checkpoint(res.best).provenance
    assert best["best"]["metric"] == "medium"
    assert best["metrics"]["medium"] == max(h["metrics"]["medium"] for h in res.history)
    rows = list(csv.DictReader((tmp_path / "run" / "epochs.csv").open()))
    assert all(r["map_medium"] for r in rows)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(DToPError, match=r"unknown config key\(s\) optim\.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(DToPError, match="data.dataset must be one of"):
        load_config(None, ["data.dataset=imagenet"])
    with pytest.raises(DToPError, match="not a valid int"):
        load_config(None, ["epochs=two"])
    with pytest.raises(DToPError, match="contrastive needs"):
        load_config(None, ["loss.name=contrastive"])
    # an audit of the loop: a list of the wrong length was a traceback (augment.scale) or taken as is (optim.betas,
    # then AdamW's), and YAML's true/false were numbers 1/0 (epochs: true trained one epoch)
    with pytest.raises(DToPError, match=r"augment.scale must hold 2 values, got 3: \[0.5, 0.7, 0.9\]"):
        load_config(None, ["augment.scale=[0.5, 0.7, 0.9]"])
    with pytest.raises(DToPError, match=r"optim.betas must hold 2 values, got 1: \[0.9\]"):
        load_config(None, ["optim.betas=[0.9]"])
    for item in ("epochs=true", "optim.lr=false", "threads=true"):
        with pytest.raises(DToPError, match="is not a valid (int|float)"):
            load_config(None, [item])
    # an audit of the loop: an unknown key was Python's "__init__() got an unexpected keyword argument" text, once
    # the run folder was made
    with pytest.raises(DToPError, match=r"^unknown model.overrides key\(s\) descriptr_dim; valid keys: .*descriptor_"):
        load_config(None, ["model.overrides.descriptr_dim=128"])
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 1e-4\n  optimizer: adamw\nsampler:\n  aspect_ratios: [1.0, 2.0]\n")
    cfg = load_config(y, ["optim.lr=3e-4", "model.overrides.descriptor_dim=128"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.optimizer == "adamw" and cfg.sampler.aspect_ratios == (1.0, 2.0)
    assert cfg.model.overrides == {"descriptor_dim": 128}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_key_written_twice_in_the_yaml_is_refused(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys silently: a user who edits the first ``lr:`` (or a second ``optim:``
    section) changed nothing. Refused with both lines; a merge key's values may still be overridden."""
    y = tmp_path / "dup.yaml"
    y.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.05\n  lr: 2.0e-3\n")
    with pytest.raises(DToPError, match=r"dup.yaml: key 'lr' is written twice \(lines 2 and 4\); keep one"):
        load_config(y)
    y.write_text("epochs: 3\noptim:\n  lr: 1.0e-3\noptim:\n  weight_decay: 0.1\n")
    with pytest.raises(DToPError, match=r"key 'optim' is written twice \(lines 2 and 4\)"):
        load_config(y)
    y.write_text("model:\n  overrides: &o {descriptor_dim: 64}\noptim: {lr: 1.0e-3}\nval: {scales: [1.0]}\n")
    assert load_config(y).model.overrides == {"descriptor_dim": 64}
    y.write_text("model:\n  overrides:\n    <<: {descriptor_dim: 64}\n    descriptor_dim: 128\n")
    assert load_config(y).model.overrides == {"descriptor_dim": 128}


def test_config_tuples_of_the_wrong_length_are_refused() -> None:
    # augment.scale=0.5 was a ValueError traceback (lo, hi unpacked in validate), optim.betas=[0.9] passed and
    # AdamW failed on betas[1] once training started, val.scales=[] passed until the first validation
    for item, message in [
        ("augment.scale=0.5", r"augment\.scale must hold 2 values, got 1"),
        ("augment.scale=[0.1,0.5,1]", r"augment\.scale must hold 2 values, got 3"),
        ("optim.betas=[0.9]", r"optim\.betas must hold 2 values, got 1"),
        ("val.scales=[]", r"val\.scales must list at least one scale"),
    ]:
        with pytest.raises(DToPError, match=message):
            load_config(None, [item])
    cfg = load_config(None, ["augment.scale=[0.5,0.9]", "optim.betas=[0.8,0.99]", "val.scales=0.707"])
    assert cfg.augment.scale == (0.5, 0.9) and cfg.optim.betas == (0.8, 0.99) and cfg.val.scales == (0.707,)
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "train", "-s", "augment.scale=0.5", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: config key augment.scale must hold 2 values, got 1: [0.5]"


def test_cli_train_errors_are_one_line(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "dtop_export", "train"]
    r = subprocess.run([*exe, "-s", "optim.lrr=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown config key(s) optim.lrr")
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*exe, "--dataset", "gldv2", "--print-config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "dataset: gldv2" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "--lr must be > 0, got -1"),
        (["-s", "optim.lr=-1"], "optim.lr must be > 0; got -1.0"),
        (["-s", "optim.lr=nan"], "optim.lr must be > 0; got nan"),
        (["-s", "optim.weight_decay=-0.01"], "optim.weight_decay must be >= 0; got -0.01"),
        (["-s", "optim.momentum=1.5"], "optim.momentum must be in [0, 1); got 1.5"),
        (["-s", "optim.warmup_epochs=-1"], "optim.warmup_epochs must be >= 0; got -1.0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["-s", "epochs=0"], "epochs and accum_steps must be >= 1"),
        (["--batch-size", "1"], "--batch-size must be >= 2, got 1"),
        (["-s", "loss.scale=0"], "loss.scale must be > 0; got 0.0"),
        (["-s", "augment.hflip=2"], "augment.hflip must be in [0, 1]; got 2.0"),
        (["-s", "sampler.base_size=100000"], "sampler.base_size 100000 needs at least"),  # was a MemoryError
    ],
)
def test_cli_train_refuses_out_of_range_numbers_before_the_run_folder(
    tmp_path: Path, folder_data: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "runs" / "q5"
    assert cli("train", *_cli_sets(folder_data), *args, "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not out.parent.exists()


def test_decode_failures_are_reported_not_only_counted(
    tmp_path: Path, folder_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # found by a real-layouts audit: a truncated JPEG (header fine, body cut) was dropped from its batch and counted
    # in provenance only; the run's output never said so, nor which file
    import shutil

    from _training_data import write_truncated

    data = tmp_path / "data"
    shutil.copytree(folder_data, data)
    write_truncated(data / "class1" / "cut.jpg")
    with caplog.at_level("INFO"):
        Trainer(_cfg(tmp_path / "run", data, "epochs=1")).run()
    assert "cut.jpg: image file is truncated" in caplog.text and "dropped from its batch" in caplog.text
    assert "1 image(s) failed to decode so far" in caplog.text


def test_a_set_whose_images_all_fail_to_decode_is_refused(tmp_path: Path) -> None:
    # found by a real-layouts audit: every image truncated (headers fine) "trained" an epoch at loss nan, exit 0,
    # final.pt written; torch warned "Detected call of `lr_scheduler.step()` before `optimizer.step()`" meanwhile
    import warnings

    from _training_data import write_truncated

    for c in range(2):
        for k in range(4):
            write_truncated(tmp_path / "data" / f"c{c}" / f"{k}.jpg")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Detected call of `lr_scheduler")
        with pytest.raises(DToPError, match="epoch 1: no batch had two images that decode .* nothing was trained"):
            Trainer(_cfg(tmp_path / "run", tmp_path / "data", "epochs=1")).run()
    assert not (tmp_path / "run").exists()


def test_cli_train_refusing_the_data_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # found by a real-layouts audit: a missing data.root, or a set of one class (ArcFace's loss is 0 there,
    # so it used to "train" on nothing), left runs/x/config.yaml (+ image_sizes.tsv) behind
    one = make_folder(tmp_path / "one", classes=1, per_class=4)
    for root, message in [(tmp_path / "nowhere", "data.root"), (one, "only one class (class0)")]:
        out = tmp_path / "runs" / "x"
        assert cli("train", *_cli_sets(root), "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_cli_train_refusing_the_data_leaves_an_existing_folder_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # found by a data audit: in a run folder made beforehand (a SLURM script's mkdir for its logs) a refused start
    # (data.root missing, min_per_class above every class) left config.yaml and image_sizes.tsv there
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    out = tmp_path / "runs" / "x"
    out.mkdir(parents=True)
    (out / "slurm-1.out").write_text("the user's")
    for root, extra, message in [
        (tmp_path / "nowhere", [], "data.root"),
        (data, ["-s", "data.min_per_class=3"], "check data.min_per_class=3"),
    ]:
        assert cli("train", *_cli_sets(root), *extra, "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == ["slurm-1.out"]
    (out / "config.yaml").write_text("the user's own\n")  # one that was there before is not removed
    assert cli("train", *_cli_sets(tmp_path / "nowhere"), "-o", str(out)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "slurm-1.out"]


def test_the_run_folder_lists_every_skipped_file_and_why(tmp_path: Path) -> None:
    # found by a data audit: a GLDv2 download with thousands of missing or broken images said only
    # 'skipped 2375 missing' (now with one example): which ones, to download again, was nowhere
    from _training_data import write_garbage

    data = make_folder(tmp_path / "data", classes=2, per_class=4)
    bad = [write_garbage(data / "class0" / f"bad{k}.jpg") for k in range(3)]
    (data / "class1" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    Trainer(_cfg(tmp_path / "run", data, "epochs=1", "max_steps_per_epoch=1")).run()
    rows = [line.split("\t") for line in (tmp_path / "run" / "skipped_images.tsv").read_text().splitlines()]
    gone = ["missing", str(data / "class1" / "gone.jpg")]
    assert sorted(rows) == sorted([["unreadable", str(p)] for p in bad] + [gone])


def test_cli_train_refuses_a_folder_holding_a_run_unless_resume_or_force(
    tmp_path: Path, folder_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "qs"
    Trainer(_cfg(out, folder_data, "epochs=1", "max_steps_per_epoch=1", "keep_every_epoch=true")).run()
    final = (out / "final.pt").read_bytes()
    sets = _cli_sets(folder_data, "epochs=1", "max_steps_per_epoch=1")
    assert cli("train", *sets, "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run folder {out} already holds a training run (train_state.pt, last.pt, final.pt")
    assert f"--resume {out}" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "final.pt").read_bytes() == final  # not retrained
    # another run resumed into it is refused too; its own run resumes (epochs raised)
    other = tmp_path / "other"
    Trainer(_cfg(other, folder_data, "epochs=1", "max_steps_per_epoch=1")).run()
    assert cli("train", "--resume", str(other), "-o", str(out), "--epochs", "2") == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert cli("train", "--resume", str(out / "train_state.pt"), "--epochs", "2") == 0
    assert load_checkpoint(out / "final.pt").provenance["step"] == 2
    # --force trains from scratch: the old run's epoch checkpoints and log rows are gone
    assert cli("train", *sets, "-o", str(out), "--force") == 0
    assert load_checkpoint(out / "final.pt").provenance["step"] == 1
    assert not (out / "epoch-001.pt").exists() and not (out / "epoch-002.pt").exists()
    assert [r["step"] for r in csv.DictReader((out / "log.csv").open())] == ["1"]


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on CPU (gloo), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_ctrl_c_under_ddp_stops_every_process_at_one_step(tmp_path: Path, folder_data: Path) -> None:
    """An audit of the loop: under torchrun Ctrl-C saved no state (only a single-process run did), and the epoch
    loss was rank 0's shard only. Rank 0 alone gets SIGINT during step 3 (rank 1 never does: a process that gets it a
    step later is the same case): both stop after step 3, mid-epoch 2, with one state saved, and a resume under
    torchrun ends bit-identical to the run through, with the same epoch losses: those of both shards."""
    import json

    import yaml

    from dtop_export.training.state import read_state

    helper = str(Path(__file__).with_name("_ddp_train.py"))
    for name in ("ref", "cut"):  # 3 epochs of 2 steps (4 batches of 4 over 2 processes)
        cfg = _cfg(tmp_path / name, folder_data, "epochs=3")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    r = _torchrun(tmp_path, helper, str(tmp_path / "ref.yaml"), str(tmp_path / "ref.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ref.json.{k}").read_text()) for k in (0, 1)]
    for epoch, row in enumerate(ranks[0]["history"]):  # each process trains 2 batches an epoch
        mine = ranks[0]["losses"][2 * epoch : 2 * epoch + 2]
        both = mine + ranks[1]["losses"][2 * epoch : 2 * epoch + 2]
        assert row["loss"] == pytest.approx(sum(both) / 4, rel=1e-12) != pytest.approx(sum(mine) / 2, rel=1e-6)
    assert [h["loss"] for h in ranks[1]["history"]] == [h["loss"] for h in ranks[0]["history"]]

    r = _torchrun(tmp_path, helper, str(tmp_path / "cut.yaml"), str(tmp_path / "cut.json"), "0:in@3")
    assert r.returncode != 0 and not (tmp_path / "cut" / "final.pt").exists()
    said = "interrupted: every process stopped after step 3, state saved; continue with torchrun with 2 processes"
    assert r.stderr.count(said) == 2, r.stderr[-3000:]
    st = read_state(tmp_path / "cut")
    assert (st["step"], st["epoch"], st["sampler"]["position"], st["world_size"]) == (3, 1, 1, 2)
    r = _torchrun(tmp_path, "-m", "dtop_export", "train", "--resume", str(tmp_path / "cut"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(tmp_path / "ref" / "final.pt"), _weights(tmp_path / "cut" / "final.pt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    rows = [list(csv.DictReader((tmp_path / d / "epochs.csv").open())) for d in ("ref", "cut")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_ddp_two_gloo_processes_end_identical(tmp_path: Path, folder_data: Path) -> None:
    """torchrun with 2 CPU processes: each trains on its own shard; DDP keeps the replicas identical.

    Eight images of one aspect group (1:2) only fail when decoded: their two batches are empty on
    whichever process gets them, which must still join the gradient all-reduce (no hang, no divergence).
    """
    import shutil

    import yaml
    from _training_data import write_truncated

    data = tmp_path / "data"
    shutil.copytree(folder_data, data)
    for k in range(8):
        write_truncated(data / "broken" / f"{k}.jpg", (32, 64))
    cfg = _cfg(tmp_path / "ddp", data, "epochs=1", "sampler.aspect_ratios=[0.5, 0.75, 1.0, 1.333, 2.0]")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    r = _torchrun(tmp_path, "-m", "dtop_export", "train", "--config", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Grad strides do not match" not in r.stderr  # an audit of the loop: 4 lines per process, a false alarm
    prov = load_checkpoint(tmp_path / "ddp" / "final.pt").provenance
    digests = prov["ddp_rank_weight_sha256"]
    assert prov["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # 6 batches (4 good, 2 undecodable) split over 2 processes: 3 steps on a global batch of 8
    assert prov["step"] == 3 and prov["skipped_images"]["decode_failed"] == 8


def test_contrastive_on_sfm120k_tuples(tmp_path: Path) -> None:
    from _training_data import make_sfm120k

    make_sfm120k(tmp_path / "sfm")
    cfg = load_config(
        None,
        [
            *BASE,
            "data.dataset=sfm120k",
            f"data.root={tmp_path / 'sfm'}",
            f"out_dir={tmp_path / 'run'}",
            "loss.name=contrastive",
            "loss.nnum=2",
            "loss.query_size=4",
            "loss.pool_size=12",
            "sampler.batch_size=2",
            "sampler.drop_last=false",
        ],
    )
    tr = Trainer(cfg)
    res = tr.run()
    ds = tr.dataset
    assert ds.tuple_size == 4 and len(ds.q) == 4
    for q, p, negs in zip(ds.q, ds.p, ds.n):
        assert tr.ts.labels[q] == tr.ts.labels[p]
        assert len(negs) == 2 and len({tr.ts.labels[n] for n in negs} | {tr.ts.labels[q]}) == 3
    prov = load_checkpoint(res.final).provenance
    assert prov["training_set"] == "sfm120k" and prov["skipped_images"]["missing"] == 1
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert rows and all(float(r["loss"]) >= 0 for r in rows)
    # found by a real-layouts audit: more negatives than other clusters was found only after the model embedded the
    # pool, as "raise loss.pool_size" (no pool can help: one negative per cluster), with log.csv/epochs.csv left, so
    # the next try was refused as "already holds a training run"
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "run3")})
    cfg.loss.nnum = 3
    with pytest.raises(DToPError, match="loss.nnum=3 hard negatives need .* 3 clusters: lower loss.nnum to 2 or less"):
        Trainer(cfg).run()
    assert not (tmp_path / "run3").exists()


def test_cli_train_then_resume_with_more_epochs(tmp_path: Path, folder_data: Path) -> None:
    import yaml

    cfg = _cfg(tmp_path / "run", folder_data, "epochs=1", "max_steps_per_epoch=1")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    exe = [sys.executable, "-m", "dtop_export", "train"]
    r = subprocess.run([*exe, "-c", str(tmp_path / "cfg.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 1 epoch(s), 1 steps" in r.stdout and "final.pt" in r.stdout
    # no --config: the run's own config, with epochs raised
    r = subprocess.run(
        [*exe, "--resume", str(tmp_path / "run"), "--epochs", "2"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 2 epoch(s), 2 steps" in r.stdout
    assert load_checkpoint(tmp_path / "run" / "final.pt").provenance["step"] == 2


def _helper(tmp_path: Path, cfg: TrainConfig, name: str, send: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """tests/_ddp_train.py in one process (no torchrun), in a session of its own: it signals its process group."""
    import json

    import yaml

    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    helper = str(Path(__file__).with_name("_ddp_train.py"))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, helper, str(tmp_path / f"{name}.yaml"), str(out), send]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    return r, json.loads(Path(f"{out}.0").read_text()) if Path(f"{out}.0").is_file() else {}


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGUSR1", 138)])
def test_sigterm_or_sigusr1_saves_state_in_one_process(tmp_path: Path, folder_data: Path, sig: str, code: int) -> None:
    """An audit of the loop: SIGTERM (SLURM's preemption and time limit, kill, a container stop) killed the run with no
    state saved since its last save; SLURM's --signal=USR1@90 too. Both stop it as Ctrl-C does, DataLoader workers
    (signalled with it: the whole process group) staying up until the state is saved."""
    from dtop_export.training.state import read_state

    cfg = _cfg(tmp_path / "run", folder_data, "epochs=1", "data.workers=1")
    r, _ = _helper(tmp_path, cfg, "run", f"0:3:{sig}")
    assert r.returncode == code, r.stderr[-3000:]
    said = f"interrupted: {sig}: state saved at step 3; continue with dtop-export train --resume {tmp_path / 'run'}"
    assert said in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    st = read_state(tmp_path / "run")
    assert (st["step"], st["epoch"], st["sampler"]["position"]) == (3, 0, 3)


def test_a_second_sigterm_while_the_state_is_saved_is_ignored(tmp_path: Path, folder_data: Path) -> None:
    """A review: in one process the stop handlers were put back before the state was saved, so a second SIGTERM
    (docker stop then kill, SLURM's TERM after USR1) killed the run mid-write (exit -15, no state), where the README
    says a second SIGTERM is ignored."""
    from dtop_export.training.state import read_state

    cfg = _cfg(tmp_path / "run", folder_data, "epochs=1")
    r, _ = _helper(tmp_path, cfg, "run", "0:2:SIGTERM:again")
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert "interrupted: SIGTERM: state saved at step 2" in r.stderr, r.stderr[-3000:]
    assert read_state(tmp_path / "run")["step"] == 2


@pytest.mark.isolated
def test_a_signal_in_the_optimiser_step_or_the_epochs_checkpoints_resumes_exactly(
    tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit of the loop: in one process Ctrl-C raised wherever it landed. Between the optimiser step and the
    loop's record of it, the state saved held step 3's weights as step 2's (a resume trained step 3 twice); while
    the epoch's checkpoints were written, after the sampler had moved to the next epoch, it recorded that epoch as
    done (a resume skipped it). Both wait for the section's end now, then stop with its state."""
    import signal

    from dtop_export.training.state import read_state

    ref = Trainer(_cfg(tmp_path / "ref", folder_data)).run()  # 2 epochs of 4 steps

    def in_step_3(tr: Trainer) -> None:  # the next step's sync (in one process: the step's sums, unchanged)
        if tr.global_step == 2:
            sync = tr._stop.sync

            def signalled(*args: object) -> object:
                os.kill(os.getpid(), signal.SIGINT)
                return sync(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(tr._stop, "sync", signalled)

    save_ckpt = Trainer._save_ckpt

    def last_pt_signalled(tr: Trainer, name: str, *args: object, **kwargs: object) -> Path:
        if name == "last.pt" and tr.epoch == 1 and not (tr.out / "last.pt").exists():
            os.kill(os.getpid(), signal.SIGINT)
        return save_ckpt(tr, name, *args, **kwargs)  # type: ignore[arg-type]

    for name, callbacks, step in (("step", [in_step_3], 3), ("ckpt", [], 4)):
        cfg = _cfg(tmp_path / name, folder_data)
        with monkeypatch.context() as m:
            m.setattr(Trainer, "_save_ckpt", last_pt_signalled)
            with pytest.raises(KeyboardInterrupt, match="state saved"):
                Trainer(cfg, callbacks=callbacks).run()
        assert read_state(tmp_path / name)["step"] == step
        res = Trainer(cfg, resume=tmp_path / name).run()
        a, b = _weights(ref.final), _weights(res.final)
        assert res.steps == 8 and all(torch.equal(a[k], b[k]) for k in a), name
        assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]


@pytest.mark.isolated
def test_a_second_ctrl_c_in_the_optimiser_step_saves_nothing(
    tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of the loop's signals: in one process a second Ctrl-C (a plain KeyboardInterrupt, raised at once)
    landing in the optimiser step, where the first had been deferred, still saved the state of the last finished
    step's RNG and sampler position with the weights and step count of the one in progress (step 3's weights as
    step 3 at position 2: a resume trained batch 3 twice). It saves nothing now and names the last state saved."""
    import signal

    from dtop_export.training.state import read_state

    cfg = _cfg(tmp_path / "run", folder_data, "epochs=1", "save_state_every=2")
    ref = Trainer(_cfg(tmp_path / "ref", folder_data, "epochs=1", "save_state_every=2")).run()

    def twice_in_step_3(tr: Trainer) -> None:
        if tr.global_step == 2:
            sync = tr._stop.sync

            def signalled(*args: object) -> object:
                os.kill(os.getpid(), signal.SIGINT)  # the first: deferred to the step's end
                os.kill(os.getpid(), signal.SIGINT)  # the second: raises at once
                return sync(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(tr._stop, "sync", signalled)

    with pytest.raises(KeyboardInterrupt, match=r"^nothing saved; continue with .* --resume .* from step 2, the last"):
        Trainer(cfg, callbacks=[twice_in_step_3]).run()
    st = read_state(tmp_path / "run")
    assert (st["step"], st["sampler"]["position"]) == (2, 2)
    res = Trainer(cfg, resume=tmp_path / "run").run()
    a, b = _weights(ref.final), _weights(res.final)
    assert res.steps == 4 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.isolated
def test_stop_signals_ignored_by_the_parent_stay_ignored() -> None:
    """A review of the loop's signals: GroupStop took over SIGINT and SIGTERM even where the process had inherited
    them ignored (a shell script's `dtop-export train ... &` ignores SIGINT, and Python leaves it so), so a Ctrl-C
    meant for the script stopped the background run. Ignored signals stay ignored; the others stop the run."""
    import signal

    from dtop_export.training.stop import GroupStop, StopRequested

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GroupStop(group=False) as stop:
            stopped = False
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except StopRequested:  # (a KeyboardInterrupt: uncaught, it would end pytest's session)
                stopped = True
            assert not stopped and not stop.requested and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            with pytest.raises(StopRequested):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.isolated
def test_a_signal_in_validation_stops_it_and_resumes_exactly(tmp_path: Path, folder_data: Path) -> None:
    """An audit of the loop: a stop signal during validation (minutes at full size) stops it at once; the state is the
    epoch's last step, from which --resume validates again: the run ends as one run through. In the validation
    before training nothing is saved and no logs are left to refuse the next start by."""
    from dtop_export.training.state import read_state

    val = make_revisitop(tmp_path / "val", "tiny")
    sets = ("val.enabled=true", f"val.root={val}", "val.name=tiny", "val.size=64")
    ref = Trainer(_cfg(tmp_path / "ref", folder_data, *sets)).run()
    cfg = _cfg(tmp_path / "cut", folder_data, *sets)
    r, out = _helper(tmp_path, cfg, "cut", "0:val@4:SIGTERM")
    assert r.returncode == 143, r.stderr[-3000:]
    said = "interrupted: SIGTERM: stopped after step 4, state saved (the end of epoch 1: --resume validates it"
    assert said in r.stderr, r.stderr[-3000:]
    assert out["validations"] == [{"step": 0, "finished": True}, {"step": 4, "finished": False}]
    st = read_state(tmp_path / "cut")
    assert (st["step"], st["epoch"], st["sampler"]["position"], st["history"]) == (4, 0, 4, [])
    assert not (tmp_path / "cut" / "last.pt").exists()
    res = Trainer(cfg, resume=tmp_path / "cut").run()
    a, b = _weights(ref.final), _weights(res.final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(h["loss"], h["metrics"]) for h in res.history] == [(h["loss"], h["metrics"]) for h in ref.history]
    initial = load_checkpoint(ref.final).provenance["initial_metrics"]
    assert load_checkpoint(res.final).provenance["initial_metrics"] == initial

    r, out = _helper(tmp_path, _cfg(tmp_path / "first", folder_data, *sets), "first", "0:val@0:SIGTERM")
    assert r.returncode == 143 and "interrupted: SIGTERM: stopped in the validation before training" in r.stderr
    assert out["validations"] == [{"step": 0, "finished": False}]
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["config.yaml", "image_sizes.tsv"]


def test_sigterm_in_validation_under_ddp_stops_every_process_at_once(tmp_path: Path, folder_data: Path) -> None:
    """An audit of the loop: under torchrun SIGTERM killed the process it reached (no state); a signal during rank 0's
    validation took effect only after it, and a step later. SIGTERM to rank 0's process group (its DataLoader worker
    too) as epoch 2's validation starts: it stops at once, both processes save the state of the epoch's last step,
    and a torchrun --resume validates epoch 2 again and trains on to the end."""
    import yaml

    from dtop_export.training.state import read_state

    val = make_revisitop(tmp_path / "val", "tiny")
    sets = ("val.enabled=true", f"val.root={val}", "val.name=tiny", "val.size=64", "data.workers=1", "epochs=3")
    cfg = _cfg(tmp_path / "cut", folder_data, *sets)
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    helper = str(Path(__file__).with_name("_ddp_train.py"))
    r = _torchrun(tmp_path, helper, str(tmp_path / "cut.yaml"), str(tmp_path / "cut.json"), "0:val@4:SIGTERM")
    assert r.returncode != 0 and not (tmp_path / "cut" / "final.pt").exists()
    said = "every process stopped after step 4, state saved (the end of epoch 2: --resume validates it"
    assert r.stderr.count(f"interrupted: SIGTERM: {said}") == 1, r.stderr[-3000:]  # rank 0
    assert r.stderr.count(f"interrupted: {said}") == 1, r.stderr[-3000:]  # rank 1, which got no signal
    import json

    out = json.loads((tmp_path / "cut.json.0").read_text())
    assert [v["finished"] for v in out["validations"]] == [True, True, False]
    st = read_state(tmp_path / "cut")
    assert (st["step"], st["epoch"], st["sampler"]["position"], len(st["history"])) == (4, 1, 2, 1)
    r = _torchrun(tmp_path, "-m", "dtop_export", "train", "--resume", str(tmp_path / "cut"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in csv.DictReader((tmp_path / "cut" / "epochs.csv").open())] == ["2", "4", "6"]

    # mid-step, with the DataLoader worker signalled too: it must not die before the group has saved the state
    cfg = _cfg(tmp_path / "step", folder_data, "data.workers=1", "epochs=3")
    (tmp_path / "step.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    r = _torchrun(tmp_path, helper, str(tmp_path / "step.yaml"), str(tmp_path / "step.json"), "0:in@3:SIGTERM")
    said = "every process stopped after step 3, state saved; continue with torchrun"
    assert r.stderr.count(f"interrupted: SIGTERM: {said}") == 1, r.stderr[-3000:]
    assert read_state(tmp_path / "step")["step"] == 3


def test_model_init_takes_the_overrides_without_weights_and_refuses_the_others(
    tmp_path: Path, folder_data: Path
) -> None:
    """An audit of the loop: with model.init set, model.overrides (and pretrained, backbone_weights) were ignored
    without a word. The checkpoint's model is fine-tuned: overrides without weights apply, the others are refused."""
    base = Trainer(_cfg(tmp_path / "a", folder_data, "epochs=1", "max_steps_per_epoch=1")).run().final
    init = ("epochs=1", "max_steps_per_epoch=1", f"model.init={base}")
    res = Trainer(_cfg(tmp_path / "b", folder_data, *init, "model.overrides={dropout: 0.25, waveblock: false}")).run()
    config = load_checkpoint(res.final).config
    assert (config.dropout, config.waveblock) == (0.25, False) != (load_checkpoint(base).config.dropout, True)
    with pytest.raises(DToPError, match=r"^model.overrides descriptor_dim cannot change model.init's model"):
        _cfg(tmp_path / "c", folder_data, *init, "model.overrides={descriptor_dim: 64, dropout: 0.2}")
    with pytest.raises(DToPError, match=r"^model.pretrained starts a fresh model, model.init fine-tunes"):
        _cfg(tmp_path / "c", folder_data, *init, "model.pretrained=true")


def test_cli_train_exits_143_after_sigterm(
    tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    from dtop_export.errors import Interrupted

    def stopped(self: Trainer) -> None:
        raise Interrupted("SIGTERM: state saved at step 3; continue with ...", signal.SIGTERM)

    monkeypatch.setattr(Trainer, "run", stopped)
    assert cli("train", *_cli_sets(folder_data), "-o", str(tmp_path / "run")) == 143
    assert capsys.readouterr().err.endswith("interrupted: SIGTERM: state saved at step 3; continue with ...\n")


def test_a_state_from_before_small_groups_merged_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of the data audit: a run started before small aspect groups merged (its state has no
    sampler.merge_small) and resumed by the code that merges them got another list of batches for its epoch (the
    3 wide images joined a group: 4 batches, was 3), so its saved position skipped batches other than those it had
    trained on, and the schedule's step count changed; it now resumes with its groups as they were."""
    from dtop_export.training import sampler as sm
    from dtop_export.training.state import read_state

    data = make_folder(tmp_path / "data", classes=3, per_class=7)  # groups of 6, 6, 6 and 3 (wide) images
    plain = sm.GroupSizeBatchSampler.state_dict
    with monkeypatch.context() as m:  # the code before the merge
        m.setattr(sm, "merge_small_groups", lambda *a: 0)
        m.setattr(
            sm.GroupSizeBatchSampler,
            "state_dict",
            lambda s: {k: v for k, v in plain(s).items() if k not in ("merge_small", "groups")},
        )
        ref = Trainer(_cfg(tmp_path / "a", data, "epochs=1")).run()
        assert ref.steps == 3
        cfg = _crash_at_step_3(tmp_path / "b", data)
    st = read_state(tmp_path / "b")
    assert st["sampler"]["position"] == 2 and "merge_small" not in st["sampler"]
    res = Trainer(cfg, resume=tmp_path / "b").run()
    assert res.steps == 3
    a, b = _weights(ref.final), _weights(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Trainer(_cfg(tmp_path / "c", data, "epochs=1")).run().steps == 4  # a new run merges them
