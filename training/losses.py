"""Losses: ArcFace for class-labelled sets, cirtorch's contrastive loss with hard-negative mining for tuples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ArcFace(nn.Module):
    """Additive angular margin (Deng et al., CVPR 2019): class weights W [C, N] on the unit sphere.

    For L2-normalised x and W, cos θ_j = W_j·x. The true class's logit becomes s·cos(θ_y + m), the others
    s·cos θ_j, then cross-entropy. Where θ_y + m would pass π (cos θ_y < cos(π − m)) the logit is
    s·(cos θ_y − m·sin m) instead, keeping it monotonic (InsightFace's ``easy_margin=False``).
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3) -> None:
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted, scaled logits [B, C] for descriptors x [B, N] (normalised here), in fp32 under AMP too:
        autocast would run the cosines' matmul in bf16/fp16, and the margin and s·cos with them."""
        with torch.autocast(x.device.type, enabled=False):
            cos = F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
            cos = cos.clamp(-1.0, 1.0)
            target = cos.gather(1, labels[:, None])
            sin = (1.0 - target.pow(2)).clamp_min(0.0).sqrt()
            phi = target * self.cos_m - sin * self.sin_m
            phi = torch.where(target > self.th, phi, target - self.mm)
            return self.scale * cos.scatter(1, labels[:, None], phi)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x, labels)
        with torch.autocast(x.device.type, enabled=False):
            return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        c, n = self.weight.shape
        return f"dim={n}, classes={c}, scale={self.scale}, margin={self.margin}"


def contrastive_loss(x: torch.Tensor, tuple_size: int, margin: float = 0.7, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's contrastive loss on tuples, averaged over tuples.

    x: L2-normalised descriptors [T·S, N] ordered tuple by tuple as (q, p, n1, …, n_{S-2}).
    Per tuple: ½·‖q − p‖² + Σ_i ½·max(0, margin − ‖q − n_i‖)². cirtorch sums over all tuples of a batch;
    we divide by the number of tuples so the LR does not depend on the batch size.
    """
    if x.shape[0] % tuple_size:
        raise ValueError(f"{x.shape[0]} descriptors do not split into tuples of {tuple_size}")
    t = x.float().view(-1, tuple_size, x.shape[-1])
    q, others = t[:, :1], t[:, 1:]
    d = (q - others + eps).pow(2).sum(-1).sqrt()  # [T, S-1]; cirtorch adds eps before squaring
    pos = 0.5 * d[:, 0].pow(2)
    neg = 0.5 * (margin - d[:, 1:]).clamp_min(0).pow(2).sum(-1)
    return (pos + neg).mean()


def mine_hard_negatives(
    qvecs: torch.Tensor,
    poolvecs: torch.Tensor,
    pool_idx: Sequence[int],
    q_clusters: Sequence[int],
    clusters: Sequence[int],
    nnum: int,
) -> list[list[int]]:
    """cirtorch's negative selection: for each query, the ``nnum`` most similar pool images whose cluster
    differs from the query's, at most one per cluster.

    qvecs [Q, N], poolvecs [P, N] (L2-normalised); pool_idx maps pool rows to dataset indices; clusters
    gives each dataset index's cluster. Returns dataset indices, ``nnum`` (or fewer) per query.
    """
    scores = qvecs @ poolvecs.T  # [Q, P]
    ranks = scores.argsort(dim=1, descending=True)
    out = []
    for q in range(qvecs.shape[0]):
        used = {q_clusters[q]}
        negs: list[int] = []
        for r in ranks[q].tolist():
            cand = pool_idx[r]
            c = clusters[cand]
            if c in used:
                continue
            negs.append(cand)
            used.add(c)
            if len(negs) == nnum:
                break
        out.append(negs)
    return out
