"""The Revisited Oxford/Paris protocol (Radenović et al., CVPR 2018): metrics and ranking only.

The metric code follows revisitop's ``evaluate.py`` exactly (cirtorch's ``utils/evaluate.py`` has the same):

- ``compute_ap(ranks, nres)``: trapezoidal average precision over the 0-based positions of the positives.
- ``compute_map(ranks, gnd, kappas)``: per query, the positives (``ok``) and ``junk`` images are located in
  the ranking; each positive's position is decreased by the number of junk images ranked before it (junk is
  ignored); AP uses ``nres = len(ok)``; mP@k uses ``kq = min(max(pos), k)`` and ``(pos <= kq).sum() / kq``
  on 1-based positions; queries without positives are left out of the means (their AP is NaN).
- Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk. Hard: ok = hard,
  junk = junk + easy. Results in percent, kappas 1, 5, 10.

The ranking is by descending inner product of L2-normalised descriptors; ties are broken by database
index (stable sort), so results never depend on the sort algorithm. With +R1M distractors (a ``.npy``
descriptor file) the distractors rank after database images they tie with, and only the positions of
the database images are computed (exactly as if the full ranking had been sorted). Database images and
distractors are scored by one routine (:func:`score_rows`, fixed-size blocks), so an exact copy of a database
image among the distractors scores exactly the same and ties with it.

Imports numpy only: no images, no engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dtop_export.errors import DToPError

KAPPAS = (1, 5, 10)
SETUPS = ("easy", "medium", "hard")


# revisitop metrics -----------------------------------------------------------------------------------


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision from the sorted 0-based positions ``ranks`` of the positives found; ``nres`` positives
    exist in total (revisitop's trapezoidal rule)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _query_metrics(pos: np.ndarray, junk: np.ndarray, nres: int, kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """AP and precision@kappas of one query from the sorted positions of its positives and junk images."""
    pos = np.array(pos, dtype=np.int64)
    if len(junk):
        # decrease positions of positives by the number of junk images ranked before them
        k = 0
        ij = 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
    ap = compute_ap(pos, nres)
    prs = np.zeros(len(kappas))
    if len(pos):  # revisitop assumes at least one positive is in the ranking
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(int(pos1.max()), kappa)
            prs[j] = (pos1 <= kq).sum() / kq
    return ap, prs


def _finish(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    n = int(valid.sum())
    if n == 0:
        return float("nan"), np.full(prs.shape[1], np.nan)
    return float(aps[valid].sum() / n), prs[valid].sum(axis=0) / n


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``: ``ranks`` [n_ranked, n_queries] holds database indices, best first.

    ``gnd[i]`` has ``ok`` (positives) and optionally ``junk``. Returns (mAP, APs per query, mean
    precision at kappas, precision at kappas per query); queries without positives get NaN and are left
    out of the means. Values are fractions (revisitop's), not percent.
    """
    ranks = np.asarray(ranks)
    order = np.arange(ranks.shape[0])

    def places(i: int, ids: np.ndarray) -> np.ndarray:
        return order[np.isin(ranks[:, i], ids)]

    return _per_query(gnd, kappas, places)


def compute_map_positions(
    positions: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compute_map` from ``positions`` [n_db, n_queries]: the 0-based place of every database image
    in each query's full ranking (which may also hold distractors). Same results, no full sort needed."""
    positions = np.asarray(positions)

    def places(i: int, ids: np.ndarray) -> np.ndarray:  # an id listed twice is one image, as revisitop's isin finds it
        return np.sort(positions[np.unique(ids), i]) if len(ids) else np.empty(0, dtype=np.int64)

    return _per_query(gnd, kappas, places)


def _per_query(
    gnd: Sequence[dict[str, Any]], kappas: Sequence[int], places: Callable[[int, np.ndarray], np.ndarray]
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The revisitop loop shared by both entry points: ``places(i, ids)`` gives the sorted 0-based ranks
    of database images ``ids`` for query ``i``; queries without positives get NaN."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        qgndj = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        aps[i], prs[i] = _query_metrics(places(i, qgnd), places(i, qgndj), len(qgnd), kappas)
    m, pr = _finish(aps, prs)
    return m, aps, pr, prs


def setup_gnd(gnd: Sequence[dict[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """The ok/junk lists of one protocol setup (``easy``, ``medium`` or ``hard``) from revisitop's gnd."""

    def cat(*keys: str) -> np.ndarray:
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in keys]) if keys else np.empty(0)

    out = []
    for g in gnd:
        if setup == "easy":
            ok, junk = ("easy",), ("junk", "hard")
        elif setup == "medium":
            ok, junk = ("easy", "hard"), ("junk",)
        elif setup == "hard":
            ok, junk = ("hard",), ("junk", "easy")
        else:
            raise DToPError(f"unknown protocol setup {setup!r}: choose easy, medium or hard")
        out.append({"ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]), "junk": cat(*junk)})
    return out


def revisited_metrics(
    gnd: Sequence[dict[str, Any]],
    *,
    ranks: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    kappas: Sequence[int] = KAPPAS,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@kappas in percent, from a ranking or from positions (one of the two)."""
    if (ranks is None) == (positions is None):
        raise ValueError("give either ranks or positions")
    out: dict[str, Any] = {"map": {}, "mp": {}, "aps": {}}
    for setup in SETUPS:
        g = setup_gnd(gnd, setup)
        if ranks is not None:
            m, aps, pr, _ = compute_map(ranks, g, kappas)
        else:
            m, aps, pr, _ = compute_map_positions(positions, g, kappas)
        out["map"][setup] = float(m * 100)
        out["mp"][setup] = {int(k): float(p * 100) for k, p in zip(kappas, pr)}
        out["aps"][setup] = [None if np.isnan(a) else float(a * 100) for a in aps]
    return out


# ranking --------------------------------------------------------------------------------------------


SCORE_BLOCK = 4096  # rows per matrix product in score_rows: every row goes through one product of one shape


def score_rows(rows: np.ndarray, queries: np.ndarray, block: int = SCORE_BLOCK) -> np.ndarray:
    """Inner products [len(rows), n_queries] in float32, computed ``block`` rows at a time, each block copied into
    one buffer of ``block`` rows (the last one zero-padded), so a row's score never depends on how many rows came
    with it: BLAS picks other kernels for other shapes (a 7-row product differs from a 4096-row one by ~1e-7), and
    an exact copy of a database image among the distractors must tie with it exactly."""
    queries = np.asarray(queries, dtype=np.float32)
    n, dim = len(rows), queries.shape[1]
    out = np.empty((n, len(queries)), dtype=np.float32)
    buf = np.zeros((block, dim), dtype=np.float32)
    qt = queries.T
    for start in range(0, n, block):
        part = np.asarray(rows[start : start + block], dtype=np.float32)
        buf[: len(part)] = part
        buf[len(part) :] = 0
        out[start : start + len(part)] = (buf @ qt)[: len(part)]
    return out


def rank_database(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Full ranking [n_db, n_queries] by descending inner product (:func:`score_rows`); ties by database index."""
    return np.argsort(-score_rows(db, queries), axis=0, kind="stable")


def ranking_positions(
    db: np.ndarray,
    queries: np.ndarray,
    distractors: np.ndarray | None = None,
    chunk: int = 65536,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """0-based place [n_db, n_queries] of every database image in each query's ranking over db + distractors.

    Equal to inverting ``argsort(-scores(concat(db, distractors)), kind="stable")``, without building it: database
    images and distractors are scored by the same :func:`score_rows`, so a distractor that is an exact copy of a
    database image ties with it, and ties go to the database image. ``advance(rows)`` is called after each chunk of
    distractors is ranked (a progress bar: +R1M is minutes).
    """
    db = np.asarray(db, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    scores = score_rows(db, queries)  # [n_db, nq]
    ranks = np.argsort(-scores, axis=0, kind="stable")
    n_db, nq = ranks.shape
    positions = np.empty((n_db, nq), dtype=np.int64)
    cols = np.arange(nq)[None, :]
    positions[ranks, np.broadcast_to(cols, ranks.shape)] = np.arange(n_db)[:, None]
    if distractors is None or len(distractors) == 0:
        return positions
    if distractors.shape[1] != db.shape[1]:
        raise DToPError(
            f"distractor descriptors are {distractors.shape[1]}-d but the model's are {db.shape[1]}-d: "
            "extract them with the same model"
        )
    for start in range(0, len(distractors), chunk):
        ds = np.sort(score_rows(distractors[start : start + chunk], queries), axis=0)  # ascending, [m, nq]
        m = ds.shape[0]
        for q in range(nq):
            # distractors scoring strictly higher rank before; ties go to the database image (lower index)
            positions[:, q] += m - np.searchsorted(ds[:, q], scores[:, q], side="right")
        if advance is not None:
            advance(m)
    return positions


def evaluate_descriptors(
    db: np.ndarray,
    queries: np.ndarray,
    gnd: Sequence[dict[str, Any]],
    distractors: np.ndarray | None = None,
    kappas: Sequence[int] = KAPPAS,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@k (percent) of given descriptors on revisitop ground truth (``advance``: as
    :func:`ranking_positions`)."""
    positions = ranking_positions(db, queries, distractors, advance=advance)
    return revisited_metrics(gnd, positions=positions, kappas=kappas)


def format_map(m: dict[str, float] | None) -> str:
    """``{'easy': 97.1, 'medium': 84.96, 'hard': 64.59}`` -> ``97.10 / 84.96 / 64.59`` (``—`` when empty)."""
    if not m:
        return "—"
    return " / ".join(f"{m[k]:.2f}" for k in SETUPS if k in m)
