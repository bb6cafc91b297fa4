"""Fixes from a read-only review of the training code (frozen backbone, AMP ArcFace, contrastive batch size, the
validation set, DDP's timeout, fine-tune resume, overrides on resume, the schedule on resume, the logs' epochs,
decode-failure counts, stale files). Small preset, tiny images, 1-2 steps."""

from __future__ import annotations

import csv
import shutil
import sys
import types
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _training_data import make_folder, make_revisitop, train_config, train_sets
from cli_helpers import cli

from dtop_export.checkpoint import load_checkpoint
from dtop_export.errors import DToPError
from dtop_export.training.loop import Trainer
from dtop_export.training.optim import lr_factor
from dtop_export.training.state import read_state

ONE_STEP = ("epochs=1", "max_steps_per_epoch=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 classes x 8 images, 4 aspect groups: 4 batches of 4 per epoch
    return make_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=8)


def test_a_frozen_backbone_trains_and_log_csv_counts_epochs_from_1(tmp_path: Path, data: Path) -> None:
    """The review: optim.backbone_lr_mult=0 failed at the first step (ZeroDivisionError: the logged LR was group 0's
    over its multiplier, and the backbone's group sorts first); log.csv's epoch was 0-based, epochs.csv's 1-based."""
    from dtop_export.model import build_model, get_preset

    frozen = ("epochs=1", "max_steps_per_epoch=2", "optim.backbone_lr_mult=0")
    res = Trainer(train_config(tmp_path / "run", data, *frozen)).run()
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3 * lr_factor(s, 2, 1) for s in range(2)])
    assert [r["epoch"] for r in rows] == ["1", "1"]
    assert [r["epoch"] for r in csv.DictReader((tmp_path / "run" / "epochs.csv").open())] == ["1"]
    torch.manual_seed(0)
    init = dict(build_model(get_preset("small")).named_parameters())
    trained = load_checkpoint(res.final).state_dict
    encoder = [k for k in init if k.startswith("encoder.")]
    assert encoder and all(torch.equal(init[k], trained[k]) for k in encoder)  # frozen
    assert not torch.equal(init["head.fc.weight"], trained["head.fc.weight"])  # the rest trained


def test_arcface_logits_are_fp32_under_autocast() -> None:
    """The review: under bf16 autocast F.linear ran in bf16 despite the .float() casts, so the margin and s*cos were
    bf16 too (loss 13.08 vs 13.13 in fp32 on a small example)."""
    from dtop_export.training.losses import ArcFace

    torch.manual_seed(0)
    head = ArcFace(64, 10)
    x, labels = torch.randn(8, 64), torch.randint(0, 10, (8,))
    ref_logits, ref_loss = head.logits(x, labels), head(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = head.logits(x, labels), head(x, labels)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-6)


def test_the_memory_check_counts_a_contrastive_batch_in_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review: with the contrastive loss sampler.batch_size counts tuples (cirtorch), 2 + loss.nnum images each,
    but the memory pre-check took it as images: 7x too low at nnum=5."""
    import dtop_export.memory

    seen: dict[str, Any] = {}

    def check(size: int, **kw: Any) -> None:
        seen.update(kw)
        raise DToPError("checked")

    monkeypatch.setattr(dtop_export.memory, "check_image_size", check)
    contrastive = ["-s", "data.dataset=sfm120k", "-s", "loss.name=contrastive", "-s", "loss.nnum=5"]
    assert cli("train", *contrastive, "--batch-size", "6", "-o", str(tmp_path / "run")) == 2
    assert seen["batch"] == 42 and seen["batch_option"] == "sampler.batch_size (tuples of 7 images)"
    assert cli("train", "--batch-size", "6", "-o", str(tmp_path / "run")) == 2
    assert seen["batch"] == 6 and seen["batch_option"] == "sampler.batch_size"
    assert "checked" in capsys.readouterr().err


def test_a_missing_validation_set_is_refused_before_any_work(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review: a val.root / val.name typo failed only after the training set's scan and the model's build (and
    removed the new run folder with its fresh image_sizes.tsv)."""
    val = make_revisitop(tmp_path / "val", "tiny")
    with pytest.raises(DToPError, match=r"^validation set not found: val.root .*nowhere is not a folder: set val.root"):
        nowhere = ("val.enabled=true", f"val.root={tmp_path / 'nowhere'}", "val.name=x")
        Trainer(train_config(tmp_path / "run", data, *nowhere))
    with pytest.raises(DToPError, match=r"no .*gnd_tiyn.pkl: set val.name to a set under val.root .*\(it holds tiny\)"):
        Trainer(train_config(tmp_path / "run", data, "val.enabled=true", f"val.root={val}", "val.name=tiyn"))
    out = tmp_path / "cli"
    assert cli("train", *train_sets(data, "val.enabled=true", f"val.root={val}", "val.name=tiyn"), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: validation set not found") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    Trainer(train_config(tmp_path / "run", data, "val.enabled=true", f"val.root={val}", "val.name=tiny"))  # a good one
    # only rank 0 validates: the other ranks of a multi-node run need not see the set (a review), nor check it
    with pytest.MonkeyPatch.context() as m:
        m.setenv("RANK", "1"), m.setenv("WORLD_SIZE", "2"), m.setenv("LOCAL_RANK", "1")
        assert Trainer(train_config(tmp_path / "run", data, *nowhere)).rank == 1


def test_a_validation_set_that_fails_mid_run_keeps_the_epochs_state(tmp_path: Path, data: Path) -> None:
    """The review: a validation that failed at an epoch's end lost the epoch's steps (no state saved; a new run
    folder removed), and --resume skipped the check before training, so a missing set failed only at that end."""
    val = make_revisitop(tmp_path / "val", "tiny")
    gnd = val / "tiny" / "gnd_tiny.pkl"
    validation = ("val.enabled=true", f"val.root={val}", "val.name=tiny", "val.size=64")
    cfg = train_config(tmp_path / "run", data, *ONE_STEP, *validation)

    def remove_the_set(tr: Trainer) -> None:
        gnd.rename(gnd.with_suffix(".away"))

    with pytest.raises(DToPError, match=r"the training state of epoch 1's last step was saved: fix the validation set"):
        Trainer(cfg, callbacks=[remove_the_set]).run()
    st = read_state(tmp_path / "run")
    assert (st["step"], st["epoch"], st["history"]) == (1, 0, [])
    with pytest.raises(DToPError, match="^validation set not found"):  # --resume checks it first too
        Trainer(cfg, resume=tmp_path / "run")
    gnd.with_suffix(".away").rename(gnd)
    res = Trainer(cfg, resume=tmp_path / "run").run()
    assert res.steps == 1 and set(res.history[0]["metrics"]) >= {"easy", "medium", "hard"}


def test_the_ddp_process_group_waits_hours_not_nccls_10_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review: init_process_group had NCCL's default timeout (10 min) while the other processes wait in a
    collective for rank 0's first scan of the image headers and its validations."""
    import torch.distributed as dist

    from dtop_export.training import ddp

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append({"backend": backend, **kw}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(ddp.TIMEOUT_ENV, raising=False)
    ddp.init_process(2, 0)
    monkeypatch.setenv(ddp.TIMEOUT_ENV, "90")
    ddp.init_process(2, 0)
    assert calls == [
        {"backend": "gloo", "timeout": timedelta(hours=6)},
        {"backend": "gloo", "timeout": timedelta(seconds=90)},
    ]
    monkeypatch.setenv(ddp.TIMEOUT_ENV, "soon")
    with pytest.raises(DToPError, match=r"^DTOP_EXPORT_DDP_TIMEOUT='soon' must be a number of seconds > 0"):
        ddp.init_process(2, 0)


def test_a_fine_tune_resumes_without_its_init_checkpoint(tmp_path: Path, data: Path, small_ckpt: Path) -> None:
    """The review: a fine-tuning run's --resume loaded model.init again though train_state.pt holds every weight; a
    moved init file said 'create one with dtop-export init'."""
    init = tmp_path / "init.pt"
    shutil.copy(small_ckpt, init)
    cfg = train_config(tmp_path / "run", data, *ONE_STEP, f"model.init={init}")
    Trainer(cfg).run()
    init.rename(tmp_path / "moved.pt")
    cfg.epochs = 2
    res = Trainer(cfg, resume=tmp_path / "run").run()
    prov = load_checkpoint(res.final).provenance
    assert prov["step"] == 2 and prov["backbone_init"] == f"checkpoint:{init}"
    # a state from before it recorded the architecture: the file is needed, and the line says why
    st = read_state(tmp_path / "run")
    del st["model_config"], st["_path"]
    torch.save(st, tmp_path / "run" / "train_state.pt")
    cfg.epochs = 3
    with pytest.raises(DToPError, match=r"^model.init .*init.pt not found: resuming this fine-tuning run needs it"):
        Trainer(cfg, resume=tmp_path / "run").run()


class _Recording(Trainer):
    def _restore(self, st: dict[str, Any]) -> None:
        super()._restore(st)
        self.restored_lrs = [(g["lr"], g["lr_mult"]) for g in self.opt.param_groups]


def test_resume_with_more_epochs_steps_on_the_new_schedule(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review: resuming with more --epochs ran one step at the LR the optimiser's state restored (the old
    schedule's) and then jumped to the new one; and `-s epochs.x=3` on --resume was a TypeError traceback."""
    run = tmp_path / "run"
    Trainer(train_config(run, data, "epochs=1", "max_steps_per_epoch=2")).run()  # 2 steps, warm-up 1, cosine to 0
    for bad in ("epochs.x=3", "val.scales.x=3"):
        assert cli("train", "--resume", str(run), "-s", bad) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: override '{bad}': ") and "is not a section" in err, err
        assert len(err.strip().splitlines()) == 1
    tr = _Recording(train_config(run, data, "epochs=2", "max_steps_per_epoch=2"), resume=run)
    tr.run()
    assert tr.restored_lrs == [pytest.approx((1e-3 * m * lr_factor(2, 4, 1), m)) for _, m in tr.restored_lrs]
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [1e-3 * lr_factor(s, 2, 1) for s in range(2)] + [1e-3 * lr_factor(s, 4, 1) for s in (2, 3)]
    )


def test_decode_failures_under_ddp_are_the_runs_counted_once(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: under DDP the state saved rank 0's count, every process restored it and the final sum counted it
    once per process (the epoch line showed rank 0's only). Two processes' counts, through a save and a resume."""
    from dtop_export.training import loop

    monkeypatch.setenv("WORLD_SIZE", "2")
    group = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        group.append(Trainer(train_config(tmp_path / "run", data)))
    monkeypatch.setattr(loop, "gather", lambda obj, world: [t.skipped_decode for t in group])
    group[0].skipped_decode, group[1].skipped_decode = 2, 3  # epoch 1
    saved = {"skipped_decode": group[0].decode_failures()}  # what save_state writes: the run's
    assert saved["skipped_decode"] == 5 == group[1].decode_failures()
    for t in group:  # resumed
        t.skipped_decode = loop.restored_decode_failures(saved, t.rank) + 1  # epoch 2: one more on each
    assert [t.decode_failures() for t in group] == [7, 7]


def test_force_clears_the_old_skipped_list_and_a_resume_purges_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: --force left the previous run's skipped_images.tsv (the new run writes one only when it skips a
    file); a resumed run's TensorBoard kept the events of the steps after the state beside the re-run ones."""
    from dtop_export.training.run_logs import RunLogs
    from dtop_export.training.state import clear_run

    for name in ("log.csv", "skipped_images.tsv", "image_sizes.tsv"):
        (tmp_path / name).write_text("old\n")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_sizes.tsv"]

    opened: list[dict[str, Any]] = []

    class Writer:
        def __init__(self, logdir: str, **kw: Any) -> None:
            opened.append(kw)

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logs = RunLogs(tmp_path)
    logs.open(resumed=True, step=5)
    logs.open(resumed=False, step=0)
    assert opened == [{"purge_step": 6}, {"purge_step": None}]


def test_a_resumed_run_of_the_old_0_based_log_csv_counts_every_row_from_1(tmp_path: Path) -> None:
    """A review: --resume of a run written before log.csv's epochs became 1-based kept its 0-based rows and appended
    1-based ones, two conventions in one file. The rows kept are renumbered once; a 1-based log is left as it was."""
    from dtop_export.training.run_logs import STEP_HEADER, RunLogs

    def rows(folder: Path) -> list[tuple[str, str]]:
        return [(r["epoch"], r["step"]) for r in csv.DictReader((folder / "log.csv").open())]

    for epochs, want in (
        ("0011", [("1", "1"), ("1", "2"), ("2", "3")]),
        ("1122", [("1", "1"), ("1", "2"), ("2", "3")]),
    ):
        run = tmp_path / epochs
        run.mkdir()
        (run / "log.csv").write_text(
            STEP_HEADER + "".join(f"{e},{s},1.0,0.001,5.0,1.0\n" for s, e in enumerate(epochs, 1))
        )
        logs = RunLogs(run)
        logs.open(resumed=True, step=3)
        logs.step(2, 4, 1.0, 0.001, 5.0, 1.0)
        logs.close()
        assert rows(run) == [*want, ("2", "4")]
