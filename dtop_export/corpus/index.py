"""A faiss index over a shard folder, and search in it.

``build_corpus_index(folder, "corpus.faiss")`` adds the shards one at a time (never all descriptors in memory):
``flat`` is an exact ``IndexIDMap2(IndexFlatIP)``; ``ivfpq`` an ``IndexIDMap2(IndexIVFPQ)`` trained on a random
sample of the rows first (optionally re-ranked by 8-bit vectors: ``IndexRefine``). The faiss ids are the shard
rows' ``key``. Next to the index: ``corpus.faiss.json`` (type, parameters, the corpus's model and preprocessing
settings from its manifest, the index file's sha256) and ``corpus.faiss.ids.parquet`` (key -> id, path; the index's
sha256 in its metadata). :class:`CorpusIndex` loads the three, refuses them unless they belong together (row counts,
keys, the index's sha256), and answers ``search(queries, k)`` with ids and paths. faiss is imported inside the
functions.
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
IDS_META_KEY = b"dtop.index_sha256"  # the ids sidecar names the index it belongs to


def sidecar_paths(index_path: Path) -> tuple[Path, Path]:
    """(``X.faiss.json``, ``X.faiss.ids.parquet``) of index ``X.faiss``."""
    return index_path.with_name(index_path.name + ".json"), index_path.with_name(index_path.name + ".ids.parquet")


def _sample_rows(files: list[Path], rows: list[int], size: int, seed: int) -> np.ndarray:
    """``size`` descriptors drawn uniformly without replacement from all shards, read shard by shard."""
    from dtop_export.corpus.shards import read_shard

    total = sum(rows)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    out, start = [], 0
    for path, n in zip(files, rows):
        local = pick[(pick >= start) & (pick < start + n)] - start
        if len(local):
            out.append(read_shard(path, ("descriptor",))["descriptor"][local])
        start += n
    return np.ascontiguousarray(np.concatenate(out), np.float32)


IVFPQ_OPTIONS = ("nlist", "m", "nbits", "train_size", "refine", "nprobe")


def check_index_options(kind: str, **given: int | None) -> list[str]:
    """Refuse index options out of range (each must be >= 1 where given, ``refine`` >= 0, ``nbits`` 1..16); returns
    what the index type ignores (IVF-PQ options given for a flat index) as notes."""
    if kind not in INDEX_TYPES:
        raise DToPError(f"unknown index type {kind!r}: choose {', '.join(INDEX_TYPES)}")
    for name, value in given.items():
        low = 0 if name == "refine" else 1
        if value is not None and value < low:
            raise DToPError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    nbits = given.get("nbits")
    if nbits is not None and nbits > 16:
        raise DToPError(f"--nbits must be 1..16, got {nbits}")
    ignored = [f"--{k.replace('_', '-')}" for k in IVFPQ_OPTIONS if given.get(k) is not None]
    if kind == "flat" and ignored:
        return [f"note: a flat index is exact: {', '.join(ignored)} (IVF-PQ options, --type ivfpq) ignored"]
    return []


def ivfpq_training(n: int, dim: int, nlist: int | None, m: int | None, nbits: int | None,
                   train_size: int | None) -> tuple[int, int, int, int]:  # fmt: skip
    """(nlist, m, nbits, training rows) of an IVF-PQ over ``n`` descriptors: :func:`ivfpq_params`' defaults and
    checks, and ``train_size`` (default 64 per cell or 39 per PQ centroid, at most 200k unless ``nlist`` or the codes
    need more to train at all, never more than ``n``) checked as such."""
    from dtop_export.retrieval.search import ivfpq_params

    nlist, m, nbits = ivfpq_params(n, dim, nlist, m, nbits)
    need = max(nlist, 2**nbits)  # ivfpq_params checked n >= need: the default always trains
    size = train_size or min(n, max(min(max(64 * nlist, 39 * 2**nbits), 200_000), need))
    if size > n:
        raise DToPError(f"--train-size {size} is larger than the corpus ({n} descriptors)")
    if size < need:
        raise DToPError(f"--train-size {size} is too small: IVF-PQ with nlist={nlist} and {nbits}-bit codes trains "
                        f"on at least {need} vectors (raise it, or leave it out for the default)")  # fmt: skip
    return nlist, m, nbits, size


def _quiet_clustering(index: Any) -> None:
    """faiss prints a ``WARNING clustering`` line per k-means (one per PQ sub-quantiser: dozens) when a training
    set is below 39 points per centroid; the caller says it once instead."""
    index.cp.min_points_per_centroid = 1
    index.pq.cp.min_points_per_centroid = 1


def flat_index(dim: int, rows: int) -> Any:
    """An empty exact ``IndexIDMap2(IndexFlatIP(dim))`` whose storage for ``rows`` vectors is allocated up front: added
    shard by shard, faiss's vector doubled as it grew and held the old and the new copy at once (1M x 256: 1.56 GB
    for 1.02 GB of descriptors, up to 2x just past a doubling; allocated once: 1.32 GB)."""
    import faiss

    flat = faiss.IndexFlatIP(dim)
    flat.codes.resize(rows * dim * 4)
    flat.codes.resize(0)  # a std::vector keeps its capacity
    return faiss.IndexIDMap2(flat)


def build_corpus_index(
    folder: str | Path,
    output: str | Path,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int | None = None,
    train_size: int | None = None,
    refine: int | None = None,
    seed: int = 0,
    force: bool = False,
    advance: Callable[[int], None] | None = None,
    note: Callable[[str], None] | None = None,
    trained: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Index the shards of ``folder`` into ``output`` (+ sidecars, all written atomically); returns the sidecar.

    The folder is checked first (:func:`~dtop_export.corpus.integrity.verify_folder`, each shard's rows as they are
    added: :func:`~dtop_export.corpus.integrity.check_rows`); ``force`` indexes what can be indexed, with a note. IVF-PQ
    trains on ``train_size`` random rows (default: 64 per cell or 39 per PQ centroid, whichever is more, at most 200k or
    what ``nlist`` needs); ``nlist``/``m``/``nbits`` default as :func:`~dtop_export.retrieval.search.ivfpq_params`,
    ``nprobe`` to 16. ``refine`` > 0 re-ranks ``refine * k`` IVF-PQ candidates with 8-bit scalar-quantised vectors (N
    more bytes per image; recovers the exact top-k order that PQ alone blurs). ``advance(rows)`` is called after each
    shard is added; ``note(text)`` gets what the user should know (ignored options, a small training set, what ``force``
    let through); ``trained()`` is called once IVF-PQ's sampling and k-means are done (minutes at 1M: a progress bar of
    their own).
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtop_export.atomic import atomic_paths
    from dtop_export.corpus.integrity import check_rows, verify_folder
    from dtop_export.corpus.shards import read_shard
    from dtop_export.digest import file_sha256
    from dtop_export.retrieval.search import new_ivfpq

    say = note or (lambda _text: None)
    folder, output = Path(folder), Path(output)
    options = {"nlist": nlist, "m": m, "nbits": nbits, "train_size": train_size, "refine": refine, "nprobe": nprobe}
    for text in check_index_options(kind, **options):
        say(text)
    verified = verify_folder(folder, force)
    for text in verified.warnings:
        say(f"--force: {text}")
    files, rows, settings = verified.files, verified.rows, verified.settings
    n = verified.n_rows
    if n == 0:
        raise DToPError(f"{folder} holds no descriptors (every image was skipped)")
    dim = settings.descriptor_dim
    params: dict[str, Any] = {}
    if kind == "flat":
        index = flat_index(dim, n)
    else:
        nlist, m, nbits, size = ivfpq_training(n, dim, nlist, m, nbits, train_size)
        sample = _sample_rows(files, rows, size, seed)
        ivf = new_ivfpq(len(sample), dim, nlist, m, nbits, seed)
        _quiet_clustering(ivf)
        wanted = max(39 * nlist, 39 * 2**nbits)
        if len(sample) < wanted:
            say(f"note: training on {len(sample)} vectors, fewer than the {wanted} faiss suggests for nlist={nlist} "
                f"and {nbits}-bit codes (39 per centroid): recall may suffer; fine for a small corpus")  # fmt: skip
        ivf.nprobe = min(nprobe or 16, nlist)
        inner = ivf
        if refine:
            sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            inner = faiss.IndexRefine(ivf, sq)
            inner.k_factor = float(refine)
        inner.train(sample)
        if trained:
            trained()
        index = faiss.IndexIDMap2(inner)
        params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": ivf.nprobe, "train_size": len(sample)}
        params.update({"refine": refine} if refine else {})
    keys, ids, paths = [], [], []
    for path in files:
        shard = read_shard(path, ("key", "id", "path", "descriptor", "model_sha256"))
        for text in check_rows(shard, path, settings, force):
            say(f"--force: {text}")
        if len(shard["key"]):
            index.add_with_ids(np.ascontiguousarray(shard["descriptor"]), shard["key"])
        keys.append(shard["key"])
        ids += shard["id"]
        paths += shard["path"]
        if advance:
            advance(len(shard["key"]))
    all_keys = np.concatenate(keys)
    if len(np.unique(all_keys)) != len(all_keys):  # only under force can shards overlap
        raise DToPError(f"{folder} holds some keys twice (shards of another job): remove the foreign shards")
    meta_path, ids_path = sidecar_paths(output)
    # the index and its two sidecars go into place together (all or nothing), the index's sha256 taken first
    with atomic_paths([output, ids_path, meta_path]) as (tmp, ids_tmp, meta_tmp):
        faiss.write_index(index, str(tmp))
        index_sha = file_sha256(tmp)
        info = {
            "format": INDEX_FORMAT,
            "type": kind,
            "ntotal": int(index.ntotal),
            "dim": dim,
            "params": params,
            "index_sha256": index_sha,
            "shards": str(folder.resolve()),
            "corpus": {
                "model": settings.model, "model_sha256": settings.model_sha256, "preprocess": settings.preprocess,
                "image_size": settings.image_size, "scales": settings.scales,
                "checkpoint_sha256": settings.checkpoint_sha256,
            },
        }  # fmt: skip
        table = pa.table({"key": pa.array(all_keys, pa.int64()), "id": ids, "path": paths})
        table = table.replace_schema_metadata({IDS_META_KEY: index_sha.encode()})
        pq.write_table(table, ids_tmp)
        meta_tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


# queries from which a flat search takes matrix products (faiss-cpu 1.15's default: 128000, i.e. never; before 1.15:
# 20): one pass over the corpus for the batch, where the per-query scan reads it once per query (memory-bound). 300k x
# 256, 2 threads, medians of 5: 3 queries 0.053 -> 0.035 s, 10: 0.127 -> 0.048, 19: 0.259 -> 0.052 (same ids); 1 or 2
# queries: the scan is as fast (benchmarks/README.md)
BLAS_MIN_QUERIES = 3
TIE_WINDOW = 4096  # rows past k searched for equal scores at the cut (duplicates of one image in a corpus)
BLAS_DATABASE_ROWS = 65536  # faiss's default 1024 spends its time between tiny matrix products
# queries per product: faiss's 4096 x 65536 rows would hold a 1 GiB block of scores for a large batch; 1024: 256 MiB
# (300k x 256, 2000 queries, 2 threads: peak RSS 1138 -> 893 MB, 2.25 -> 2.72 s on a loaded machine)
BLAS_QUERY_ROWS = 1024


def tune_flat_search() -> None:
    """Have faiss score a batch of >= 3 queries against a flat index by matrix products over 64k-row blocks of the
    corpus: 1M x 256, 100 queries took 11.8 s with faiss-cpu 1.15's defaults, 1.5 s so (same ids; scores within
    4e-7), in products of at most 1024 queries (a 256 MiB block of scores). Process-wide faiss settings, only ever
    moved towards these values (safe from several threads)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, BLAS_MIN_QUERIES)
    faiss.cvar.distance_compute_blas_database_bs = max(faiss.cvar.distance_compute_blas_database_bs,
                                                       BLAS_DATABASE_ROWS)  # fmt: skip
    faiss.cvar.distance_compute_blas_query_bs = min(faiss.cvar.distance_compute_blas_query_bs, BLAS_QUERY_ROWS)


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
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        for suffix in (".json", ".ids.parquet"):  # one of an index's sidecars given: open that index
            index = self.path.with_name(self.path.name.removesuffix(suffix))
            if index != self.path and index.is_file() and self.path in sidecar_paths(index):
                self.path = index
                break
        if self.path.is_dir():  # the shard folder itself, one step early
            raise DToPError(
                f"{self.path} is a folder, not an index: index its shards with `dtop-export index {self.path} -o "
                f"{self.path.name}.faiss` and give that"
            )
        meta_path, ids_path = sidecar_paths(self.path)
        for p in (self.path, meta_path, ids_path):
            if not p.is_file():
                raise DToPError(f"{p} not found: build the index with `dtop-export index SHARD_DIR -o {self.path}`")
        rebuild = f"rebuild it with `dtop-export index SHARD_DIR -o {self.path} --force`"
        self.info = read_tagged_json(meta_path, INDEX_FORMAT, "a dtop-export index sidecar", rebuild)
        try:
            self.index = faiss.read_index(str(self.path))
        except RuntimeError as e:
            raise DToPError(f"{self.path} is not a readable faiss index: {str(e).splitlines()[0]}") from e
        try:
            table = pq.read_table(ids_path)
            keys = table.column("key").to_numpy()
            ids, paths = table.column("id").combine_chunks(), table.column("path").combine_chunks()
            owner = (table.schema.metadata or {}).get(IDS_META_KEY, b"").decode()
        except Exception as e:  # noqa: BLE001 - any reader failure: the sidecar is damaged
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DToPError(f"{ids_path} is damaged or not an ids sidecar ({first}): {rebuild}") from e
        self._check_sidecars(ids_path, len(keys), owner, rebuild)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        if not np.array_equal(self.keys, np.sort(self._index_ids())):
            raise DToPError(f"{ids_path} lists other keys than {self.path} holds: {rebuild}")
        # Arrow string arrays, not Python strings: 1M rows of GLDv2-like ids and paths took ~500 MB as objects
        self.ids, self.paths = ids.take(order), paths.take(order)
        del table, ids, paths
        pa.default_memory_pool().release_unused()  # the parquet decode's buffers (~2x the columns) back to the OS
        tune_flat_search()  # once per opened index, not per search (serve's requests share the process)

    def _check_sidecars(self, ids_path: Path, rows: int, owner: str, rebuild: str) -> None:
        """The three files are one index: the same row count everywhere, and (indexes built since the sidecars
        record it) the index file's sha256 in both sidecars."""
        from dtop_export.digest import file_sha256

        counts = {"the index": int(self.index.ntotal), "its .json": int(self.info.get("ntotal", -1)), "its ids": rows}
        if len(set(counts.values())) != 1:
            found = ", ".join(f"{k} {v}" for k, v in counts.items())
            raise DToPError(f"{self.path} and its sidecars disagree on the row count ({found}): {rebuild}")
        recorded = self.info.get("index_sha256")
        if recorded is not None:
            actual = file_sha256(self.path)
            if actual != recorded:
                raise DToPError(f"{self.path} is not the index its .json sidecar describes: {rebuild}")
            if owner != recorded:
                raise DToPError(f"{ids_path} belongs to another index than {self.path}: {rebuild}")

    def _index_ids(self) -> np.ndarray:
        import faiss

        index = faiss.downcast_index(self.index)
        if not hasattr(index, "id_map"):
            raise DToPError(f"{self.path} is a faiss index without ids: not one `dtop-export index` wrote")
        return faiss.vector_to_array(index.id_map).astype(np.int64)

    def _search_params(self, nprobe: int | None, refine: int | None) -> Any:
        """faiss parameters of one search (IVF-PQ: ``nprobe``, ``refine``; stored values where not given), passed
        with the call rather than set on the shared index: concurrent searches (serve's threads) with different
        values each get their own."""
        import faiss

        inner = faiss.downcast_index(self.index.index)
        if refine is not None and not isinstance(inner, faiss.IndexRefine):
            raise DToPError(f"{self.path} was built without --refine: rebuild it with `dtop-export index --refine 4`")
        if self.info["type"] != "ivfpq":
            return None  # a flat index is exact: nothing to set
        params = self.info.get("params", {})
        nprobe = nprobe if nprobe is not None else params.get("nprobe")
        ivf = faiss.SearchParametersIVF()
        ivf.nprobe = int(nprobe) if nprobe is not None else int(faiss.extract_index_ivf(self.index).nprobe)
        if ivf.nprobe < 1:
            raise DToPError(f"--nprobe must be >= 1, got {nprobe}")
        if not isinstance(inner, faiss.IndexRefine):
            return ivf
        if refine is not None and refine < 1:
            raise DToPError(f"--refine must be >= 1 at search time, got {refine}")
        both = faiss.IndexRefineSearchParameters()
        both.k_factor = float(refine) if refine is not None else float(params.get("refine") or inner.k_factor)
        both.base_index_params = ivf
        both.keep_alive = ivf  # the SWIG object holds a raw pointer to the IVF parameters: keep them with it
        return both

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, refine: int | None = None
    ) -> list[list[Hit]]:
        """The top-``k`` corpus images of each query descriptor [nq, dim], best first. ``nprobe`` and ``refine``
        (IVF-PQ indexes) override the stored values for this search; ``refine`` needs an index built with it."""
        q = np.ascontiguousarray(np.asarray(queries, np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DToPError(f"query descriptors are {list(q.shape)}; the index holds {self.dim}-d descriptors")
        if k < 1:
            raise DToPError(f"-k must be >= 1, got {k}")
        search_params = self._search_params(nprobe, refine)
        out = []
        for srow, krow in self._ranked(q, k, search_params):
            hits = []
            for rank, (s, key) in enumerate(zip(srow, krow), start=1):
                j = int(np.searchsorted(self.keys, key))
                hits.append(Hit(rank, float(s), int(key), self.ids[j].as_py(), self.paths[j].as_py()))
            out.append(hits)
        return out

    def _ranked(self, q: np.ndarray, k: int, params: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, the top-``k`` (scores, keys), equal scores in key order: which of several equal-scoring rows
        (duplicate images) make the top ``k`` is the lowest keys, whatever the batch, the faiss path or the
        index type chose (faiss keeps the last rows it met). A query whose ``k``-th score continues past the
        searched window is searched again, wider (up to ``k`` + :data:`TIE_WINDOW` rows)."""
        n = int(self.index.ntotal)
        width = min(k + 1, max(n, 1))  # one past k: a tie across the cut shows as the (k+1)-th score
        scores, keys = self.index.search(q, width, params=params)
        rows = {i: (scores[i], keys[i]) for i in range(len(q))}
        open_rows = list(rows)
        while open_rows and width < min(n, k + TIE_WINDOW):
            open_rows = [i for i in open_rows if _tie_reaches_the_end(*rows[i], k)]
            if not open_rows:
                break
            width = min(n, k + TIE_WINDOW, 2 * width)
            wider = self.index.search(q[open_rows], width, params=params)
            rows.update({i: (wider[0][j], wider[1][j]) for j, i in enumerate(open_rows)})
        ranked = []
        for i in range(len(q)):
            s, key = rows[i]
            found = key >= 0
            s, key = s[found], key[found]
            order = np.lexsort((key, -s))[:k]  # score descending, then key ascending
            ranked.append((s[order], key[order]))
        return ranked


def _tie_reaches_the_end(scores: np.ndarray, keys: np.ndarray, k: int) -> bool:
    """The ``k``-th best score is also the last one searched (a row beyond the window may share it)."""
    return len(scores) > k and keys[-1] >= 0 and scores[k - 1] == scores[-1]


def describe_index(path: Path) -> dict[str, Any]:
    """``info`` of an index: its ``.json`` sidecar (type, parameters, corpus settings), file sizes, and whether the
    index and its sidecars belong together (:class:`CorpusIndex` opens them)."""
    meta_path, ids_path = sidecar_paths(path)
    if not meta_path.is_file():
        raise DToPError(f"{path} has no {meta_path.name} sidecar: not an index `dtop-export index` wrote")
    info = read_tagged_json(meta_path, INDEX_FORMAT, "a dtop-export index sidecar", "rebuild the index")
    try:
        CorpusIndex(path)
        check = "ok (index, .json and ids agree)"
    except DToPError as e:
        check = f"FAIL: {e}"
    sizes = {p.name: f"{p.stat().st_size / 2**20:.2f} MiB" for p in (path, meta_path, ids_path) if p.is_file()}
    return {
        "kind": "faiss index (dtop-export index)",
        "type": info.get("type"),
        "vectors": info.get("ntotal"),
        "dim": info.get("dim"),
        "params": info.get("params") or "none (exact search)",
        "corpus": {k: v for k, v in info.get("corpus", {}).items() if k != "preprocess"}
        | {"shards": info.get("shards")},
        "files": sizes,
        "check": check,
    }
