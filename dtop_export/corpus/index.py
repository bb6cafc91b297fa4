"""A faiss index over a shard folder, and search in it.

``build_corpus_index(folder, "corpus.faiss")`` adds the shards one at a time (never all descriptors in memory):
``flat`` is an exact ``IndexIDMap2(IndexFlatIP)``; ``ivfpq`` an ``IndexIDMap2(IndexIVFPQ)`` trained on a random
sample of the rows first (optionally re-ranked by 8-bit vectors: ``IndexRefine``). The faiss ids are the shard
rows' ``key``. Next to the index: ``corpus.faiss.json`` (type, parameters, the corpus's model and preprocessing
settings from its manifest) and ``corpus.faiss.ids.parquet`` (key -> id, path). :class:`CorpusIndex` loads the
three and answers ``search(queries, k)`` with ids and paths. faiss is imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.atomic import read_tagged_json
from dtop_export.errors import DToPError

INDEX_FORMAT = "dtop-export/faiss-index"
INDEX_TYPES = ("flat", "ivfpq")


def sidecar_paths(index_path: Path) -> tuple[Path, Path]:
    """(``X.faiss.json``, ``X.faiss.ids.parquet``) of index ``X.faiss``."""
    return index_path.with_name(index_path.name + ".json"), index_path.with_name(index_path.name + ".ids.parquet")


def _sample_rows(folder: Path, rows: list[int], size: int, seed: int) -> np.ndarray:
    """``size`` descriptors drawn uniformly without replacement from all shards, read shard by shard."""
    from dtop_export.corpus.shards import read_shard, shard_files

    total = sum(rows)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    out, start = [], 0
    for path, n in zip(shard_files(folder), rows):
        local = pick[(pick >= start) & (pick < start + n)] - start
        if len(local):
            out.append(read_shard(path, ("descriptor",))["descriptor"][local])
        start += n
    return np.ascontiguousarray(np.concatenate(out), np.float32)


def build_corpus_index(
    folder: str | Path,
    output: str | Path,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int = 32,
    train_size: int | None = None,
    refine: int = 0,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Index the shards of ``folder`` into ``output`` (+ sidecars, all written atomically); returns the sidecar.

    IVF-PQ trains on ``train_size`` random rows (default: 64 per cell or 39 per PQ centroid, whichever is more,
    at most 200k); ``nlist``/``m``/``nbits`` default as :func:`~dtop_export.retrieval.search.ivfpq_params`.
    ``refine`` > 0 re-ranks ``refine * k`` IVF-PQ candidates with 8-bit scalar-quantised vectors (N more bytes per
    image; recovers the exact top-k order that PQ alone blurs).
    ``advance(rows)`` is called after each shard is added.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtop_export.atomic import atomic_path
    from dtop_export.corpus.shards import read_manifest, read_shard, shard_files
    from dtop_export.retrieval.search import ivfpq_params, new_ivfpq

    folder, output = Path(folder), Path(output)
    if kind not in INDEX_TYPES:
        raise DToPError(f"unknown index type {kind!r}: choose {', '.join(INDEX_TYPES)}")
    files = shard_files(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("status") != "complete":
        raise DToPError(f"{folder} is not a complete embedding (no complete manifest.json): re-run `dtop-export embed`")
    rows = [pq.read_metadata(p).num_rows for p in files]
    n = sum(rows)
    if n == 0:
        raise DToPError(f"{folder} holds no descriptors (every image was skipped)")
    dim = int(manifest["settings"]["descriptor_dim"])
    params: dict[str, Any] = {}
    if refine < 0:
        raise DToPError(f"--refine must be >= 0, got {refine}")
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist, m, nbits = ivfpq_params(n, dim, nlist, m, nbits)
        size = train_size or min(n, max(64 * nlist, 39 * 2**nbits), 200_000)
        if size > n:
            raise DToPError(f"--train-size {size} is larger than the corpus ({n} descriptors)")
        sample = _sample_rows(folder, rows, size, seed)
        ivf = new_ivfpq(len(sample), dim, nlist, m, nbits, seed)
        ivf.nprobe = min(nprobe, nlist)
        inner = ivf
        if refine:
            sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            inner = faiss.IndexRefine(ivf, sq)
            inner.k_factor = float(refine)
        inner.train(sample)
        index = faiss.IndexIDMap2(inner)
        params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": ivf.nprobe, "train_size": len(sample)}
        params.update({"refine": refine} if refine else {})
    keys, ids, paths = [], [], []
    for path in files:
        shard = read_shard(path)
        if len(shard["key"]):
            index.add_with_ids(np.ascontiguousarray(shard["descriptor"]), shard["key"])
        keys.append(shard["key"])
        ids += shard["id"]
        paths += shard["path"]
        if advance:
            advance(len(shard["key"]))
    meta_path, ids_path = sidecar_paths(output)
    info = {
        "format": INDEX_FORMAT,
        "type": kind,
        "ntotal": int(index.ntotal),
        "dim": dim,
        "params": params,
        "shards": str(folder.resolve()),
        "corpus": {k: manifest["settings"][k] for k in ("model", "model_sha256", "preprocess", "image_size", "scales")}
        | {"checkpoint_sha256": manifest["settings"].get("checkpoint_sha256", "")},
    }
    table = pa.table({"key": pa.array(np.concatenate(keys), pa.int64()), "id": ids, "path": paths})
    with atomic_path(ids_path) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(output) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    key: int
    id: str
    path: str


class CorpusIndex:
    """An index written by :func:`build_corpus_index`, loaded for search."""

    def __init__(self, path: str | Path) -> None:
        import faiss
        import pyarrow.parquet as pq

        self.path = Path(path)
        for suffix in (".json", ".ids.parquet"):  # one of an index's sidecars given: open that index
            index = self.path.with_name(self.path.name.removesuffix(suffix))
            if index != self.path and index.is_file() and self.path in sidecar_paths(index):
                self.path = index
                break
        meta_path, ids_path = sidecar_paths(self.path)
        for p in (self.path, meta_path, ids_path):
            if not p.is_file():
                raise DToPError(f"{p} not found: build the index with `dtop-export index SHARD_DIR -o {self.path}`")
        self.info = read_tagged_json(
            meta_path,
            INDEX_FORMAT,
            "a dtop-export index sidecar",
            f"rebuild it with `dtop-export index ... -o {self.path}`",
        )
        try:
            self.index = faiss.read_index(str(self.path))
        except RuntimeError as e:
            raise DToPError(f"{self.path} is not a readable faiss index: {str(e).splitlines()[0]}") from e
        table = pq.read_table(ids_path)
        order = np.argsort(table.column("key").to_numpy(), kind="stable")
        self.keys = table.column("key").to_numpy()[order]
        self.ids = np.asarray(table.column("id").to_pylist(), dtype=object)[order]
        self.paths = np.asarray(table.column("path").to_pylist(), dtype=object)[order]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, refine: int | None = None
    ) -> list[list[Hit]]:
        """The top-``k`` corpus images of each query descriptor [nq, dim], best first. ``nprobe`` and ``refine``
        (IVF-PQ indexes) override the stored values for this search; ``refine`` needs an index built with it."""
        import faiss

        q = np.ascontiguousarray(np.asarray(queries, np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DToPError(f"query descriptors are {list(q.shape)}; the index holds {self.dim}-d descriptors")
        if k < 1:
            raise DToPError(f"-k must be >= 1, got {k}")
        params = self.info.get("params", {})
        nprobe = nprobe if nprobe is not None else params.get("nprobe")
        refine = refine if refine is not None else params.get("refine")
        if nprobe is not None and self.info["type"] == "ivfpq":
            if nprobe < 1:
                raise DToPError(f"--nprobe must be >= 1, got {nprobe}")
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        if refine is not None:
            inner = faiss.downcast_index(self.index.index)
            if not isinstance(inner, faiss.IndexRefine):
                raise DToPError(
                    f"{self.path} was built without --refine: rebuild it with `dtop-export index --refine 4`"
                )
            if refine < 1:
                raise DToPError(f"--refine must be >= 1 at search time, got {refine}")
            inner.k_factor = float(refine)
        scores, keys = self.index.search(q, min(k, max(int(self.index.ntotal), 1)))
        out = []
        for srow, krow in zip(scores, keys):
            hits = []
            for rank, (s, key) in enumerate(((s, key) for s, key in zip(srow, krow) if key >= 0), start=1):
                j = int(np.searchsorted(self.keys, key))
                hits.append(Hit(rank, float(s), int(key), str(self.ids[j]), str(self.paths[j])))
            out.append(hits)
        return out
