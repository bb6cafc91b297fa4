"""The training loop: DToP on a landmark set with group-size batches, ArcFace or contrastive tuples.

Single process or DDP under torchrun (NCCL on GPUs, gloo on CPU). Per epoch: train, validate (mAP on a
revisitop-layout set), write ``last.pt`` (and ``best.pt``) in the toolkit's checkpoint format plus the
training state ``train_state.pt`` that ``--resume`` continues from exactly: model, ArcFace head,
optimiser, scheduler, AMP scaler, sampler position, mined tuples and every RNG. Writes are atomic.

Output folder::

    config.yaml      the resolved config          train_state.pt  everything --resume needs
    last.pt          after every epoch             best.pt         best validation mAP so far
    final.pt         at the end                    log.csv / epochs.csv   step and epoch logs
    image_sizes.tsv  the image-size cache          skipped_images.tsv     every file skipped, and why
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtop_export.atomic import atomic_path, atomic_write_text
from dtop_export.errors import DToPError, Interrupted
from dtop_export.retrieval.metrics import format_map
from dtop_export.training.config import TrainConfig, dump_config
from dtop_export.training.state import (
    RESUMABLE_CHANGES,
    SETUP_FILES,
    STATE_FORMAT,
    STATE_VERSION,
    config_changes,
    dist_info,
    previous_run,
    read_state,
    refuse_changed_set,
    refuse_world_change,
    remove_stale_temps,
    rng_state,
    set_fingerprint,
    set_rng_state,
    setup_files,
    undo_setup,
)
from dtop_export.training.stop import GroupStop, StopRequested, ignore_stop_signals, signal_name

log = logging.getLogger(__name__)

_NO_PROGRESS = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    final: Path | None
    best: Path | None
    epochs: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    images_per_second: float = 0.0


class _TrainModule(nn.Module):
    """Model + loss in one module, so DDP synchronises the ArcFace weights with the model's."""

    def __init__(self, model: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None, tuple_size: int, margin: float
    ) -> torch.Tensor:
        from dtop_export.training.losses import contrastive_loss

        u = self.model(images)
        if self.head is not None:
            return self.head(u, labels)
        return contrastive_loss(F.normalize(u.float(), dim=-1), tuple_size, margin)


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`.

    ``resume``: a run folder or ``train_state.pt`` to continue. ``callbacks`` are called with the trainer
    after every optimiser step (after any state save) — tests use them to simulate a crash.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: str | Path | None = None,
        callbacks: list[Callable[[Trainer], None]] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.resume_state = read_state(resume) if resume is not None else None
        # a state from before small aspect groups merged (no merge_small) resumes with its groups as they were
        self._merge_small = self.resume_state is None or bool(self.resume_state["sampler"].get("merge_small"))
        if self.resume_state is not None:
            changed = [
                k for k in config_changes(self.resume_state["config"], cfg.to_dict()) if k not in RESUMABLE_CHANGES
            ]
            if changed:
                raise DToPError(
                    f"cannot resume with a different config ({', '.join(changed[:5])} changed); "
                    "resume with the run's own config (omit --config) or start a new run"
                )
            refuse_world_change(self.resume_state, dist_info()[1])
            done = int(self.resume_state["epoch"])
            if cfg.epochs < done:  # final.pt would say `epochs: N` of a run trained for more
                raise DToPError(
                    f"cannot resume with epochs={cfg.epochs}: the run has already trained {done} epoch(s); "
                    f"raise --epochs above {done} to train on, or use its last.pt / epoch-NNN.pt as they are"
                )
        self.callbacks = callbacks or []
        self.out = Path(cfg.out_dir)
        self.rank, self.world, self.local_rank = dist_info()
        self.global_step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"value": -1.0, "epoch": None}
        self.initial_metrics: dict[str, Any] | None = None
        self.skipped_decode = 0
        self._boundary_rng: dict[str, Any] | None = None
        # the current epoch's loss sum, loss count, images and seconds at the last step (saved with the state, so
        # an epoch resumed mid-way reports the same loss and img/s as one run through)
        self._epoch_so_far: dict[str, float] = dict(_NO_PROGRESS)
        self._saved_step: int | None = None  # the step of the last train_state.pt written or resumed from
        self._stop = GroupStop(group=self.world > 1, announce=self.rank == 0)  # Ctrl-C, SIGTERM, SIGUSR1
        self.continue_hint: str | None = None  # how to go on after an interrupt, if not --resume (the demo: itself)

    # set-up -------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_dist(self) -> None:
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")

    def _amp(self) -> tuple[bool, torch.dtype]:
        amp = self.cfg.amp
        if amp == "none":
            return False, torch.float32
        if amp == "auto":
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return True, torch.float16
            return True, torch.bfloat16
        return True, torch.bfloat16 if amp == "bf16" else torch.float16

    def _build_model(self) -> None:
        from dtop_export.checkpoint import load_checkpoint
        from dtop_export.model import build_model, get_preset
        from dtop_export.preprocess import default_preprocess

        m = self.cfg.model
        torch.manual_seed(self.cfg.seed)
        if m.init:
            ckpt = load_checkpoint(m.init)
            if m.overrides:  # those without weights (config.INIT_OVERRIDES): dropout, WaveBlock, head BN at inference
                ckpt = replace(ckpt, config=ckpt.config.replace(**m.overrides))
            self.model = ckpt.build_model()
            self.preprocess = ckpt.preprocess
            self.init_source = f"checkpoint:{m.init}"
        else:
            mcfg = get_preset(m.preset)
            if m.overrides:
                try:
                    mcfg = mcfg.replace(**m.overrides)
                except TypeError as e:
                    raise DToPError(f"model.overrides: {e}") from None
            self.model = build_model(mcfg, pretrained=m.pretrained, backbone_weights=m.backbone_weights)
            self.preprocess = default_preprocess(mcfg.backbone, self.model.stride)
            self.init_source = (
                "pretrained"
                if m.pretrained
                else (f"backbone-weights:{m.backbone_weights}" if m.backbone_weights else "random-init")
            )
        self.model.to(self.device).train()

    def _load_data(self) -> None:
        from dtop_export.training.datasets import load_train_set
        from dtop_export.training.scan import write_skipped_files
        from dtop_export.training.transforms import Augment, ImageDataset

        cache = self.out / "image_sizes.tsv"
        if self.world > 1 and not self.is_main:
            dist.barrier()  # let rank 0 scan the images and write the size cache first
        self.ts = load_train_set(
            self.cfg.data, size_cache=cache if self.is_main else (cache if cache.exists() else None)
        )
        if self.world > 1 and self.is_main:
            dist.barrier()
        self._set_fingerprint = set_fingerprint(self.ts)
        if self.resume_state is not None:
            refuse_changed_set(self.resume_state, self._set_fingerprint, self.out)
        a = self.cfg.augment
        aug = Augment(tuple(a.scale), a.hflip, a.brightness, a.contrast, a.saturation, train=True)
        if self.cfg.loss.name == "contrastive":
            from dtop_export.training.tuples import TupleDataset

            self.dataset = TupleDataset(self.ts, self.preprocess.mean, self.preprocess.std, aug)
        else:
            self.dataset = ImageDataset(self.ts, self.preprocess.mean, self.preprocess.std, aug)
        if self.is_main:
            log.info("%s", self.ts.summary())
            if self.ts.skipped_files:  # every one, with its reason (the warning named one per reason)
                write_skipped_files(self.out / "skipped_images.tsv", self.ts.skipped_files)
                log.info("skipped files and why: %s", self.out / "skipped_images.tsv")

    def _make_sampler(self, sizes: list[tuple[int, int]]) -> Any:
        from dtop_export.training.sampler import GroupSizeBatchSampler

        s = self.cfg.sampler
        sampler = GroupSizeBatchSampler(
            sizes,
            s.batch_size,
            self.model.stride,
            s.base_size,
            s.aspect_ratios,
            seed=self.cfg.seed,
            rank=self.rank,
            world_size=self.world,
            drop_last=s.drop_last,
            merge_small=self._merge_small,
        )
        sampler.max_batches = self.cfg.max_steps_per_epoch and self.cfg.max_steps_per_epoch * self.cfg.accum_steps
        return sampler

    # state ----------------------------------------------------------------------------------------------

    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def save_state(self, rng: dict[str, Any] | None = None) -> Path | None:
        """Write ``train_state.pt`` atomically (collective under DDP: every rank must call it)."""
        rngs = self._gather(rng or rng_state(self.device))
        if not self.is_main:
            self._saved_step = self.global_step
            return None
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "world_size": self.world,
            "epoch": self.epoch,
            "step": self.global_step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "head": None if self.head is None else {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "best": self.best,
            "history": self.history,
            "initial_metrics": self.initial_metrics,
            "tuples": getattr(self.dataset, "tuples_state", lambda: None)(),
            "skipped_decode": self.skipped_decode,
            "epoch_so_far": dict(self._epoch_so_far),
            "data": self._set_fingerprint,
        }
        path = self.out / "train_state.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        self._saved_step = self.global_step
        return path

    def _restore(self, st: dict[str, Any]) -> None:
        from dtop_export.checkpoint import load_state_dict_checked

        load_state_dict_checked(self.model, st["model"], Path(st["_path"]))
        if self.head is not None and st["head"] is not None:
            self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.epoch, self.global_step = int(st["epoch"]), int(st["step"])
        self._saved_step = self.global_step
        self.best = st.get("best") or self.best
        self.history = list(st.get("history") or [])
        self.initial_metrics = st.get("initial_metrics")
        self.skipped_decode = int(st.get("skipped_decode", 0))
        self._epoch_so_far = {**_NO_PROGRESS, **(st.get("epoch_so_far") or {})}
        if st.get("tuples") is not None:
            self.dataset.load_tuples_state(st["tuples"])
        self._resume_sampler = st["sampler"]
        set_rng_state(st["rng"][self.rank], self.device)

    # checkpoints ------------------------------------------------------------------------------------------

    def _provenance(self, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        from dtop_export.checkpoint import new_provenance

        return new_provenance(
            "train",
            training_set=self.ts.name,
            training_root=str(self.ts.root),
            training_images=len(self.ts),
            training_classes=self.ts.num_classes,
            skipped_images={**self.ts.skipped, "decode_failed": self.skipped_decode},
            epoch=self.epoch,
            step=self.global_step,
            metrics=metrics,
            initial_metrics=self.initial_metrics,
            config=self.cfg.to_dict(),
            backbone_init=self.init_source,
            world_size=self.world,
            **extra,
        )

    def _save_ckpt(self, name: str, metrics: dict[str, Any], **extra: Any) -> Path:
        from dtop_export.checkpoint import save_checkpoint

        return save_checkpoint(
            self.out / name, self.model, self.preprocess, provenance=self._provenance(metrics, **extra)
        )

    # validation -------------------------------------------------------------------------------------------

    def embed_paths(self, paths: list[str], size: int) -> torch.Tensor:
        """Descriptors of ``paths`` with the current model, shared over the DDP group (hard-negative mining);
        unreadable images count as skipped and get a zero descriptor."""
        from dtop_export.training.embed import embed_paths_distributed

        d, failed = embed_paths_distributed(
            self.model, paths, self.preprocess, size, self.device, world=self.world, rank=self.rank
        )
        self.skipped_decode += failed
        return d

    def validate(self) -> dict[str, Any]:
        """mAP (E/M/H) on the validation set; empty when disabled or unavailable (rank 0 only)."""
        if not self.cfg.val.enabled:
            return {}
        from dtop_export.training.validate import validate

        return validate(self.model, self.preprocess, self.cfg.val, self.device, progress=self.cfg.progress)

    # logs ------------------------------------------------------------------------------------------------

    def _open_logs(self, resumed: bool) -> None:
        self._tb = None
        if not self.is_main:
            return
        self._log_path = self.out / "log.csv"
        self._epoch_log = self.out / "epochs.csv"
        if resumed:
            for p in (self._log_path, self._epoch_log):
                if p.is_file():  # drop rows written after the state we resume from
                    rows = list(csv.reader(p.read_text().splitlines()))
                    keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[1])) <= self.global_step]
                    atomic_write_text(p, "".join(",".join(r) + "\n" for r in keep))
        if not self._log_path.is_file():
            atomic_write_text(self._log_path, "epoch,step,loss,lr,images_per_s,seconds\n")
        if not self._epoch_log.is_file():
            atomic_write_text(self._epoch_log, "epoch,step,loss,map_easy,map_medium,map_hard,images_per_s,seconds\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        except (ImportError, ModuleNotFoundError):
            self._tb = None

    def _log_step(self, loss: float, lr: float, ips: float, secs: float) -> None:
        if not self.is_main:
            return
        with open(self._log_path, "a") as fh:
            fh.write(f"{self.epoch},{self.global_step},{loss:.6f},{lr:.6g},{ips:.2f},{secs:.2f}\n")
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, self.global_step)
            self._tb.add_scalar("train/lr", lr, self.global_step)
            self._tb.add_scalar("train/images_per_s", ips, self.global_step)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        m = row.get("metrics", {})
        cells = [row["epoch"], row["step"], f"{row['loss']:.6f}"]
        cells += [f"{m[k]:.2f}" if k in m else "" for k in ("easy", "medium", "hard")]
        cells += [f"{row['images_per_s']:.2f}", f"{row['seconds']:.1f}"]
        with open(self._epoch_log, "a") as fh:
            fh.write(",".join(str(c) for c in cells) + "\n")
        if self._tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"val/map_{k}", v, self.global_step)

    # the run ---------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train; returns where the checkpoints are. Leaves the process group as it found it."""
        own_group = self.world > 1 and not dist.is_initialized()
        self._made_out = self.is_main and not self.out.exists()
        before = setup_files(self.out) if self.is_main else set(SETUP_FILES)
        try:
            return self._run()
        except DToPError:
            # a refused run (data, config) leaves no half-made run folder: one this run created, with no checkpoint
            if self._made_out and self.out.is_dir() and not any(p.suffix == ".pt" for p in previous_run(self.out)):
                import shutil

                shutil.rmtree(self.out, ignore_errors=True)
            undo_setup(self.out, before)  # nor its config.yaml / size cache in a folder that was there before
            raise
        except RuntimeError as e:
            if self.world > 1 and _lost_peer(e):  # gloo/NCCL's own traceback says only "closed by peer"
                raise DToPError(
                    f"process {self.rank} of {self.world} stopped: another process of the group failed first "
                    "(its error is above)"
                ) from e
            raise
        finally:
            if own_group and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> TrainResult:
        from dtop_export.training.losses import ArcFace
        from dtop_export.training.optim import build_optimizer, build_scheduler
        from dtop_export.training.progress import TrainBar

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._setup_dist()
        if self.is_main:
            if self.out.exists() and not self.out.is_dir():
                raise DToPError(f"run folder {self.out} is a file: choose another out_dir (-o)")
            self.out.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temps(self.out):
                log.warning("removed %s, a file left half-written by an earlier run that was killed", p.name)
            atomic_write_text(self.out / "config.yaml", dump_config(cfg))
        if self.world > 1:
            dist.barrier()
        random.seed(cfg.seed)
        self._build_model()
        self._load_data()
        self.head = None
        if cfg.loss.name == "arcface":
            if self.ts.num_classes < 2:
                raise DToPError(
                    f"{self.ts.name}: only one class ({self.ts.class_names[0]}); ArcFace learns nothing from one "
                    "(its loss is 0): give data.root a set with two or more classes"
                )
            torch.manual_seed(cfg.seed + 1)
            self.head = ArcFace(self.model.descriptor_dim, self.ts.num_classes, cfg.loss.scale, cfg.loss.margin)
            self.head.to(self.device)
        # dropout / WaveBlock draws differ per process
        torch.manual_seed(cfg.seed + 1000 * (self.rank + 1))

        if cfg.loss.name == "contrastive":
            # queries are chosen per epoch without the model: every epoch's batch count is known up front
            self.dataset.configure(cfg.loss.nnum, cfg.loss.query_size, cfg.loss.pool_size, cfg.seed)
            counts = [len(self._make_sampler(self.dataset.select(e))) for e in range(cfg.epochs)]
            self.sampler = None
        else:
            self.sampler = self._make_sampler(self.ts.sizes)
            counts = [len(self.sampler)] * cfg.epochs
        if min(counts) == 0:
            raise DToPError(
                f"{self.ts.name}: not one full batch of {cfg.sampler.batch_size} per process in any aspect group "
                f"({len(self.ts)} images, {self.world} process(es)); "
                "lower sampler.batch_size or set sampler.drop_last=false"
            )
        steps = [math.ceil(c / cfg.accum_steps) for c in counts]
        total_steps = sum(steps)
        warmup = round(cfg.optim.warmup_epochs * steps[0])

        self.opt = build_optimizer(self.model, self.head, cfg.optim)
        self.sched = build_scheduler(self.opt, total_steps, warmup, cfg.optim.min_lr_ratio)
        use_amp, amp_dtype = self._amp()
        self.scaler = torch.amp.GradScaler(self.device.type) if use_amp and amp_dtype == torch.float16 else None

        self._resume_sampler = None
        self._tb = None
        if self.resume_state is not None:
            self._restore(self.resume_state)
            self.resume_state = None
        resumed = self._resume_sampler is not None

        module: nn.Module = _TrainModule(self.model, self.head)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.module = module

        bar = TrainBar(enabled=cfg.progress and self.is_main)
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        self._totals = [0, 0.0]  # images, seconds trained by this run
        start_epoch = self.epoch
        try:
            with self._stop:
                try:
                    self._validate_first(resumed)
                    self._open_logs(resumed)  # after: a run stopped in that validation leaves no logs to refuse it by
                    self._epochs(start_epoch, bar, loader_gen, use_amp, amp_dtype)
                except KeyboardInterrupt as e:
                    bar.close()
                    # the stop handlers stay while the state is saved: a second SIGTERM/SIGUSR1 is ignored (docker
                    # stop, SLURM's TERM after USR1), a second Ctrl-C stops the save
                    with self._stop.deferred():
                        said = self._interrupted(e)
                    if said is e:
                        raise
                    raise said from e
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()

        extra = self._check_replicas()
        self.skipped_decode = sum(self._gather(self.skipped_decode))  # every process's failures
        final = (
            self._save_ckpt("final.pt", self.history[-1]["metrics"] if self.history else {}, **extra)
            if self.is_main
            else None
        )
        if self.world > 1:
            dist.barrier()
        best = self.out / "best.pt"
        return TrainResult(
            out_dir=self.out,
            final=final,
            best=best if best.is_file() else None,
            epochs=cfg.epochs,
            steps=self.global_step,
            history=self.history,
            images_per_second=self._totals[0] / self._totals[1] if self._totals[1] else 0.0,
        )

    def _epochs(self, start: int, bar: Any, loader_gen: torch.Generator, use_amp: bool, amp_dtype: torch.dtype) -> None:
        cfg = self.cfg
        for epoch in range(start, cfg.epochs):
            self.epoch = epoch
            position = 0
            restored = self._resume_sampler is not None
            resumed_here = restored and int(self._resume_sampler["epoch"]) == epoch
            if resumed_here:
                position = int(self._resume_sampler["position"])
            if cfg.loss.name == "contrastive":
                if not (restored and self.dataset.epoch == epoch):
                    self.dataset.select(epoch)
                    dist_ = self.dataset.mine(partial(self.embed_paths, size=cfg.sampler.base_size))
                    if self.is_main:
                        log.info("epoch %d: mined hard negatives (mean distance %.3f)", epoch + 1, dist_)
                self.sampler = self._make_sampler(self.dataset.query_sizes())
            if resumed_here:  # refuses a set whose aspect groups changed since the state
                self.sampler.load_state_dict(self._resume_sampler)
            self._resume_sampler = None
            self.sampler.set_epoch(epoch, position)
            n_img, secs, loss_avg = self._train_epoch(epoch, position, bar, loader_gen, use_amp, amp_dtype)
            if position == 0 and math.isnan(loss_avg):  # the group's loss: not one usable batch on any process
                raise DToPError(
                    f"epoch {epoch + 1}: no batch had two images that decode ({self.skipped_decode} failed to):"
                    f" the images of data.root {self.cfg.data.root} are unreadable; nothing was trained"
                )
            self._totals[0] += n_img
            self._totals[1] += secs
            if self._stop.agreed:  # asked at the epoch's last step: its state, before validation and checkpoints
                self.save_state(self._boundary_rng)
                raise self._stopped(self._epoch_note(epoch))
            self._end_epoch(epoch, loss_avg, n_img, secs)
            if self._stop.agreed:  # asked while _end_epoch wrote the checkpoints: the state it wrote is the one
                raise self._stopped()

    def _stopped(self, note: str = "") -> KeyboardInterrupt:
        """After the run (under DDP: the group) agreed to stop and the state was saved: what the CLI says."""
        who = "every process stopped" if self.world > 1 else "stopped"
        return self._said(f"{who} after step {self.global_step}, state saved{note}; {self._resume_hint()}")

    def _epoch_note(self, epoch: int) -> str:
        what = "validates it and writes its checkpoints" if self.cfg.val.enabled else "writes its checkpoints"
        return f" (the end of epoch {epoch + 1}: --resume {what})"

    def _said(self, text: str) -> Interrupted:
        """``text`` as the CLI says it: naming the signal unless Ctrl-C; the exit code is 128 + the signal's."""
        by = "" if self._stop.signum == signal.SIGINT else f"{signal_name(self._stop.signum)}: "
        return Interrupted(by + text, self._stop.signum)

    def _validate_first(self, resumed: bool) -> None:
        """The mAP before training (rank 0), which a signal stops at once; then the group agrees whether to stop."""
        if self.is_main and not resumed and self.cfg.val.enabled and self.initial_metrics is None:
            with contextlib.suppress(StopRequested), self._stop.raising():
                self.initial_metrics = self.validate()
                if self.initial_metrics:
                    log.info("mAP before training: %s", format_map(self.initial_metrics) + " (E/M/H)")
        if self._stop.agree(self.device):  # (under DDP, the others wait here for rank 0's validation)
            raise self._said("stopped in the validation before training: nothing was trained; start the run again")

    def _validate_epoch(self, epoch: int) -> dict[str, Any]:
        """Rank 0's validation at the end of an epoch, which a signal stops at once (it can take minutes; torchrun
        and SLURM kill 30 s after their signal); then the group agrees whether to stop. If so, every process saves
        the state of the epoch's last step, from which a --resume validates again and writes the epoch's
        checkpoints."""
        metrics: dict[str, Any] = {}
        if self.is_main:
            with contextlib.suppress(StopRequested), self._stop.raising():
                metrics = self.validate()
        if self._stop.agree(self.device):
            self.sampler.position = self._boundary_position
            self.save_state(self._boundary_rng)
            raise self._stopped(self._epoch_note(epoch))
        return metrics

    def _resume_hint(self) -> str:
        if self.continue_hint:
            return self.continue_hint
        how = "dtop-export train" if self.world == 1 else f"torchrun with {self.world} processes"
        return f"continue with {how} --resume {self.out}"

    def _interrupted(self, e: KeyboardInterrupt) -> KeyboardInterrupt:
        """Ctrl-C, as the CLI reports it: in one process, save the state of the last finished step; under DDP
        (unless the group agreed on a step and saved it), say which saved state a --resume continues from."""
        if isinstance(e, Interrupted):
            return e
        # a plain KeyboardInterrupt after a first signal is the second Ctrl-C (stop.py): it may land between the
        # optimiser step and the loop's record of it, where the boundary state no longer matches the weights
        second = self._stop.requested and not isinstance(e, StopRequested)
        if self.world == 1 and not second and self._boundary_rng is not None and self.sampler is not None:
            self.sampler.position = self._boundary_position
            self.save_state(self._boundary_rng)
            return self._said(f"state saved at step {self.global_step}; {self._resume_hint()}")
        if self._saved_step is None:
            return self._said("no training state was saved yet")
        before = " before the processes agreed on a step" if self.world > 1 else ""
        return self._said(
            f"nothing saved{before}; {self._resume_hint()} from step {self._saved_step}, the last state saved"
        )

    def _train_epoch(
        self, epoch: int, position: int, bar: Any, loader_gen: torch.Generator, use_amp: bool, amp_dtype: torch.dtype
    ) -> tuple[int, float, float]:
        from torch.utils.data import DataLoader

        from dtop_export.training.transforms import collate

        cfg = self.cfg
        accum = cfg.accum_steps
        n_batches = len(self.sampler)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=cfg.data.workers,
            collate_fn=getattr(self.dataset, "collate", collate),
            generator=loader_gen,
            persistent_workers=False,
            # the trainer decides when to stop (stop.py); Ctrl-C ends a worker quietly in one process
            worker_init_fn=partial(ignore_stop_signals, sigint=self.world > 1),
        )
        self.module.train()
        self.opt.zero_grad(set_to_none=True)
        bar.start_epoch(epoch, cfg.epochs, math.ceil(n_batches / accum), done=position // accum)
        self._boundary_rng, self._boundary_position = rng_state(self.device), position
        so_far = self._epoch_so_far if position else _NO_PROGRESS  # a resumed epoch goes on with its sums
        t_epoch = time.perf_counter() - so_far["seconds"]
        t_step = time.perf_counter()
        images_step, images_epoch = 0, int(so_far["images"])
        loss_sum, loss_n, step_loss, step_parts = float(so_far["loss_sum"]), int(so_far["loss_n"]), 0.0, 0
        backward_done = False
        tuple_size = getattr(self.dataset, "tuple_size", 1)
        pos = position
        for batch in loader:
            self.skipped_decode += batch["failed"]
            pos += 1
            last_in_step = pos % accum == 0 or pos == n_batches
            images = batch["images"]
            usable = images is not None and images.shape[0] >= 2
            weight = 1.0
            if not usable and self.world > 1:
                # every process must join the gradient all-reduce: a zero-weighted dummy batch
                n = max(2, tuple_size)
                s = self.model.stride
                images = torch.zeros(n, 3, 2 * s, 2 * s)
                batch["labels"] = torch.zeros(n, dtype=torch.long) if self.head is not None else None
                usable, weight = True, 0.0
            if usable:
                images = images.to(self.device, non_blocking=True)
                labels = batch["labels"].to(self.device) if batch["labels"] is not None else None
                sync = self.world == 1 or last_in_step
                ctx = self.module.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                        loss = self.module(images, labels, tuple_size, cfg.loss.contrastive_margin)
                    parts = (
                        accum if pos <= n_batches - n_batches % accum or n_batches % accum == 0 else n_batches % accum
                    )
                    scaled = loss.float() * (weight / parts)
                    with warnings.catch_warnings():
                        # DDP compares a 1x1 conv's grad strides over its size-1 dims too: same layout, no cost
                        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    backward_done = True
                if weight:
                    step_loss += float(loss.detach())
                    step_parts += 1
                    images_step += images.shape[0]
            self.sampler.advance()
            if not last_in_step:
                continue
            # the optimiser step until the loop has recorded it: a signal waits for its end (stop.py)
            with self._stop.deferred():
                if backward_done:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.opt)
                    if cfg.clip_grad > 0:
                        params = [p for g in self.opt.param_groups for p in g["params"]]
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    if self.scaler is not None:
                        self.scaler.step(self.opt)
                        self.scaler.update()
                    else:
                        self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                lr = self.opt.param_groups[0]["lr"] / self.opt.param_groups[0].get("lr_mult", 1.0)  # this step's
                with warnings.catch_warnings():  # a step whose images all failed to decode has no optimiser step
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
                    self.sched.step()  # the schedule advances anyway: a function of the step (resume, DDP)
                self.global_step += 1
                # under DDP: the group's loss and images (logs, the epoch's loss) and whether any process got Ctrl-C
                step_loss, step_parts, images_step = self._stop.sync(step_loss, step_parts, images_step, self.device)
                now = time.perf_counter()
                dt = now - t_step
                t_step = now
                ips = images_step / dt if dt > 0 else 0.0
                avg = step_loss / step_parts if step_parts else float("nan")
                loss_sum += step_loss
                loss_n += step_parts
                images_epoch += images_step
                bar.update(avg, lr, ips)
                if self.global_step % max(1, cfg.log_every) == 0 or pos == n_batches:
                    self._log_step(avg, lr, ips, now - t_epoch)
                step_loss, step_parts, images_step, backward_done = 0.0, 0, 0, False
                self._boundary_rng, self._boundary_position = rng_state(self.device), pos
                self._epoch_so_far = {
                    "loss_sum": loss_sum,
                    "loss_n": loss_n,
                    "images": images_epoch,
                    "seconds": now - t_epoch,
                }
            if self._stop.agreed and pos < n_batches:  # (at the epoch's last step: in _epochs)
                self.save_state(self._boundary_rng)
                raise self._stopped()
            if cfg.save_state_every and self.global_step % cfg.save_state_every == 0 and pos < n_batches:
                self.save_state(self._boundary_rng)
            for cb in self.callbacks:
                cb(self)
        bar.close()
        secs = time.perf_counter() - t_epoch
        return images_epoch, secs, (loss_sum / loss_n if loss_n else float("nan"))

    def _end_epoch(self, epoch: int, loss: float, n_img: int, secs: float) -> None:
        metrics = self._validate_epoch(epoch)
        with self._stop.deferred():  # the epoch's logs, checkpoints and state, whole (a signal: after them)
            self._write_epoch(epoch, loss, n_img, secs, metrics)

    def _write_epoch(self, epoch: int, loss: float, n_img: int, secs: float, metrics: dict[str, Any]) -> None:
        row = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "loss": loss,
            "metrics": metrics,
            "images_per_s": n_img / secs if secs else 0.0,
            "seconds": secs,
        }
        self.history.append(row)
        self._log_epoch(row)
        # the sampler has finished this epoch: a resume starts the next one
        self.epoch = epoch + 1
        self.sampler.set_epoch(epoch + 1, 0)
        self._epoch_so_far = dict(_NO_PROGRESS)
        if self.is_main:
            self._save_ckpt("last.pt", metrics)
            if self.cfg.keep_every_epoch:
                self._save_ckpt(f"epoch-{epoch + 1:03d}.pt", metrics)
            key = self.cfg.val.metric
            if metrics and key in metrics and metrics[key] > self.best["value"]:
                self.best = {"value": float(metrics[key]), "epoch": epoch + 1, "metric": key}
                self._save_ckpt("best.pt", metrics, best=self.best)
            msg = f"epoch {epoch + 1}/{self.cfg.epochs}: loss {loss:.4f}, {row['images_per_s']:.1f} img/s"
            if metrics:
                msg += f", mAP {format_map(metrics)} (E/M/H)"
            if self.skipped_decode:  # counted in provenance.skipped_images too; a user should not have to look
                msg += f"; {self.skipped_decode} image(s) failed to decode so far, dropped from their batches"
            log.info("%s", msg)
        self.save_state(rng_state(self.device))
        self._boundary_rng = None  # the state just written is the one to resume from until the next step
        if self.world > 1:
            dist.barrier()

    def _check_replicas(self) -> dict[str, Any]:
        """Under DDP: every process's weights must be bit-identical at the end (recorded in provenance)."""
        if self.world == 1:
            return {}
        # batch-norm running stats are updated after DDP's per-forward broadcast: take rank 0's
        for b in self.model.buffers():
            dist.broadcast(b.data, 0)
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests = self._gather(h.hexdigest())
        if len(set(digests)) != 1:
            raise DToPError(f"DDP replicas diverged: weight digests differ across ranks {digests}")
        return {"ddp_rank_weight_sha256": digests}


def _lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group went away (it exited on its own error)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        m in text for m in ("closed by peer", "reset by peer", "broken pipe", "communicator was aborted")
    )


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Run a training job (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume).run()
