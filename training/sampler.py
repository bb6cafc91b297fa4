"""Group-size sampling (paper §3.2, after Yokoo et al., CVPRW 2020).

Each image goes to the aspect-ratio group (W/H) nearest to its own in log scale. Every group has one
fixed input size — area ≈ ``base_size``², both sides multiples of the model stride — and a batch holds
images of one group only, so every batch has its own H×W (DPE resamples the position embedding per
batch). A group with fewer images than one batch (with ``drop_last``; without it, a lone image) would never make a
batch: its images join the group nearest in aspect ratio, so that every image is trained on. The order is a
pure function of (seed, epoch): deterministic, identical on every process, and resumable at any batch. Under
DDP each process takes every ``world_size``-th batch, and all processes get the same number of batches.

The sampler yields lists of ``(index, height, width, seed)``: the per-image seed drives that image's
augmentation, so the data a step sees does not depend on worker processes or on where a run resumed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from dtop_export.errors import DToPError


def group_sizes(aspect_ratios: Sequence[float], base_size: int, stride: int) -> list[tuple[int, int]]:
    """(height, width) per aspect-ratio group: area ≈ base_size², sides rounded to multiples of stride."""
    sizes = []
    for r in aspect_ratios:
        h = max(stride, round(base_size / math.sqrt(r) / stride) * stride)
        w = max(stride, round(base_size * math.sqrt(r) / stride) * stride)
        sizes.append((int(h), int(w)))
    return sizes


def assign_groups(sizes: Sequence[tuple[int, int]], aspect_ratios: Sequence[float]) -> list[int]:
    """Group index per image from its (width, height): the nearest aspect ratio in log scale."""
    logs = [math.log(r) for r in aspect_ratios]
    out = []
    for w, h in sizes:
        a = math.log(w / h)
        out.append(min(range(len(logs)), key=lambda g: abs(logs[g] - a)))
    return out


def merge_small_groups(members: list[list[int]], aspect_ratios: Sequence[float], least: int) -> int:
    """Move the images of every group with fewer than ``least`` members (never a batch: ``drop_last`` skips a
    group's last, partial batch, and a lone image is never one) into the non-empty group nearest in log aspect
    ratio, smallest group first, until none is left or one group holds everything; ``members`` (sorted indices per
    group) is changed in place. Returns the number of images moved."""
    logs = [math.log(r) for r in aspect_ratios]
    moved = 0
    while True:
        small = [g for g, m in enumerate(members) if 0 < len(m) < least]
        others = [g for g, m in enumerate(members) if m]
        if not small or len(others) < 2:
            return moved
        g = min(small, key=lambda g: (len(members[g]), g))
        h = min((h for h in others if h != g), key=lambda h: (abs(logs[h] - logs[g]), h))
        members[h] = sorted(members[h] + members[g])
        moved += len(members[g])
        members[g] = []


class GroupSizeBatchSampler:
    """Batches of one aspect-ratio group each, resized to that group's fixed size.

    ``set_epoch(e)`` picks the epoch's order; ``state_dict()``/``load_state_dict()`` record the epoch and
    how many of this process's batches were consumed, so ``--resume`` continues at the next batch.
    """

    def __init__(
        self,
        image_sizes: Sequence[tuple[int, int]],
        batch_size: int,
        stride: int,
        base_size: int = 384,
        aspect_ratios: Sequence[float] = (0.5, 0.667, 0.75, 1.0, 1.333, 1.5, 2.0),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        items: Sequence[int] | None = None,
        merge_small: bool = True,
    ) -> None:
        if batch_size < 1:
            raise DToPError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DToPError(f"rank {rank} out of range for world size {world_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.sizes = group_sizes(aspect_ratios, base_size, stride)
        self.aspect_ratios = tuple(aspect_ratios)
        groups = assign_groups(image_sizes, aspect_ratios)
        # items: the indices to sample (all images by default, or e.g. the queries of tuples)
        self.items = list(range(len(image_sizes))) if items is None else list(items)
        self.members: list[list[int]] = [[] for _ in self.sizes]
        for i in self.items:
            self.members[groups[i]].append(i)
        # merge_small=False: the groups as they were before small ones merged (a run started then resumes exactly)
        self.merge_small = merge_small
        least = batch_size if drop_last else 2
        self.moved = merge_small_groups(self.members, self.aspect_ratios, least) if merge_small else 0
        self.max_batches: int | None = None
        self.epoch = 0
        self.position = 0
        self._batches: list[list[tuple[int, int, int, int]]] | None = None

    # order --------------------------------------------------------------------------------------------

    def _all_batches(self, epoch: int) -> list[list[tuple[int, int, int, int]]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for g, members in enumerate(self.members):
            idx = members[:]
            rng.shuffle(idx)
            h, w = self.sizes[g]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if len(chunk) < self.batch_size and (self.drop_last or len(chunk) < 2):
                    continue
                batches.append([(i, h, w, rng.getrandbits(63)) for i in chunk])
        rng.shuffle(batches)
        n = len(batches) // self.world_size * self.world_size  # equal count on every process
        return batches[:n]

    def epoch_batches(self, epoch: int | None = None) -> list[list[tuple[int, int, int, int]]]:
        """This process's batches for an epoch (all of them, ignoring the resume position)."""
        e = self.epoch if epoch is None else epoch
        mine = self._all_batches(e)[self.rank :: self.world_size]
        return mine[: self.max_batches] if self.max_batches else mine

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Select the epoch (and, when resuming, the number of batches already consumed)."""
        self.epoch, self.position = int(epoch), int(position)
        self._batches = None

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        if self._batches is None:
            self._batches = self.epoch_batches()
        start = self.position
        yield from self._batches[start:]

    def __len__(self) -> int:
        """Batches this process gets per epoch (independent of the resume position)."""
        if self._batches is None:
            self._batches = self.epoch_batches()
        return len(self._batches)

    def advance(self, n: int = 1) -> None:
        """Record that the training loop consumed ``n`` more batches (for resuming)."""
        self.position += n

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "sizes": [list(s) for s in self.sizes],
            "merge_small": self.merge_small,
            "groups": [len(m) for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise DToPError(
                f"cannot resume: the run used {state['world_size']} processes, this one has {self.world_size}"
            )
        if [tuple(s) for s in state.get("sizes", [])] not in ([], list(self.sizes)):
            raise DToPError("cannot resume: the sampler's group sizes changed (sampler.* or the model stride)")
        groups = [len(m) for m in self.members]
        # mid-epoch, other groups are another order of batches: the position would skip others than those trained on
        if int(state["position"]) and state.get("groups") not in (None, groups):
            raise DToPError(
                f"cannot resume: the images per aspect group were {state['groups']}, now {groups} (the training "
                "set changed: files added or removed under data.root, or image_sizes.tsv); start a new run"
            )
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def describe(self) -> list[dict[str, Any]]:
        """Per group: aspect ratio, size and number of images (for logs)."""
        return [
            {"aspect": r, "height": h, "width": w, "images": len(m)}
            for r, (h, w), m in zip(self.aspect_ratios, self.sizes, self.members)
        ]
