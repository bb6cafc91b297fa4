"""Flat (exact) search of a batch of queries: faiss's per-query scan vs matrix products, by batch size.

Why: faiss-cpu 1.15 scans the corpus once per query unless a batch reaches ``distance_compute_blas_threshold``
(128000 there); :func:`dtop_export.corpus.index.tune_flat_search` lowers it to
:data:`~dtop_export.corpus.index.BLAS_MIN_QUERIES`. This measures both paths on random unit descriptors (the same
ids are checked) so the threshold rests on a number from this machine::

    python benchmarks/flat_search.py --rows 300000 --dim 256 --json results/flat_search.json

Prints a table (median seconds per batch after one warm-up, the scan/products ratio) and, with ``--json``, writes it
with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def measure(index: object, queries: np.ndarray, k: int, threshold: int, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``repeats`` searches (after one warm-up) with faiss's BLAS threshold at ``threshold``."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = threshold
    _, ids = index.search(queries, k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), ids


def main() -> None:
    import faiss

    from dtop_export.bench.harness import machine_info
    from dtop_export.corpus.index import BLAS_DATABASE_ROWS, BLAS_MIN_QUERIES, BLAS_QUERY_ROWS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000, help="corpus descriptors (default 300000)")
    ap.add_argument("--dim", type=int, default=256, help="descriptor size (default 256: the small preset's N)")
    ap.add_argument("--batches", default="1,2,3,5,10,19,20,100", help="query batch sizes, comma-separated")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(args.dim)
    index.add(x)
    faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_ROWS
    faiss.cvar.distance_compute_blas_query_bs = BLAS_QUERY_ROWS
    rows = []
    print(f"flat IP index {args.rows} x {args.dim}, k={args.k}, {faiss.omp_get_max_threads()} threads")
    print("| queries | per-query scan (s) | matrix products (s) | scan / products | same ids |")
    print("|---:|---:|---:|---:|:---|")
    for nq in (int(b) for b in args.batches.split(",")):
        q = x[rng.choice(args.rows, nq, replace=False)] + 0.01 * rng.standard_normal((nq, args.dim), dtype=np.float32)
        scan, ids_scan = measure(index, q, args.k, 1 << 30, args.repeats)
        blas, ids_blas = measure(index, q, args.k, 1, args.repeats)
        same = bool(np.array_equal(ids_scan, ids_blas))
        rows.append({"queries": nq, "scan_s": scan, "products_s": blas, "ratio": scan / blas, "same_ids": same})
        print(f"| {nq} | {scan:.4f} | {blas:.4f} | {scan / blas:.2f} | {same} |", flush=True)
    print(f"tune_flat_search() takes products from {BLAS_MIN_QUERIES} queries")
    if args.json:
        report = {"rows": rows, "corpus": [args.rows, args.dim], "k": args.k, "threads": faiss.omp_get_max_threads(),
                  "threshold": BLAS_MIN_QUERIES, "machine": machine_info()}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
