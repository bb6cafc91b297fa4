"""The Trainer's epochs: each epoch's batches through the model (AMP, gradient accumulation, clipping, DDP's
``no_sync``), the optimiser and LR steps, the step logs, then the epoch's end (validation, ``epochs.csv``, the
checkpoints and ``train_state.pt``); and stopping on a signal between steps (``stop.py``) with the state saved and a
line that says how to go on.

:class:`EpochLoop` is mixed into :class:`~dtop_export.training.loop.Trainer`, whose set-up (``Trainer._run``) gives it
the attributes annotated on it and the methods it calls (``save_state``, ``validate``, ``embed_paths``,
``_save_ckpt``, ``_make_sampler``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dtop_export.errors import DToPError, Interrupted
from dtop_export.retrieval.metrics import format_map
from dtop_export.training.ddp import any_process
from dtop_export.training.state import rng_state
from dtop_export.training.stop import GroupStop, StopRequested, ignore_stop_signals, signal_name

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from dtop_export.training.config import TrainConfig
    from dtop_export.training.run_logs import RunLogs

log = logging.getLogger(__name__)

# an epoch's loss sum, loss count, images and seconds before its first step
NO_PROGRESS = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}


class EpochLoop:
    """The epoch loop of a :class:`~dtop_export.training.loop.Trainer` (see the module's docstring)."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    is_main: bool  # rank 0
    device: torch.device
    model: nn.Module
    head: nn.Module | None
    module: nn.Module  # model + loss, DDP-wrapped under torchrun
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    dataset: Any
    sampler: Any
    logs: RunLogs
    callbacks: list[Callable[[Any], None]]
    global_step: int
    epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    initial_metrics: dict[str, Any] | None
    skipped_decode: int
    decode_failed_run: int
    continue_hint: str | None
    _stop: GroupStop
    _boundary_rng: dict[str, Any] | None
    _boundary_position: int
    _epoch_so_far: dict[str, float]
    _saved_step: int | None
    _resume_sampler: dict[str, Any] | None
    _totals: list[float]

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
                    f"epoch {epoch + 1}: no batch had two images that decode ({self.decode_failures()} failed to):"
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
        failed: DToPError | None = None
        if self.is_main:
            with contextlib.suppress(StopRequested), self._stop.raising():
                try:
                    metrics = self.validate()
                except DToPError as e:  # (the set changed since the start's check): the epoch's steps are kept
                    failed = e
        stop = self._stop.agree(self.device)
        failed_any = any_process(failed is not None, self.world, self.device)
        if stop or failed_any:
            self.sampler.position = self._boundary_position
            self.save_state(self._boundary_rng)
            if stop:
                raise self._stopped(self._epoch_note(epoch))
            why = f"{failed}" if failed is not None else "the validation on process 0 failed (its error is there)"
            raise DToPError(
                f"{why}; the training state of epoch {epoch + 1}'s last step was saved: fix the validation set and "
                f"{self._resume_hint()}{self._epoch_note(epoch)}"
            )
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
        so_far = self._epoch_so_far if position else NO_PROGRESS  # a resumed epoch goes on with its sums
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
                # this step's base LR (optim.lr x the schedule): a group's LR over its multiplier fails at
                # backbone_lr_mult=0 (a frozen backbone's group sorts first)
                lr = cfg.optim.lr * self.sched.lr_lambdas[0](self.sched.last_epoch)
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
                    self.logs.step(self.epoch + 1, self.global_step, avg, lr, ips, now - t_epoch)  # 1-based
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
        self.logs.epoch(row)
        self.decode_failed_run = self.decode_failures()  # every process's (a collective): the line, the checkpoints
        # the sampler has finished this epoch: a resume starts the next one
        self.epoch = epoch + 1
        self.sampler.set_epoch(epoch + 1, 0)
        self._epoch_so_far = dict(NO_PROGRESS)
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
            if self.decode_failed_run:  # counted in provenance.skipped_images too; a user should not have to look
                msg += f"; {self.decode_failed_run} image(s) failed to decode so far, dropped from their batches"
            log.info("%s", msg)
        self.save_state(rng_state(self.device))
        self._boundary_rng = None  # the state just written is the one to resume from until the next step
        if self.world > 1:
            dist.barrier()
