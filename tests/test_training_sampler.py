"""Group-size sampler: one aspect group and one size per batch, deterministic, DDP shards, resumable."""

from __future__ import annotations

import math
import random

import pytest

from dtop_export.errors import DToPError
from dtop_export.training.sampler import GroupSizeBatchSampler, assign_groups, group_sizes

RATIOS = (0.5, 0.75, 1.0, 1.333, 2.0)


def _sizes(n: int = 300, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(100, 1000), rng.randint(100, 1000)) for _ in range(n)]


def test_group_sizes_are_stride_multiples_with_the_right_shape() -> None:
    sizes = group_sizes(RATIOS, 384, 16)
    for r, (h, w) in zip(RATIOS, sizes):
        assert h % 16 == 0 and w % 16 == 0
        assert abs(math.log((w / h) / r)) < 0.1  # the group's aspect ratio
        assert abs(h * w / 384**2 - 1) < 0.15  # about the base area
    assert sizes[2] == (384, 384)


def test_batches_share_one_group_and_one_size() -> None:
    sizes = _sizes()
    s = GroupSizeBatchSampler(sizes, 8, 16, 256, RATIOS, seed=3)
    groups = assign_groups(sizes, RATIOS)
    batches = list(s)
    assert len(batches) == len(s) > 10
    seen_sizes = set()
    for b in batches:
        assert len(b) == 8
        assert len({(h, w) for _, h, w, _ in b}) == 1  # one size per batch
        assert len({groups[i] for i, *_ in b}) == 1  # one aspect group per batch
        h, w = b[0][1], b[0][2]
        assert (h, w) == s.sizes[groups[b[0][0]]]
        # the group is the nearest aspect ratio of every image in it
        for i, *_ in b:
            a = sizes[i][0] / sizes[i][1]
            assert min(RATIOS, key=lambda r: abs(math.log(a / r))) == RATIOS[groups[i]]
        seen_sizes.add((h, w))
    assert len(seen_sizes) >= 3  # batches really have different sizes
    flat = [i for b in batches for i, *_ in b]
    assert len(flat) == len(set(flat))  # no image twice in an epoch


def test_deterministic_per_seed_and_epoch() -> None:
    sizes = _sizes()
    a = GroupSizeBatchSampler(sizes, 8, 16, seed=1)
    b = GroupSizeBatchSampler(sizes, 8, 16, seed=1)
    c = GroupSizeBatchSampler(sizes, 8, 16, seed=2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and a.epoch_batches(0) != a.epoch_batches(1)


def test_ddp_shards_are_disjoint_and_equal() -> None:
    sizes = _sizes(301)
    full = GroupSizeBatchSampler(sizes, 4, 16, seed=5)
    shards = [list(GroupSizeBatchSampler(sizes, 4, 16, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # equal count: no process waits in a collective
    ids = [i for s in shards for b in s for i, *_ in b]
    assert len(ids) == len(set(ids))
    all_batches = full.epoch_batches(0)
    assert sorted(map(tuple, (tuple(b) for s in shards for b in s))) == sorted(
        tuple(b) for b in all_batches[: len(all_batches) // 3 * 3]
    )
    with pytest.raises(DToPError):
        GroupSizeBatchSampler(sizes, 4, 16, rank=3, world_size=3)


def test_resume_position() -> None:
    sizes = _sizes()
    s = GroupSizeBatchSampler(sizes, 8, 16, seed=9)
    s.set_epoch(2)
    ref = list(s)
    it = iter(s)
    for _ in range(5):
        next(it)
        s.advance()
    state = s.state_dict()
    t = GroupSizeBatchSampler(sizes, 8, 16, seed=9)
    t.load_state_dict(state)
    assert list(t) == ref[5:]
    assert len(t) == len(ref)
    other = GroupSizeBatchSampler(sizes, 8, 16, seed=9, world_size=2)
    with pytest.raises(DToPError, match="processes"):
        other.load_state_dict(state)


def test_small_groups_and_drop_last() -> None:
    sizes = [(100, 100)] * 5 + [(200, 100)] * 3
    keep = GroupSizeBatchSampler(sizes, 4, 16, drop_last=False)
    assert sorted(len(b) for b in keep) == [3, 4]  # a lone leftover image is never a batch (batch norm)
    drop = GroupSizeBatchSampler(sizes, 4, 16, drop_last=True)  # the 3 wide images join the square group
    assert [len(b) for b in drop] == [4, 4] and drop.moved == 3


def test_groups_smaller_than_a_batch_are_trained_on() -> None:
    # found by a data audit: with drop_last (the default) a group with fewer images than a batch (a few panoramas
    # or portraits in a small set) never made a batch, so its images were never trained on, in any epoch; nor was
    # a group of one image without drop_last
    sizes = [(100, 100)] * 20 + [(200, 100)] * 3 + [(100, 200)]
    s = GroupSizeBatchSampler(sizes, 4, 16, aspect_ratios=RATIOS, drop_last=True)
    assert s.moved == 4 and [len(m) for m in s.members] == [0, 0, 24, 0, 0]
    for e in range(3):
        flat = sorted(i for b in s.epoch_batches(e) for i, *_ in b)
        assert flat == list(range(24))  # every image once per epoch, in batches of one size
    shards = [GroupSizeBatchSampler(sizes, 4, 16, aspect_ratios=RATIOS, rank=r, world_size=2) for r in range(2)]
    flat = [i for sh in shards for b in sh for i, *_ in b]
    assert sorted(flat) == list(range(24))  # DDP: disjoint shards that cover the set
    lone = GroupSizeBatchSampler([(100, 100)] * 4 + [(100, 200)], 4, 16, aspect_ratios=RATIOS, drop_last=False)
    assert lone.moved == 1
    assert {i for e in range(10) for b in lone.epoch_batches(e) for i, *_ in b} == set(range(5))
    alone = GroupSizeBatchSampler([(100, 200)] * 3, 4, 16, aspect_ratios=RATIOS, drop_last=True)
    assert alone.moved == 0 and len(alone) == 0  # a set smaller than one batch: the loop says so


def test_resume_refuses_a_set_whose_groups_changed_mid_epoch() -> None:
    # a review of the data audit: the saved position counts batches of the epoch's list, which is another list when
    # the images per group changed (files added or removed, links now folded into one image): refused, not skipped
    sizes = [(100, 100)] * 12 + [(200, 100)] * 8
    s = GroupSizeBatchSampler(sizes, 4, 16, aspect_ratios=RATIOS)
    s.set_epoch(1, 2)
    state = s.state_dict()
    assert state["groups"] == [0, 0, 12, 0, 8] and state["merge_small"] is True
    GroupSizeBatchSampler(sizes, 4, 16, aspect_ratios=RATIOS).load_state_dict(state)
    other = GroupSizeBatchSampler(sizes[:-4], 4, 16, aspect_ratios=RATIOS)
    with pytest.raises(DToPError, match=r"^cannot resume: the images per aspect group were \[0, 0, 12, 0, 8\], now"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "position": 0})  # an epoch's start: its batches are all to come
    old = GroupSizeBatchSampler(sizes[:15], 4, 16, aspect_ratios=RATIOS, merge_small=False)
    assert old.moved == 0 and [len(m) for m in old.members] == [0, 0, 12, 0, 3]
