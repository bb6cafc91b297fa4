"""Retrieval pictures: queries and their top-k results, with correct / junk / wrong marked by colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from dtop_export._io import atomic_path

COLOURS = {"positive": (46, 160, 67), "junk": (230, 160, 20), "negative": (215, 40, 40), "query": (40, 90, 200)}
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
) -> Path:
    """One row per query: the query, then its ranked results. ``labels[i][j]`` is positive|junk|negative.

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
    draw.text((gap, 4), LEGEND, fill=(30, 30, 30))
    y = 24
    for i, (q, res, lab) in enumerate(zip(queries, results, labels)):
        canvas.paste(_tile(q, tile, COLOURS["query"], border), (gap, y))
        draw.text((gap, y + tile + 2), captions[i] if captions else f"query {i}", fill=(30, 30, 30))
        for j, (img, label) in enumerate(zip(res, lab)):
            x = gap + (j + 1) * (tile + gap)
            canvas.paste(_tile(img, tile, COLOURS.get(label, COLOURS["negative"]), border), (x, y))
            draw.text((x, y + tile + 2), f"#{j + 1} {label}", fill=COLOURS.get(label, (0, 0, 0)))
        y += tile + caption_h + gap
    output = Path(output)
    with atomic_path(output) as tmp:
        canvas.save(tmp, format="PNG")
    return output
