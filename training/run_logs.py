"""A training run's logs in its folder: ``log.csv`` (a row per logged optimiser step), ``epochs.csv`` (a row per
epoch, with its validation mAP) and TensorBoard's ``tb/`` when ``torch.utils.tensorboard`` imports. Written by
rank 0 only; a resumed run drops the rows (and TensorBoard events) written after the state it resumes from."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_write_text

STEP_HEADER = "epoch,step,loss,lr,images_per_s,seconds\n"
EPOCH_HEADER = "epoch,step,loss,map_easy,map_medium,map_hard,images_per_s,seconds\n"


class RunLogs:
    """The step and epoch logs of the run in ``folder``; every method is a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.steps_csv = folder / "log.csv"
        self.epochs_csv = folder / "epochs.csv"
        self._tb: Any = None

    def open(self, resumed: bool, step: int) -> None:
        """Start the logs (their headers if new, TensorBoard); ``resumed``: drop the rows of steps after ``step``."""
        self._tb = None
        if not self.enabled:
            return
        if resumed:
            for p in (self.steps_csv, self.epochs_csv):
                if p.is_file():  # drop rows written after the state we resume from
                    rows = list(csv.reader(p.read_text().splitlines()))
                    keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[1])) <= step]
                    if p == self.steps_csv and any(r[0] == "0" for r in keep[1:]):  # 0-based: written before 1-based
                        keep[1:] = [[str(int(r[0]) + 1), *r[1:]] for r in keep[1:]]  # epochs, the rows now appended
                    atomic_write_text(p, "".join(",".join(r) + "\n" for r in keep))
        if not self.steps_csv.is_file():
            atomic_write_text(self.steps_csv, STEP_HEADER)
        if not self.epochs_csv.is_file():
            atomic_write_text(self.epochs_csv, EPOCH_HEADER)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # resumed: TensorBoard drops the events of the steps after the state (those are trained again)
            self._tb = SummaryWriter(str(self.folder / "tb"), purge_step=step + 1 if resumed else None)
        except (ImportError, ModuleNotFoundError):
            self._tb = None

    def step(self, epoch: int, step: int, loss: float, lr: float, ips: float, secs: float) -> None:
        """One optimiser step of ``epoch`` (1-based, as in ``epochs.csv`` and the console): its mean loss, learning
        rate, images/s and the seconds into the epoch."""
        if not self.enabled:
            return
        with open(self.steps_csv, "a") as fh:
            fh.write(f"{epoch},{step},{loss:.6f},{lr:.6g},{ips:.2f},{secs:.2f}\n")
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
            self._tb.add_scalar("train/images_per_s", ips, step)

    def epoch(self, row: dict[str, Any]) -> None:
        """One epoch's row of the run's history (``epoch``, ``step``, ``loss``, ``metrics``, ``images_per_s``,
        ``seconds``)."""
        if not self.enabled:
            return
        m = row.get("metrics", {})
        cells = [row["epoch"], row["step"], f"{row['loss']:.6f}"]
        cells += [f"{m[k]:.2f}" if k in m else "" for k in ("easy", "medium", "hard")]
        cells += [f"{row['images_per_s']:.2f}", f"{row['seconds']:.1f}"]
        with open(self.epochs_csv, "a") as fh:
            fh.write(",".join(str(c) for c in cells) + "\n")
        if self._tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"val/map_{k}", v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
