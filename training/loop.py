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

Here: the :class:`Trainer`'s set-up, its state and checkpoints. Its parts: ``build`` (model, data, sampler, AMP),
``epoch`` (the epochs and steps, stopping on a signal), ``ddp`` (process group, gathers, replica check),
``run_logs`` (``log.csv``, ``epochs.csv``, TensorBoard).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtop_export.atomic import atomic_path, atomic_write_text
from dtop_export.errors import DToPError
from dtop_export.training.build import amp_settings, build_train_model, load_train_data, make_sampler
from dtop_export.training.config import TrainConfig, dump_config
from dtop_export.training.ddp import check_replicas, gather, init_process, lost_peer
from dtop_export.training.epoch import NO_PROGRESS, EpochLoop
from dtop_export.training.run_logs import RunLogs
from dtop_export.training.state import (
    RESUMABLE_CHANGES,
    SETUP_FILES,
    STATE_FORMAT,
    STATE_VERSION,
    config_changes,
    dist_info,
    previous_run,
    read_state,
    refuse_world_change,
    remove_stale_temps,
    rng_state,
    set_rng_state,
    setup_files,
    undo_setup,
)
from dtop_export.training.stop import GroupStop

log = logging.getLogger(__name__)


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


class Trainer(EpochLoop):
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
        from dtop_export.training.validate import check_val_set

        cfg.validate()
        if dist_info()[0] == 0:  # only rank 0 validates (other nodes may not have the set); torchrun stops the rest
            check_val_set(cfg.val)  # before any work: not after the training set's scan, nor at a resumed epoch's end
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
        self.skipped_decode = 0  # this process's images that failed to decode (rank 0: and those of the state)
        self.decode_failed_run = 0  # the run's, every process's: at the last epoch's end (checkpoints)
        self._boundary_rng: dict[str, Any] | None = None
        # the current epoch's loss sum, loss count, images and seconds at the last step (saved with the state, so
        # an epoch resumed mid-way reports the same loss and img/s as one run through)
        self._epoch_so_far: dict[str, float] = dict(NO_PROGRESS)
        self._saved_step: int | None = None  # the step of the last train_state.pt written or resumed from
        self._stop = GroupStop(group=self.world > 1, announce=self.rank == 0)  # Ctrl-C, SIGTERM, SIGUSR1
        self.continue_hint: str | None = None  # how to go on after an interrupt, if not --resume (the demo: itself)

    # set-up -------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _make_sampler(self, sizes: list[tuple[int, int]]) -> Any:
        return make_sampler(self.cfg, sizes, self.model.stride, self.rank, self.world, self._merge_small)

    # state ----------------------------------------------------------------------------------------------

    def save_state(self, rng: dict[str, Any] | None = None) -> Path | None:
        """Write ``train_state.pt`` atomically (collective under DDP: every rank must call it)."""
        rngs = gather(rng or rng_state(self.device), self.world)
        failed = self.decode_failures()  # the run's (a collective too)
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
            # the architecture and preprocessing: a resumed fine-tuning run needs no model.init file
            "model_config": self.model.cfg.to_dict(),
            "preprocess": self.preprocess.to_dict(),
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
            "skipped_decode": failed,
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
        # the optimiser restored the LR of the state's schedule; this run's may be longer (more --epochs: the cosine
        # re-stretched over the new total), so its next step's LR is the new schedule's (the same one otherwise)
        s = self.sched
        for g, base, factor in zip(self.opt.param_groups, s.base_lrs, s.lr_lambdas):
            g["lr"] = base * factor(s.last_epoch)
        s._last_lr = [g["lr"] for g in self.opt.param_groups]  # (what get_last_lr() reports)
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.epoch, self.global_step = int(st["epoch"]), int(st["step"])
        self._saved_step = self.global_step
        self.best = st.get("best") or self.best
        self.history = list(st.get("history") or [])
        self.initial_metrics = st.get("initial_metrics")
        self.skipped_decode = restored_decode_failures(st, self.rank)
        self._epoch_so_far = {**NO_PROGRESS, **(st.get("epoch_so_far") or {})}
        if st.get("tuples") is not None:
            self.dataset.load_tuples_state(st["tuples"])
        self._resume_sampler = st["sampler"]
        set_rng_state(st["rng"][self.rank], self.device)

    def decode_failures(self) -> int:
        """The run's images that failed to decode so far: every process's (a collective under DDP)."""
        return sum(gather(self.skipped_decode, self.world))

    # checkpoints ------------------------------------------------------------------------------------------

    def _provenance(self, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        from dtop_export.checkpoint import new_provenance

        return new_provenance(
            "train",
            training_set=self.ts.name,
            training_root=str(self.ts.root),
            training_images=len(self.ts),
            training_classes=self.ts.num_classes,
            skipped_images={**self.ts.skipped, "decode_failed": self.decode_failed_run},
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
            if self.world > 1 and lost_peer(e):  # gloo/NCCL's own traceback says only "closed by peer"
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
        self.device = init_process(self.world, self.local_rank)
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
        self.model, self.preprocess, self.init_source = build_train_model(
            cfg.model, cfg.seed, self.device, self.resume_state
        )
        self.ts, self._set_fingerprint, self.dataset = load_train_data(
            cfg, self.out, self.preprocess, self.rank, self.world, self.resume_state
        )
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
                f"{self.ts.name}: not one full batch of {cfg.sampler.batch_size}"
                f"{' tuples' if cfg.tuple_size() > 1 else ''} per process in any aspect group "
                f"({len(self.ts)} images, {self.world} process(es)); "
                "lower sampler.batch_size or set sampler.drop_last=false"
            )
        steps = [math.ceil(c / cfg.accum_steps) for c in counts]
        total_steps = sum(steps)
        warmup = round(cfg.optim.warmup_epochs * steps[0])

        self.opt = build_optimizer(self.model, self.head, cfg.optim)
        self.sched = build_scheduler(self.opt, total_steps, warmup, cfg.optim.min_lr_ratio)
        use_amp, amp_dtype = amp_settings(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_amp and amp_dtype == torch.float16 else None

        self._resume_sampler = None
        self.logs = RunLogs(self.out, enabled=self.is_main)
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
                    # after: a run stopped in that validation leaves no logs to refuse it by
                    self.logs.open(resumed, self.global_step)
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
            self.logs.close()

        extra = check_replicas(self.model, self.world)
        self.decode_failed_run = self.decode_failures()  # every process's failures
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


def restored_decode_failures(state: dict[str, Any], rank: int) -> int:
    """The decode failures a resumed process starts from: the state's count is the run's, every process's, so rank 0
    carries it and the others start from 0 (their sum, :meth:`Trainer.decode_failures`, counts it once)."""
    return int(state.get("skipped_decode", 0)) if rank == 0 else 0


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Run a training job (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume).run()
