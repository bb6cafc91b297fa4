"""Learned whitening of descriptors (cirtorch semantics: ``normalize(P·(x − m))``).

* Supervised Lw (Radenović et al., TPAMI 2019; cirtorch ``whitenlearn``) from matching pairs (q_i, p_i):
  m = mean of the queries; S = Σ (q_i − p_i)(q_i − p_i)ᵀ / n; P₁ = L⁻¹ with S = L Lᵀ (Cholesky);
  then PCA of the P₁-whitened, centred data: P = Eᵀ P₁, eigenvectors by decreasing eigenvalue.
  S is shrunk towards a scaled identity, S ← (1 − α) S + α (tr S / N) I, before the Cholesky step, with
  α from the Ledoit–Wolf formula by default (``shrinkage="auto"``): with a few hundred pairs for hundreds
  of dimensions the raw S is ill-conditioned (cond(P) in the thousands), P then amplifies any rounding of
  the descriptor it is applied to, and FP16/bf16/INT8 artefacts drift off the FP32 one. ``shrinkage=0``
  is cirtorch's exact recipe.
* Unsupervised PCA whitening (cirtorch ``pcawhitenlearn``): P = Λ^(-1/2) Eᵀ of the data covariance.

``dim`` keeps the first rows of P (the leading components), giving a d-dimensional output. The result
is a :class:`dtop_export.checkpoint.Whitening` stored in the checkpoint and folded in on export.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtop_export.checkpoint import Whitening
from dtop_export.errors import DToPError

log = logging.getLogger(__name__)

# cond(P) above which whitening is reported as amplifying reduced-precision error: cirtorch's exact Lw on the
# demo's 460 pairs x 256 dimensions gives ~2200 (FP16 preview cos 0.99902, at the 0.999 contract's edge);
# Ledoit-Wolf shrinkage gives ~37 (cos 0.99977).
ILL_CONDITIONED = 1000


def cholesky_jitter(S: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of S, adding 1e-10, 1e-9, … to the diagonal until S is positive definite."""
    alpha = 0.0
    eye = torch.eye(S.shape[0], dtype=S.dtype)
    while True:
        L, info = torch.linalg.cholesky_ex(S + alpha * eye)
        if int(info) == 0:
            return L, alpha
        alpha = 1e-10 if alpha == 0 else alpha * 10
        if alpha > 1e3:
            raise DToPError("whitening: the pair-difference covariance is degenerate; use more (distinct) pairs")


def _check_dim(dim: int | None, n: int) -> int:
    if dim is None:
        return n
    if not 1 <= dim <= n:
        raise DToPError(f"whitening output dimension (--dim) must be in 1..{n} (the descriptor's size), got {dim}")
    return dim


def ledoit_wolf_shrinkage(D: torch.Tensor) -> float:
    """Ledoit–Wolf (2004) optimal shrinkage intensity α ∈ [0, 1] of the second-moment matrix ``DᵀD / n``
    of the rows of D [n, N] towards ``μ I`` (μ = its mean eigenvalue); rows taken as centred (pair
    differences are). The estimator scikit-learn's ``ledoit_wolf_shrinkage(assume_centered=True)`` computes."""
    D = D.double()
    n, p = D.shape
    S = D.T @ D / n
    mu = float(torch.trace(S)) / p
    delta = float(((S - mu * torch.eye(p, dtype=S.dtype)) ** 2).sum()) / p  # ||S − μI||² / p
    D2 = D**2
    beta = float((D2.T @ D2).sum() / n - (S**2).sum()) / (p * n)  # variance of S's entries, / p
    if delta <= 0:
        return 0.0
    return float(min(max(beta, 0.0), delta) / delta)


def condition_number(P: torch.Tensor) -> float:
    """σ_max / σ_min of a projection P [d, N]: how much it can amplify a relative error of its input."""
    s = torch.linalg.svdvals(P.double())
    return float(s[0] / s[-1]) if float(s[-1]) > 0 else float("inf")


def parse_shrinkage(value: float | str) -> float | str:
    """``"auto"`` or a float in [0, 1] (``"0.25"`` -> 0.25), or a one-line :class:`DToPError`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        a = -1.0
    if not 0.0 <= a <= 1.0:
        raise DToPError(f"--shrinkage must be 'auto' or a number in [0, 1], got {value!r}")
    return a


def learn_lw(
    X: torch.Tensor,
    qidxs: Sequence[int],
    pidxs: Sequence[int],
    dim: int | None = None,
    shrinkage: float | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Supervised whitening from pairs. X: descriptors [n, N] (rows). Returns m [N], P [d, N] (float64) and
    the shrinkage α used (``"auto"``: Ledoit–Wolf; a number in [0, 1]: that α; 0: cirtorch's exact Lw)."""
    if len(qidxs) != len(pidxs) or not qidxs:
        raise DToPError("whitening needs a non-empty list of query/positive pairs")
    if len(qidxs) < 2:
        raise DToPError("whitening: one query/positive pair is too few to learn Lw from: give two or more pairs")
    X = X.double()
    n_dim = X.shape[1]
    d = _check_dim(dim, n_dim)
    q, p = X[list(qidxs)], X[list(pidxs)]
    m = q.mean(0)
    df = q - p
    if not bool(df.abs().max() > 0):
        raise DToPError(
            "whitening: every pair's two images have the same descriptor (one image twice, or duplicate images): "
            "give pairs of two different images of one landmark"
        )
    S = df.T @ df / df.shape[0]
    shrinkage = parse_shrinkage(shrinkage)
    a = ledoit_wolf_shrinkage(df) if shrinkage == "auto" else shrinkage
    if a > 0:
        mu = float(torch.trace(S)) / n_dim
        S = (1.0 - a) * S + a * mu * torch.eye(n_dim, dtype=S.dtype)
    L, alpha = cholesky_jitter(S)
    if alpha:
        log.warning("whitening: covariance not positive definite, added %.0e on the diagonal", alpha)
    P1 = torch.linalg.inv(L)
    Y = (X - m) @ P1.T  # rows: P1 (x - m)
    D = Y.T @ Y
    evals, evecs = torch.linalg.eigh(D)
    order = evals.argsort(descending=True)
    P = evecs[:, order].T @ P1
    return m, P[:d], a


def learn_pca(X: torch.Tensor, dim: int | None = None, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsupervised PCA whitening. X: descriptors [n, N]. Returns m [N], P [d, N] (float64)."""
    X = X.double()
    n, n_dim = X.shape
    if n < 2:
        raise DToPError("PCA whitening needs at least 2 descriptors")
    d = _check_dim(dim, n_dim)
    if d > n - 1:
        raise DToPError(
            f"PCA whitening to {d} dimensions needs more than {d} images (got {n}): use more images or --dim <= {n - 1}"
        )
    m = X.mean(0)
    Xc = X - m
    C = Xc.T @ Xc
    C = (C + C.T) / (2 * n)
    evals, evecs = torch.linalg.eigh(C)
    order = evals.argsort(descending=True)
    evals, evecs = evals[order], evecs[:, order]
    tol = max(float(evals[0]) * 1e-9, float((X * X).sum()) / n * 1e-12)  # rounding of identical rows is not a span
    rank = int((evals > tol).sum())
    if rank < d:  # the missing directions would be noise scaled by 1/sqrt(eps)
        raise DToPError(
            f"PCA whitening to {d} dimensions: the {n} descriptors span only {rank} (the same or duplicate images?): "
            + (f"use --dim <= {rank} or more distinct images" if rank else "give different images")
        )
    P = torch.diag(evals.clamp_min(eps).rsqrt()) @ evecs.T
    return m, P[:d]


def make_whitening(m: torch.Tensor, P: torch.Tensor, kind: str, **info: Any) -> Whitening:
    """Pack m, P (float32) into the checkpoint's :class:`Whitening`."""
    info = {"in_dim": int(P.shape[1]), "out_dim": int(P.shape[0]), **info}
    return Whitening(mean=m.float().contiguous(), proj=P.float().contiguous(), kind=kind, info=info)


# pairs ------------------------------------------------------------------------------------------------------


@dataclass
class PairList:
    """Images and index pairs into them."""

    paths: list[str]
    qidxs: list[int]
    pidxs: list[int]
    source: str


def read_pairs(spec: str | Path, root: str | Path | None = None, split: str = "val") -> PairList:
    """Matching pairs from: a cirtorch pickle (``*-whiten.pkl`` {cids, qidxs, pidxs} or SfM-120k's
    {'train','val'} — images under ``<root or pkl folder>/ims``), a CSV/TSV/TXT of ``query,positive`` image
    paths (relative to ``root`` or the list's folder), or a class-per-folder directory (consecutive
    images of a class are paired)."""
    spec = Path(spec)
    if spec.is_dir():
        from dtop_export.training.datasets import read_folder
        from dtop_export.training.scan import LAYOUTS, guess_layout

        other = guess_layout(spec)
        if other == "sfm120k":  # its download's pickle holds the pairs
            return read_pairs(spec / LAYOUTS["sfm120k"][0], root or spec, split)
        if other is not None:  # read_folder's hint names data.dataset, a training key: no option of this command
            raise DToPError(
                f"--pairs {spec} holds a {other} set (its classes are in a list file, not folders): give a CSV of "
                "query,positive image paths, a cirtorch whitening pickle or an SfM-120k folder, or class sub-folders"
            )
        ts = read_folder(spec)
        by_class: dict[int, list[int]] = {}
        for i, lbl in enumerate(ts.labels):
            by_class.setdefault(lbl, []).append(i)
        q, p = [], []
        for members in by_class.values():
            for a, b in zip(members, members[1:]):
                q.append(a)
                p.append(b)
        if not q:
            raise DToPError(f"{spec}: no class has two images to pair")
        return PairList(ts.paths, q, p, f"folder:{spec}")
    if not spec.is_file():
        raise DToPError(f"pairs file {spec} not found")
    if spec.suffix == ".pkl":
        from dtop_export.retrieval.datasets import load_pickle
        from dtop_export.training.datasets import cid2filename
        from dtop_export.training.lists import as_list, pair_indices

        db = load_pickle(spec)
        if isinstance(db, dict) and "cids" not in db and split in db:
            db = db[split]
        if not isinstance(db, dict) or not {"cids", "qidxs", "pidxs"} <= set(db):
            raise DToPError(f"{spec}: expected cirtorch's whitening pickle with cids, qidxs, pidxs")
        ims = Path(root) / "ims" if root else spec.parent / "ims"
        paths = [str(cid2filename(str(c), ims)) for c in as_list(db["cids"])]
        q, p = pair_indices(db, len(paths), spec)
        return PairList(paths, q, p, str(spec))
    base = Path(root) if root else spec.parent
    paths: list[str] = []
    index: dict[str, int] = {}
    q, p = [], []
    from dtop_export.training.lists import read_text

    text = read_text(spec)
    dialect = "excel-tab" if "\t" in text else "excel"
    for row in csv.reader(text.splitlines(), dialect=dialect):
        row = [c.strip() for c in row if c.strip()]
        if len(row) == 1 and " " in row[0]:
            row = row[0].split()
        if not row or row[0].startswith("#") or row[0].lower() in ("query", "q"):
            continue
        if len(row) < 2:
            raise DToPError(f"{spec}: every line needs two image paths (query,positive); got {row}")
        ids = []
        for name in row[:2]:
            full = str(base / name)
            if full not in index:
                index[full] = len(paths)
                paths.append(full)
            ids.append(index[full])
        q.append(ids[0])
        p.append(ids[1])
    if not q:
        raise DToPError(f"{spec}: no pairs found")
    return PairList(paths, q, p, str(spec))


def whiten_checkpoint(
    ckpt_path: str | Path,
    output: str | Path | None = None,
    pairs: str | Path | None = None,
    images: str | Path | None = None,
    root: str | Path | None = None,
    dim: int | None = None,
    size: int | None = None,
    scales: Sequence[float] = (1.0,),
    progress: bool = True,
    shrinkage: float | str = "auto",
) -> tuple[Path, Whitening]:
    """Learn Lw (``pairs``) or PCA (``images``) whitening on a checkpoint's descriptors and store it.

    The checkpoint is rewritten atomically (to ``output`` if given); unreadable images are skipped.
    ``shrinkage`` (Lw only): see :func:`learn_lw`. The whitening's ``info`` records the shrinkage and the
    condition number of P; above :data:`ILL_CONDITIONED` a warning says that reduced-precision artefacts
    will amplify rounding through it.
    """
    from dtop_export.checkpoint import load_checkpoint, save_checkpoint
    from dtop_export.preprocess import image_size, list_images

    if (pairs is None) == (images is None):
        raise DToPError("give either --pairs (supervised Lw) or --images (unsupervised PCA whitening)")
    shrinkage = parse_shrinkage(shrinkage)  # a bad value fails before the descriptors are computed
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.build_model()
    _check_dim(dim, model.descriptor_dim)  # before the minutes of embedding, not after
    size = size or ckpt.preprocess.size
    if pairs is not None:
        pl = read_pairs(pairs, root)
        used = sorted(set(pl.qidxs) | set(pl.pidxs))
        ok = {i for i in used if image_size(pl.paths[i]) is not None}
        keep = [(a, b) for a, b in zip(pl.qidxs, pl.pidxs) if a in ok and b in ok]
        if len(keep) < len(pl.qidxs):
            log.warning(
                "whitening: %d of %d pairs skipped (missing/unreadable images)",
                len(pl.qidxs) - len(keep),
                len(pl.qidxs),
            )
        if not keep:
            raise DToPError(f"{pairs}: no pair has both images readable")
        order = sorted({i for ab in keep for i in ab})
        remap = {i: k for k, i in enumerate(order)}
        paths = [pl.paths[i] for i in order]
        X, failed = _embed(model, paths, ckpt.preprocess, size, scales, progress)
        if failed:  # headers fine, bodies not (truncated JPEGs): their pairs go
            bad = {order[k] for k in failed}
            keep = [(a, b) for a, b in keep if a not in bad and b not in bad]
            _warn_failed(failed, paths, f"{len(keep)} pairs left")
            if not keep:
                raise DToPError(f"{pairs}: no pair has both images readable")
            order = sorted({i for ab in keep for i in ab})
            X = X[[remap[i] for i in order]]
            remap = {i: k for k, i in enumerate(order)}
            paths = [pl.paths[i] for i in order]
        m, P, alpha = learn_lw(X, [remap[a] for a, _ in keep], [remap[b] for _, b in keep], dim, shrinkage)
        cond = condition_number(P)
        wh = make_whitening(
            m,
            P,
            "lw",
            pairs=len(keep),
            images=len(paths),
            source=pl.source,
            size=size,
            scales=list(scales),
            shrinkage=round(alpha, 6),
            condition_number=round(cond, 2),
        )
    else:
        paths = [p for p in list_images(images) if image_size(p) is not None]
        X, failed = _embed(model, paths, ckpt.preprocess, size, scales, progress)
        if failed:
            _warn_failed(failed, paths, f"{len(paths) - len(failed)} images left")
            gone = set(failed)
            alive = [k for k in range(len(paths)) if k not in gone]
            X, paths = X[alive], [paths[k] for k in alive]
        m, P = learn_pca(X, dim)
        cond = condition_number(P)
        wh = make_whitening(
            m,
            P,
            "pca",
            images=len(paths),
            source=str(images),
            size=size,
            scales=list(scales),
            condition_number=round(cond, 2),
        )
    if cond > ILL_CONDITIONED:
        hint = "use more pairs or --shrinkage auto" if wh.kind == "lw" else "use more images or a smaller --dim"
        log.warning(
            "whitening: the learned projection is ill-conditioned (condition number %.0f > %d): FP16, bf16 and "
            "INT8 artefacts will amplify rounding through it; %s",
            cond,
            ILL_CONDITIONED,
            hint,
        )
    prov = dict(ckpt.provenance)
    prov["whitening"] = {k: v for k, v in wh.info.items()} | {"kind": wh.kind}
    out = Path(output) if output else Path(ckpt_path)
    save_checkpoint(out, model, ckpt.preprocess, whitening=wh, provenance=prov)
    return out, wh


def _embed(
    model: Any, paths: list[str], preprocess: Any, size: int, scales: Sequence[float], progress: bool
) -> tuple[torch.Tensor, list[int]]:
    from dtop_export.training.embed import embed_paths
    from dtop_export.training.progress import track

    failed: list[int] = []
    with track(len(paths), "descriptors", enabled=progress) as advance:
        return embed_paths(model, paths, preprocess, size, scales, progress=advance, failed=failed), failed


def _warn_failed(failed: list[int], paths: list[str], left: str) -> None:
    log.warning("whitening: %d image(s) failed to decode, skipped (first: %s); %s", len(failed), paths[failed[0]], left)
