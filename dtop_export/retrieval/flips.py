"""Where an engine's ΔmAP comes from: the positive/negative pairs whose order its similarity error flipped, how far
apart the reference placed them, and whether they were near-ties (closer than :data:`NEAR_TIE_SIGMAS` rms of that
error: any engine with that error flips them by chance, so on a small query set the ΔmAP they cause measures the
set's resolution, not the engine). Numpy only; the parity comparator reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtop_export.retrieval.metrics import SETUPS, setup_gnd

SETUP_LETTERS = {"easy": "E", "medium": "M", "hard": "H"}


@dataclass
class RankSwaps:
    """Where one setup's ΔmAP comes from: the queries whose order of a positive and a non-positive database
    image flipped, and how far apart the reference put the flipped pairs (query·db similarity)."""

    queries: int  # queries with at least one flipped positive/non-positive pair
    pairs: int  # flipped pairs, all queries
    largest_gap: float  # the reference's largest similarity gap among the flipped pairs

    def all_near_ties(self, error_rms: float) -> bool:
        """At least one pair flipped and every one was closer in the reference than :data:`NEAR_TIE_SIGMAS` x
        the engine's similarity error (rms)."""
        return bool(self.pairs) and bool(np.isfinite(error_rms)) and self.largest_gap <= NEAR_TIE_SIGMAS * error_rms

    def near_tie_label(self, setup: str, error_rms: float) -> str:
        """E.g. ``H: 1 pair in 1 query, gap <= 8.6e-04 < 3 x 5.8e-04 rms``."""
        return (
            f"{SETUP_LETTERS.get(setup, setup)}: {self.pairs} pair{'' if self.pairs == 1 else 's'} in {self.queries} "
            f"quer{'y' if self.queries == 1 else 'ies'}, gap <= {self.largest_gap:.1e} < {NEAR_TIE_SIGMAS:g} x "
            f"{error_rms:.1e} rms"
        )

    def describe(self, error_rms: float) -> str:
        """E.g. ``1 query reordered, 1 positive/negative pair flipped, at most 8.6e-04 apart in the reference's
        similarity; the engine's similarity error is 5.8e-04 rms: near-ties, ...``; empty when nothing flipped."""
        if not self.pairs:
            return ""
        text = (
            f"{self.queries} quer{'y' if self.queries == 1 else 'ies'} reordered, {self.pairs} "
            f"positive/negative pair{'' if self.pairs == 1 else 's'} flipped, at most {self.largest_gap:.1e} apart in "
            f"the reference's similarity; the engine's similarity error is {error_rms:.1e} rms"
        )
        if self.all_near_ties(error_rms):
            text += ": near-ties, flipped by chance at this error"
        return text


# Flipped pairs no further apart than this many rms of the engine's similarity error are near-ties: any
# engine with that error flips them by chance, so the ΔmAP they cause measures the query set's resolution.
NEAR_TIE_SIGMAS = 3.0


def rank_swaps(
    reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray], gnd: Sequence[dict[str, Any]]
) -> tuple[float, dict[str, RankSwaps]]:
    """(rms of candidate − reference query·db similarity, per setup :class:`RankSwaps`)."""
    (rdb, rq), (db, q) = reference, candidate
    s_ref = rq.astype(np.float64) @ rdb.astype(np.float64).T  # [queries, database]
    s_new = q.astype(np.float64) @ db.astype(np.float64).T
    error_rms = float(np.sqrt(np.mean((s_new - s_ref) ** 2))) if s_ref.size else float("nan")
    out = {}
    for setup in SETUPS:
        queries = pairs = 0
        largest = 0.0
        for i, g in enumerate(setup_gnd(gnd, setup)):
            pos = np.asarray(g["ok"], dtype=np.int64)
            if not len(pos):
                continue
            neg = np.setdiff1d(np.arange(rdb.shape[0]), np.concatenate([pos, np.asarray(g["junk"], dtype=np.int64)]))
            gap_ref = s_ref[i, pos][:, None] - s_ref[i, neg][None, :]
            gap_new = s_new[i, pos][:, None] - s_new[i, neg][None, :]
            flipped = np.sign(gap_ref) != np.sign(gap_new)
            if flipped.any():
                queries += 1
                pairs += int(flipped.sum())
                largest = max(largest, float(np.abs(gap_ref[flipped]).max()))
        out[setup] = RankSwaps(queries, pairs, largest)
    return error_rms, out
