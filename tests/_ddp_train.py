"""A training run under torchrun with what the CLI has no option for (tests/test_training_loop.py starts it):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_train.py CONFIG.yaml OUT_JSON [RANK:STEP]

Writes OUT_JSON.<rank> with the loss of every batch this process trained on (its shard) and the run's history;
with RANK:STEP, that process sends itself SIGINT after optimiser step STEP (Ctrl-C reaching one process only, or
one step before the others). Exits 130 on Ctrl-C, printing what the trainer said.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from dtop_export.training import loop
from dtop_export.training.config import load_config


def main() -> int:
    config, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    losses: list[float] = []
    forward = loop._TrainModule.forward

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        loss = forward(self, *args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    loop._TrainModule.forward = recording  # type: ignore[method-assign]
    callbacks = []
    if len(sys.argv) > 3:
        who, step = (int(x) for x in sys.argv[3].split(":"))

        def sigint(tr: loop.Trainer) -> None:
            if rank == who and tr.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)

        callbacks.append(sigint)
    trainer = loop.Trainer(load_config(config), callbacks=callbacks)
    code = 0
    try:
        trainer.run()
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        code = 130
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"losses": losses, "history": trainer.history}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
