"""The retrieval picture marks each result by its label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dtop_export.retrieval.visualize import COLOURS, retrieval_grid


def test_retrieval_grid_colours_results(tmp_path: Path) -> None:
    q = [Image.new("RGB", (80, 60), (0, 0, 0)), Image.new("L", (50, 90), 128)]
    res = [[Image.new("RGB", (40, 40))] * 3, [Image.new("RGB", (40, 40))] * 3]
    lab = [["positive", "junk", "negative"], ["negative", "positive", "positive"]]
    out = retrieval_grid(q, res, lab, tmp_path / "r.png", tile=100, border=5)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (24 + 4 + 2 * (100 + 18 + 4), 4 * (100 + 4) + 4, 3)
    y0 = 24
    for row, labels in enumerate(lab):
        y = y0 + row * (100 + 18 + 4) + 1  # inside the top border of each tile
        assert tuple(img[y, 4 + 50]) == COLOURS["query"]
        for j, label in enumerate(labels):
            x = 4 + (j + 1) * 104 + 50
            assert tuple(img[y, x]) == COLOURS[label], (row, j)
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_pick_queries_spreads_over_the_ap_ranking() -> None:
    from dtop_export.retrieval.visualize import pick_queries

    aps = [50.0, None, 100.0, 10.0, 75.0, 0.0]
    assert pick_queries(aps, 3) == [2, 0, 5]  # best, middle, worst; queries without positives left out
    assert pick_queries(aps, 10) == [2, 4, 0, 3, 5]
    assert pick_queries([None, None], 3) == []


def test_retrieval_picture_marks_ground_truth(tmp_path: Path) -> None:
    """Descriptors built from the ground truth: every query's top results are its positives (green); a
    query whose descriptor is flipped ranks its positives last, so its row is red."""
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.metrics import setup_gnd
    from dtop_export.retrieval.visualize import retrieval_picture

    ds = resolve_dataset("sample", tmp_path / "data")
    gnd = setup_gnd(ds.gnd, "medium")
    nq = ds.n_queries
    q = np.eye(nq, dtype=np.float32)
    db = np.zeros((ds.n_images, nq), dtype=np.float32)
    for i, g in enumerate(gnd):
        db[g["ok"], i] = 1.0
    q[0] *= -1  # query 0 now prefers everything but its positives
    out = retrieval_picture(ds, db, q, tmp_path / "r.png", n_queries=nq, k=3, tile=60)
    img = np.asarray(Image.open(out).convert("RGB"))
    row_h = 60 + 18 + 4
    rows = (img.shape[0] - 24 - 4) // row_h
    worst = None
    for row in range(rows):
        y = 24 + row * row_h + 1
        tiles = [tuple(img[y, 4 + j * 64 + 30]) for j in range(4)]
        assert tiles[0] == COLOURS["query"]
        if tiles[1:] != [COLOURS["positive"]] * 3:
            worst = row
            assert COLOURS["positive"] not in tiles[1:]
    assert worst == rows - 1  # only the flipped query fails, and it is listed last (lowest AP)
