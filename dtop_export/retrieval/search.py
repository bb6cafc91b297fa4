"""Nearest-neighbour search over L2-normalised descriptors (inner product = cosine similarity).

``exact`` uses faiss-cpu's ``IndexFlatIP`` (numpy matrix products when faiss is not installed); ``ivfpq``
uses ``IndexIVFPQ`` with an inner-product quantiser for large sets (millions of descriptors), trading a
little recall for memory and speed. faiss is imported inside the functions that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dtop_export.errors import DToPError

METHODS = ("exact", "ivfpq")


def have_faiss() -> bool:
    """True when faiss can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2:
        raise DToPError(f"{name} must be a matrix [n, dim], got shape {list(x.shape)}")
    return x


@dataclass
class SearchIndex:
    """A built index: ``search(queries, k) -> (scores [nq, k], ids [nq, k])``, best first.

    Rows with fewer than ``k`` hits (IVF probes that found too few) are padded with id -1 and score -inf.
    """

    method: str
    dim: int
    ntotal: int
    backend: str
    _index: Any = None
    _data: np.ndarray | None = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_f32(queries, "queries")
        if q.shape[1] != self.dim:
            raise DToPError(f"queries are {q.shape[1]}-d but the index holds {self.dim}-d descriptors")
        k = int(k)
        if k < 1:
            raise DToPError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        if self._index is not None:
            scores, ids = self._index.search(q, kk)
            scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        else:
            assert self._data is not None
            scores_all = q @ self._data.T
            ids = np.argsort(-scores_all, axis=1, kind="stable")[:, :kk]
            scores = np.take_along_axis(scores_all, ids, axis=1)
        if kk < k:
            pad = k - kk
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids.astype(np.int64)


def build_index(
    database: np.ndarray,
    method: str = "exact",
    *,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int = 16,
    use_faiss: bool | None = None,
    seed: int = 0,
) -> SearchIndex:
    """Index ``database`` [n, dim] for inner-product search.

    ``exact``: faiss ``IndexFlatIP`` (numpy if faiss is missing or ``use_faiss=False``).
    ``ivfpq``: faiss ``IndexIVFPQ`` trained on the database: ``nlist`` coarse cells (default ≈ 4·√n, at most
    n/39), ``m`` sub-quantisers (must divide dim; default dim/8, at most 64) of ``nbits`` bits (default 8,
    fewer below ~10k vectors), ``nprobe`` cells visited per query.
    """
    db = _as_f32(database, "database")
    n, dim = db.shape
    if method not in METHODS:
        raise DToPError(f"unknown search method {method!r}: choose {', '.join(METHODS)}")
    want_faiss = have_faiss() if use_faiss is None else use_faiss
    if method == "exact":
        if not want_faiss:
            return SearchIndex("exact", dim, n, "numpy", _data=db)
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(db)
        return SearchIndex("exact", dim, n, "faiss", _index=index)

    if not want_faiss:
        raise DToPError("IVF-PQ search needs faiss: pip install faiss-cpu")
    index = new_ivfpq(n, dim, nlist, m, nbits, seed)
    index.train(db)
    index.add(db)
    index.nprobe = min(nprobe, index.nlist)
    return SearchIndex("ivfpq", dim, n, "faiss", _index=index)


def ivfpq_params(n: int, dim: int, nlist: int | None, m: int | None, nbits: int | None) -> tuple[int, int, int]:
    """(nlist, m, nbits) for an IVF-PQ over ``n`` vectors of ``dim``: the defaults of :func:`build_index` for the
    ones not given, checked (m divides dim; enough vectors to train), as one-line errors."""
    nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per cell
    m = m or min(64, max(1, dim // 8))
    if nbits is None:  # 8-bit codes need 39·256 training points; fewer bits for smaller sets
        nbits = int(min(8, max(4, np.floor(np.log2(max(n // 39, 1))))))
    if nlist < 1 or m < 1 or not 1 <= nbits <= 16:
        raise DToPError(f"IVF-PQ: nlist and m must be >= 1 and nbits 1..16, got {nlist}, {m}, {nbits}")
    if dim % m:
        raise DToPError(f"IVF-PQ: m={m} sub-quantisers must divide the descriptor dimension {dim}")
    min_train = max(nlist, 2**nbits)
    if n < min_train:
        raise DToPError(
            f"IVF-PQ needs at least {min_train} vectors to train (nlist={nlist}, {nbits}-bit codes), "
            f"got {n}: use exact (flat) search"
        )
    return nlist, m, nbits


def new_ivfpq(n: int, dim: int, nlist: int | None, m: int | None, nbits: int | None, seed: int = 0) -> Any:
    """An untrained faiss ``IndexIVFPQ`` (inner product) sized by :func:`ivfpq_params` for ``n`` training vectors."""
    import faiss

    nlist, m, nbits = ivfpq_params(n, dim, nlist, m, nbits)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    return index


def knn(
    database: np.ndarray, queries: np.ndarray, k: int = 10, method: str = "exact", **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database neighbours of each query: (scores [nq, k], ids [nq, k]), best first."""
    return build_index(database, method, **options).search(queries, k)
