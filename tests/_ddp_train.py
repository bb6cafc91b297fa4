"""A training run under torchrun with what the CLI has no option for (tests/test_training_loop.py starts it):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_train.py CONFIG OUT [RANK:WHEN[:SIG]]

(or ``RANK=0 python tests/_ddp_train.py ...`` for one process). Writes OUT.<rank> (JSON) with the loss of every batch
this process trained on (its shard), the run's history and its validations (``step``: the step before it;
``finished``); with RANK:WHEN, that process sends itself SIG (default SIGINT) after optimiser step WHEN, with
``in@STEP`` as that step's (first) forward starts, with ``val@STEP`` as the validation after step STEP starts (a
signal reaching one process only, or one step before the others; STEP: the global step, for in@ this run's count),
to its process group from another process (its DataLoader workers too; torchrun starts each process in a session of
its own); ``RANK:WHEN:SIG:again`` sends SIG once more as the stopped run saves its state. Exits 128 + the signal's
number on a stop, printing what the trainer said.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from dtop_export.training import loop
from dtop_export.training.config import load_config


def signal_group(sig: int) -> None:
    """Send ``sig`` to this process's group from another process, as torchrun, SLURM or a shell would (a DataLoader
    worker that sees its parent as the sender exits quietly, whatever it does with the signal otherwise)."""
    code = f"import os; os.killpg({os.getpgid(0)}, {int(sig)})"
    subprocess.run([sys.executable, "-c", code], check=True, start_new_session=True)  # (not in the group it signals)


def main() -> int:
    config, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    losses: list[float] = []
    forward = loop._TrainModule.forward
    who, when, sig, again = -1, "", signal.SIGINT, False
    if len(sys.argv) > 3:
        who_, when, *name = sys.argv[3].split(":")
        who, sig = int(who_), getattr(signal, name[0]) if name else signal.SIGINT
        again = name[1:] == ["again"]  # the same signal once more as the stopped run saves its state

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if rank == who and when == f"in@{len(losses) + 1}":
            signal_group(sig)
        loss = forward(self, *args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    loop._TrainModule.forward = recording  # type: ignore[method-assign]
    callbacks = []
    validations: list[dict[str, object]] = []

    def send(tr: loop.Trainer) -> None:
        if rank == who and str(tr.global_step) == when:
            signal_group(sig)

    callbacks.append(send)
    validate = loop.Trainer.validate

    def validating(self: loop.Trainer) -> dict[str, object]:
        entry = {"step": self.global_step, "finished": False}
        validations.append(entry)
        if rank == who and when == f"val@{self.global_step}":
            signal_group(sig)
        metrics = validate(self)
        entry["finished"] = True
        return metrics

    loop.Trainer.validate = validating  # type: ignore[method-assign]
    save_state = loop.Trainer.save_state

    def saving(self: loop.Trainer, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if again and rank == who and self._stop.requested:
            signal_group(sig)  # delivered before the write below begins: the handler in place then decides
        save_state(self, *args, **kwargs)

    loop.Trainer.save_state = saving  # type: ignore[method-assign]
    trainer = loop.Trainer(load_config(config), callbacks=callbacks)
    code = 0
    try:
        trainer.run()
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 130)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"losses": losses, "history": trainer.history, "validations": validations}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
