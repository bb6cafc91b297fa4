"""SfM-120k tuples for the contrastive loss (cirtorch): (q, p, n1..n_nnum), hard negatives mined per epoch.

Query/positive selection is a pure function of (seed, epoch) — so the number of batches of every epoch
is known before training — and the negatives are mined with the current model at the start of the
epoch: the most similar images of a random pool whose cluster is not the query's, one per cluster.
A batch holds whole tuples of one aspect group (the query's), all resized to that group's size.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtop_export.errors import DToPError
from dtop_export.preprocess import load_image
from dtop_export.training.datasets import TrainSet
from dtop_export.training.transforms import Augment, augment_colour, crop_resize, to_tensor

log = logging.getLogger(__name__)


class TupleDataset:
    """Items ``(tuple_index, height, width, seed)`` -> ``([S, 3, H, W], None, tuple_index)``."""

    def __init__(self, ts: TrainSet, mean: Sequence[float], std: Sequence[float], aug: Augment) -> None:
        if ts.qidxs is None or ts.pidxs is None:
            raise DToPError(f"{ts.name} has no query/positive pairs: the contrastive loss needs SfM-120k")
        self.ts = ts
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug = aug
        self.nnum = 0
        self.q: list[int] = []
        self.p: list[int] = []
        self.n: list[list[int]] = []
        self.epoch = -1

    @property
    def tuple_size(self) -> int:
        return 2 + self.nnum

    def configure(self, nnum: int, query_size: int, pool_size: int, seed: int) -> None:
        if nnum > self.ts.num_classes - 1:  # negatives come one per cluster, none from the query's (cirtorch)
            raise DToPError(
                f"loss.nnum={nnum} hard negatives need as many clusters besides the query's, and {self.ts.name} has "
                f"{self.ts.num_classes} clusters: lower loss.nnum to {self.ts.num_classes - 1} or less"
            )
        self.nnum, self.query_size, self.pool_size, self.seed = nnum, query_size, pool_size, seed

    def select(self, epoch: int) -> list[tuple[int, int]]:
        """Pick the epoch's query/positive pairs; returns the queries' (width, height)."""
        rng = random.Random(f"{self.seed}:tuples:{epoch}")
        pick = rng.sample(range(len(self.ts.qidxs)), min(self.query_size, len(self.ts.qidxs)))
        self.q = [self.ts.qidxs[i] for i in pick]
        self.p = [self.ts.pidxs[i] for i in pick]
        self.n = [[] for _ in pick]
        self.epoch = epoch
        return [self.ts.sizes[i] for i in self.q]

    def mine(self, embed: Callable[[list[str]], torch.Tensor]) -> float:
        """Hard negatives with the current model (``embed``: image paths -> L2-normalised descriptors [n, N]);
        returns the mean query-negative distance."""
        from dtop_export.training.losses import mine_hard_negatives

        if self.nnum == 0:
            return 0.0
        rng = random.Random(f"{self.seed}:pool:{self.epoch}")
        pool = rng.sample(range(len(self.ts)), min(self.pool_size, len(self.ts)))
        qv = embed([self.ts.paths[i] for i in self.q])
        pv = embed([self.ts.paths[i] for i in pool])
        clusters = self.ts.labels
        self.n = mine_hard_negatives(qv, pv, pool, [clusters[i] for i in self.q], clusters, self.nnum)
        short = [i for i, n in enumerate(self.n) if len(n) < self.nnum]
        if short:
            raise DToPError(
                f"hard-negative mining found fewer than {self.nnum} negatives from other clusters for "
                f"{len(short)} queries: raise loss.pool_size or lower loss.nnum"
            )
        d = [float((qv[i] - pv[pool.index(j)]).norm()) for i, ns in enumerate(self.n) for j in ns[:1]]
        return sum(d) / len(d) if d else 0.0

    def tuples_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "q": self.q, "p": self.p, "n": self.n}

    def load_tuples_state(self, st: dict[str, Any]) -> None:
        self.epoch = int(st["epoch"])
        self.q, self.p = [int(i) for i in st["q"]], [int(i) for i in st["p"]]
        self.n = [[int(i) for i in ns] for ns in st["n"]]

    def query_sizes(self) -> list[tuple[int, int]]:
        return [self.ts.sizes[i] for i in self.q]

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple | None:
        t, h, w, seed = item
        rng = random.Random(seed)
        out = []
        for idx in [self.q[t], self.p[t], *self.n[t]]:
            try:
                img = load_image(self.ts.paths[idx])
            except DToPError as e:
                log.warning("%s; its tuple (query %s) dropped from its batch", e, self.ts.paths[self.q[t]])
                return None
            img = augment_colour(crop_resize(img, (h, w), self.aug, rng), self.aug, rng)
            out.append(to_tensor(img, self.mean, self.std))
        return torch.stack(out), None, t

    @staticmethod
    def collate(batch: list[tuple | None]) -> dict[str, Any]:
        ok = [b for b in batch if b is not None]
        if not ok:
            return {"images": None, "labels": None, "indices": [], "failed": len(batch)}
        return {
            "images": torch.cat([b[0] for b in ok]),
            "labels": None,
            "indices": [b[2] for b in ok],
            "failed": len(batch) - len(ok),
        }
