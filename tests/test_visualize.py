"""The retrieval picture marks each result by its label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dtop_export.visualize import COLOURS, retrieval_grid


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
