"""Retrieval pictures: queries and their top-k results, with correct / junk / wrong marked by colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dtop_export.atomic import atomic_path

if TYPE_CHECKING:
    from dtop_export.retrieval.datasets import RevisitopDataset

COLOURS = {
    "positive": (46, 160, 67),
    "junk": (230, 160, 20),
    "negative": (215, 40, 40),
    "query": (40, 90, 200),
    "result": (120, 120, 120),  # no ground truth (search results)
}
LEGEND = "blue: query   green: correct   orange: junk (ignored)   red: wrong"


def _tile(img: Image.Image, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    thumb = ImageOps.contain(img.convert("RGB"), (size - 2 * border, size - 2 * border))
    tile = Image.new("RGB", (size, size), colour)
    inner = Image.new("RGB", (size - 2 * border, size - 2 * border), (255, 255, 255))
    inner.paste(thumb, ((inner.width - thumb.width) // 2, (inner.height - thumb.height) // 2))
    tile.paste(inner, (border, border))
    return tile


def retrieval_grid(
    queries: Sequence[Image.Image],
    results: Sequence[Sequence[Image.Image]],
    labels: Sequence[Sequence[str]],
    output: str | Path,
    tile: int = 160,
    border: int = 6,
    captions: Sequence[str] | None = None,
    result_captions: Sequence[Sequence[str]] | None = None,
    legend: str = LEGEND,
) -> Path:
    """One row per query: the query, then its ranked results. ``labels[i][j]`` is positive|junk|negative (or
    ``result`` without ground truth); ``result_captions[i][j]`` replaces the ``#rank label`` text under a result.

    Writes a PNG atomically and returns its path.
    """
    if not (len(queries) == len(results) == len(labels)):
        raise ValueError("queries, results and labels must have the same length")
    k = max((len(r) for r in results), default=0)
    caption_h = 18
    gap = 4
    width = (k + 1) * (tile + gap) + gap
    height = len(queries) * (tile + caption_h + gap) + gap + 24
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), legend, fill=(30, 30, 30))
    y = 24
    for i, (q, res, lab) in enumerate(zip(queries, results, labels)):
        canvas.paste(_tile(q, tile, COLOURS["query"], border), (gap, y))
        draw.text((gap, y + tile + 2), captions[i] if captions else f"query {i}", fill=(30, 30, 30))
        for j, (img, label) in enumerate(zip(res, lab)):
            x = gap + (j + 1) * (tile + gap)
            canvas.paste(_tile(img, tile, COLOURS.get(label, COLOURS["negative"]), border), (x, y))
            text = result_captions[i][j] if result_captions else f"#{j + 1} {label}"
            draw.text((x, y + tile + 2), text, fill=COLOURS.get(label, (0, 0, 0)))
        y += tile + caption_h + gap
    output = Path(output)
    with atomic_path(output) as tmp:
        canvas.save(tmp, format="PNG")
    return output


def pick_queries(aps: Sequence[float | None], n: int) -> list[int]:
    """``n`` query indices spread over the AP ranking (best first), so a picture shows hits and misses."""
    scored = [(a, i) for i, a in enumerate(aps) if a is not None]
    if not scored or n < 1:
        return []
    scored.sort(key=lambda t: (-t[0], t[1]))
    if n >= len(scored):
        return [i for _, i in scored]
    picks = sorted({round(j * (len(scored) - 1) / (n - 1)) for j in range(n)} if n > 1 else {0})
    return [scored[p][1] for p in picks]


def retrieval_picture(
    dataset: RevisitopDataset,
    db: np.ndarray,
    queries: np.ndarray,
    output: str | Path,
    n_queries: int = 5,
    k: int = 5,
    setup: str = "medium",
    crop_queries: bool = True,
    tile: int = 160,
) -> Path:
    """PNG of ``n_queries`` queries of ``dataset`` (spread from best to worst AP in ``setup``) and their
    top-``k`` results from descriptors ``db`` [n_db, N] and ``queries`` [n_q, N], each result marked
    correct / junk / wrong by the revisitop ground truth of that setup."""
    from dtop_export.preprocess import crop_bbox, load_image
    from dtop_export.retrieval.metrics import rank_database, revisited_metrics, setup_gnd

    if db.shape[0] != dataset.n_images or queries.shape[0] != dataset.n_queries:
        raise ValueError("descriptors do not match the data set")
    ranks = rank_database(db, queries)  # [n_db, n_q]
    aps = revisited_metrics(dataset.gnd, ranks=ranks)["aps"][setup]
    gnd = setup_gnd(dataset.gnd, setup)
    q_imgs, results, labels, captions = [], [], [], []
    for qi in pick_queries(aps, n_queries):
        img = load_image(dataset.queries[qi])
        bbx = dataset.bboxes[qi]
        q_imgs.append(crop_bbox(img, bbx) if crop_queries and bbx is not None else img)
        ok, junk = set(map(int, gnd[qi]["ok"])), set(map(int, gnd[qi]["junk"]))
        top = [int(j) for j in ranks[:k, qi]]
        results.append([load_image(dataset.images[j]) for j in top])
        labels.append(["positive" if j in ok else "junk" if j in junk else "negative" for j in top])
        captions.append(f"query {qi}: AP {aps[qi]:.0f}% ({setup})")
    if not q_imgs:
        raise ValueError(f"no query of {dataset.name} has positives in the {setup} setup")
    return retrieval_grid(q_imgs, results, labels, output, tile=tile, captions=captions)
