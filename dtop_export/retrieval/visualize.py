"""Retrieval pictures: queries and their top-k results, with correct / junk / wrong marked by colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dtop_export.atomic import atomic_path
from dtop_export.errors import DToPError

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


def placeholder(text: str, size: int = 160) -> Image.Image:
    """A grey square saying ``text``: the tile of a result whose image is not drawn (a distractor known only by its
    descriptor, an image that cannot be read)."""
    img = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(text.splitlines()):
        draw.text((8, size // 2 - 12 + 14 * i), line, fill=(60, 60, 60))
    return img


def check_picture(dataset: RevisitopDataset) -> None:
    """Refuse a picture of a data set where no query has positives (easy or hard images): it would show nothing
    (what ``evaluate --picture`` checks before embedding anything)."""
    if not any(len(g["easy"]) or len(g["hard"]) for g in dataset.gnd):
        raise DToPError(
            f"--picture: no query of {dataset.name} has easy or hard images to show (its ground truth lists none): "
            "leave --picture out"
        )


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
    positions: np.ndarray | None = None,
    n_distractors: int = 0,
) -> Path:
    """PNG of ``n_queries`` queries of ``dataset`` (spread from best to worst AP in ``setup``) and their
    top-``k`` results from descriptors ``db`` [n_db, N] and ``queries`` [n_q, N], each result marked
    correct / junk / wrong by the revisitop ground truth of that setup.

    ``positions`` [n_db, n_q]: where each database image ranks among the database and ``n_distractors`` distractors
    (:func:`~dtop_export.retrieval.metrics.ranking_positions` with the distractors, as the evaluation ranked them): the
    APs and the top-``k`` are then those of that ranking, a distractor drawn as a grey tile marked wrong (its image is
    not read). Without it the database is ranked alone.
    """
    from dtop_export.preprocess import crop_bbox, load_image
    from dtop_export.retrieval.metrics import ranking_positions, revisited_metrics, setup_gnd

    if db.shape[0] != dataset.n_images or queries.shape[0] != dataset.n_queries:
        raise ValueError("descriptors do not match the data set")
    check_picture(dataset)
    if positions is None:
        positions = ranking_positions(db, queries)
    if positions.shape != (dataset.n_images, dataset.n_queries):
        raise ValueError("positions do not match the data set")
    aps = revisited_metrics(dataset.gnd, positions=positions)["aps"][setup]
    gnd = setup_gnd(dataset.gnd, setup)
    q_imgs, results, labels, captions, texts = [], [], [], [], []
    for qi in pick_queries(aps, n_queries):
        img = load_image(dataset.queries[qi])
        bbx = dataset.bboxes[qi]
        q_imgs.append(crop_bbox(img, bbx) if crop_queries and bbx is not None else img)
        ok, junk = set(map(int, gnd[qi]["ok"])), set(map(int, gnd[qi]["junk"]))
        top: list[int | None] = [None] * min(k, dataset.n_images + n_distractors)  # None: a distractor
        for j in np.flatnonzero(positions[:, qi] < len(top)):
            top[int(positions[j, qi])] = int(j)
        results.append([placeholder("distractor", tile) if j is None else load_image(dataset.images[j]) for j in top])
        labels.append(["positive" if j in ok else "junk" if j in junk else "negative" for j in top])
        names = ["distractor" if j is None else lab for j, lab in zip(top, labels[-1])]
        texts.append([f"#{r} {name}" for r, name in enumerate(names, 1)])
        captions.append(f"query {qi}: AP {aps[qi]:.0f}% ({setup})")
    if not q_imgs:
        raise DToPError(f"--picture: no query of {dataset.name} has positives in the {setup} setup")
    legend = LEGEND + ("   grey tile: a distractor" if n_distractors else "")
    return retrieval_grid(q_imgs, results, labels, output, tile=tile, captions=captions, result_captions=texts,
                          legend=legend)  # fmt: skip
