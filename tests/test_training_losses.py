"""ArcFace and contrastive losses against hand-computed values; mining; optimiser groups; LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dtop_export.training.config import OptimSection
from dtop_export.training.losses import ArcFace, contrastive_loss, mine_hard_negatives
from dtop_export.training.optim import build_optimizer, lr_factor, param_groups


def _ce(logits: list[float], y: int) -> float:
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


def test_arcface_by_hand() -> None:
    s, m = 30.0, 0.3
    head = ArcFace(2, 3, scale=s, margin=m)
    with torch.no_grad():  # class centres at 0, 90 and 180 degrees (unnormalised: normalised inside)
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    a = 0.5  # the descriptor at 0.5 rad, length 4
    x = torch.tensor([[4 * math.cos(a), 4 * math.sin(a)]])
    # true class 0: theta = 0.5 -> cos(0.5 + m); the others plain cosines
    want = [s * math.cos(a + m), s * math.cos(math.pi / 2 - a), s * math.cos(math.pi - a)]
    got = head.logits(x, torch.tensor([0]))[0].tolist()
    assert got == pytest.approx(want, rel=1e-5)
    assert float(head(x, torch.tensor([0])).detach()) == pytest.approx(_ce(want, 0), rel=1e-4)
    # true class 2 with theta = pi - 0.1 > pi - m: theta + m would pass pi, so s*(cos theta - m sin m)
    b = 0.1
    x2 = torch.tensor([[math.cos(b), math.sin(b)]])
    want2 = [s * math.cos(b), s * math.cos(math.pi / 2 - b), s * (math.cos(math.pi - b) - m * math.sin(m))]
    assert head.logits(x2, torch.tensor([2]))[0].tolist() == pytest.approx(want2, rel=1e-5)
    # a margin makes the loss larger than plain softmax on the same cosines
    plain = ArcFace(2, 3, scale=s, margin=0.0)
    plain.weight.data.copy_(head.weight.data)
    assert float(head(x, torch.tensor([0])).detach()) > float(plain(x, torch.tensor([0])).detach())


def test_arcface_gradients_flow() -> None:
    head = ArcFace(8, 5)
    x = torch.randn(4, 8, requires_grad=True)
    head(x, torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and head.weight.grad is not None and torch.isfinite(x.grad).all()


def test_contrastive_by_hand() -> None:
    q, p, n1, n2 = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]
    margin = 0.7
    t1 = 0.5 * 0.8 + 0.0 + 0.5 * (margin - math.sqrt(0.4)) ** 2  # |q-p|^2 = 0.8, |q-n1| = 1.41 > margin
    t2 = 0.5 * 0.0 + 0.5 * margin**2 + 0.5 * (margin - math.sqrt(2.0)) ** 2 * 0  # p = q; n1 = q (D = 0)
    x = torch.tensor([q, p, n1, n2, q, q, q, [-1.0, 0.0]])
    got = float(contrastive_loss(x, tuple_size=4, margin=margin))
    assert got == pytest.approx((t1 + t2) / 2, abs=1e-5)
    with pytest.raises(ValueError):
        contrastive_loss(x[:7], tuple_size=4)


def test_contrastive_matches_cirtorch_formula() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3 * 5, 16), dim=-1)
    # cirtorch: x is D x N, label -1 for queries, 1 positives, 0 negatives; sum over tuples
    xt, label = x.T, torch.tensor(([-1, 1] + [0] * 3) * 3, dtype=torch.float)
    nq, S, eps, margin = 3, 5, 1e-6, 0.7
    x1 = xt[:, ::S].permute(1, 0).repeat(1, S - 1).view((S - 1) * nq, 16).permute(1, 0)
    x2 = xt[:, [i for i in range(len(label)) if label[i] != -1]]
    lbl = label[label != -1]
    D = torch.pow(x1 - x2 + eps, 2).sum(dim=0).sqrt()
    ref = (0.5 * lbl * D**2 + 0.5 * (1 - lbl) * torch.clamp(margin - D, min=0) ** 2).sum() / nq
    assert float(contrastive_loss(x, 5, margin)) == pytest.approx(float(ref), rel=1e-5)


def test_hard_negative_mining() -> None:
    # queries along x; pool: most similar first, clusters repeat
    q = torch.tensor([[1.0, 0.0]])
    angles = [0.1, 0.2, 0.3, 0.4, 0.5]
    pool = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    pool_idx = [10, 11, 12, 13, 14]
    clusters = {10: 0, 11: 1, 12: 1, 13: 2, 14: 3}  # 10 is the query's own cluster
    negs = mine_hard_negatives(q, pool, pool_idx, [0], clusters, nnum=3)
    assert negs == [[11, 13, 14]]  # skip own cluster, one image per cluster, most similar first


def test_param_groups_without_decay_on_norms_biases_pos_embed(small_model: torch.nn.Module) -> None:
    head = ArcFace(small_model.descriptor_dim, 4)
    cfg = OptimSection(weight_decay=0.01, backbone_lr_mult=0.1, head_lr_mult=10.0, lr=1e-3)
    groups = param_groups(small_model, head, cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(small_model.named_parameters())
    assert by_param[id(named["encoder.pos_embed.weight"])]["weight_decay"] == 0.0  # 3-D, but no decay
    assert by_param[id(named["encoder.cls_token"])]["weight_decay"] == 0.0
    for name, p in named.items():
        g = by_param[id(p)]
        no_decay = p.ndim <= 1 or "pos_embed" in name or "cls_token" in name
        assert g["weight_decay"] == (0.0 if no_decay else 0.01), name
        assert g["lr"] == pytest.approx(1e-4 if name.startswith("encoder.") else 1e-3), name
    assert by_param[id(head.weight)]["lr"] == pytest.approx(1e-2)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in small_model.parameters()) + head.weight.numel()
    opt = build_optimizer(small_model, head, OptimSection(optimizer="adamw"))
    assert isinstance(opt, torch.optim.AdamW)


def test_lr_schedule() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    vals = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_layer_wise_lr_decay(small_model: torch.nn.Module) -> None:
    cfg = OptimSection(lr=1.0, backbone_lr_mult=0.1, layer_decay=0.5)
    lr = {id(p): g["lr"] for g in param_groups(small_model, None, cfg) for p in g["params"]}
    named = dict(small_model.named_parameters())
    depth = 6  # the small preset's encoder
    assert lr[id(named["encoder.blocks.5.attn.qkv.weight"])] == pytest.approx(0.1 * 0.5)
    assert lr[id(named["encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.1 * 0.5**depth)
    assert lr[id(named["encoder.pos_embed.weight"])] == pytest.approx(0.1 * 0.5 ** (depth + 1))
    assert lr[id(named["encoder.norm.weight"])] == pytest.approx(0.1)
    assert lr[id(named["head.fc.weight"])] == pytest.approx(1.0)
