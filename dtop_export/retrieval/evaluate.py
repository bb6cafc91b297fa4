"""Evaluation of one engine on one data set: extract queries (cropped to their boxes) and database,
rank, and score Easy/Medium/Hard mAP and mP@k on the Revisited Oxford/Paris protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError
from dtop_export.retrieval.datasets import RevisitopDataset, load_distractors, resolve_dataset
from dtop_export.retrieval.extract import extract, progress_bar
from dtop_export.retrieval.metrics import SETUPS, ranking_positions, revisited_metrics

if TYPE_CHECKING:
    from dtop_export.contract import Engine


@dataclass
class EvalResult:
    """mAP (percent) and mP@k (percent) for the Easy/Medium/Hard setups of one data set and one model."""

    dataset: str
    map: dict[str, float]
    mp: dict[str, dict[int, float]]
    n_queries: int
    n_images: int
    n_distractors: int = 0
    scales: tuple[float, ...] = (1.0,)
    image_size: int | None = None
    crop_queries: bool = True
    seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)
    aps: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary (mP keys as strings)."""
        return {
            "dataset": self.dataset,
            "map": {k: _json_pct(v) for k, v in self.map.items()},
            "mp": {s: {str(k): _json_pct(v) for k, v in d.items()} for s, d in self.mp.items()},
            "n_queries": self.n_queries,
            "n_images": self.n_images,
            "n_distractors": self.n_distractors,
            "scales": list(self.scales),
            "image_size": self.image_size,
            "crop_queries": self.crop_queries,
            "seconds": round(self.seconds, 3),
            "engine": self.engine,
            "ap_per_query": self.aps,
        }

    def table(self) -> str:
        """Markdown table: rows mAP, mP@1, mP@5, mP@10; columns Easy, Medium, Hard."""
        name = self.dataset + ("+R1M" if self.n_distractors >= 1_000_000 else "")
        if 0 < self.n_distractors < 1_000_000:
            name += f"+{self.n_distractors} distractors"
        head = f"| {name} ({self.n_queries} queries, {self.n_images} images) | Easy | Medium | Hard |"
        lines = [head, "|---|---:|---:|---:|"]
        lines.append("| mAP | " + " | ".join(_cell(self.map[s]) for s in SETUPS) + " |")
        kappas = sorted(next(iter(self.mp.values())).keys()) if self.mp else []
        for k in kappas:
            lines.append(f"| mP@{k} | " + " | ".join(_cell(self.mp[s][k]) for s in SETUPS) + " |")
        empty = [s for s in SETUPS if np.isnan(self.map[s])]
        if empty:  # revisitop leaves such queries out of the mean; with none left there is no mean
            lines.append(f"\n(—: no query has positives for {', '.join(empty)})")
        return "\n".join(lines)


def _json_pct(v: float) -> float | None:
    """A percentage for JSON: NaN (a setup without any query that has positives) is null, not the invalid NaN."""
    return None if np.isnan(v) else round(v, 4)


def _cell(v: float) -> str:
    return "—" if np.isnan(v) else f"{v:.2f}"


def evaluate(
    engine: Engine,
    data_root: str | Path,
    dataset: str,
    scales: Sequence[float] = (1.0,),
    crop_queries: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    image_size: int | None = None,
    distractors: str | Path | np.ndarray | None = None,
) -> EvalResult:
    """Extract the data set with ``engine`` and score it on the Revisited Oxford/Paris protocol.

    ``image_size`` defaults to the data set's own (the sample set: 256), else the engine's preprocessing
    size (1024 for ROxf/RPar). ``distractors``: +R1M-style descriptors (array or ``.npy`` path).
    """
    ds = resolve_dataset(dataset, data_root)
    return evaluate_dataset(engine, ds, scales, crop_queries, batch_size, progress, image_size, distractors=distractors)


def evaluation_size(ds: RevisitopDataset, engine: Engine, image_size: int | None = None) -> int:
    """The longer side a data set is evaluated at: ``image_size``, else the data set's own, else the engine's (a
    program compiled for one square size takes its own: :func:`dtop_export.preprocess.input_size`)."""
    from dtop_export.preprocess import input_size

    return int(input_size(engine.preprocess, image_size, ds.image_size))


def evaluate_dataset(
    engine: Engine,
    ds: RevisitopDataset,
    scales: Sequence[float] = (1.0,),
    crop_queries: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    image_size: int | None = None,
    distractors: str | Path | np.ndarray | None = None,
    on_extract: Callable[[np.ndarray, np.ndarray], None] | None = None,
    on_rank: Callable[[np.ndarray], None] | None = None,
) -> EvalResult:
    """:func:`evaluate` on an already loaded :class:`RevisitopDataset`. ``on_extract(db, queries)`` gets the
    descriptors, ``on_rank(positions)`` the place of every database image in each query's ranking (distractors
    included: :func:`~dtop_export.retrieval.metrics.ranking_positions`), e.g. for a picture that agrees with the
    table."""
    t0 = time.perf_counter()
    size = evaluation_size(ds, engine, image_size)
    bboxes = ds.bboxes if crop_queries else None
    if crop_queries and any(b is None for b in ds.bboxes):
        raise DToPError(f"{ds.name}: some queries have no bounding box: pass --no-crop")
    missing = [p for p in (*ds.queries, *ds.images) if not p.is_file()]
    if missing:  # before any embedding: the protocol needs every image, and a set is minutes to embed
        raise DToPError(
            f"{ds.folder}: {len(missing)} of the {ds.n_queries + ds.n_images} images of gnd_{ds.name}.pkl are "
            f"missing (first: {missing[0]}): put the whole jpg/ folder there"
        )
    q = extract(
        engine,
        ds.queries,
        None,
        scales,
        bboxes,
        progress,
        image_size=size,
        batch_size=batch_size,
        description="queries",
    )
    db = extract(
        engine, ds.images, None, scales, None, progress, image_size=size, batch_size=batch_size, description="database"
    )
    if on_extract is not None:
        on_extract(db, q)
    dis = load_distractors(distractors) if isinstance(distractors, (str, Path)) else distractors
    with progress_bar(progress and dis is not None and len(dis) > 0) as prog:
        task = prog.add_task("distractors", total=0 if dis is None else len(dis))
        positions = ranking_positions(db, q, dis, advance=lambda n: prog.advance(task, n))
    if on_rank is not None:
        on_rank(positions)
    metrics = revisited_metrics(ds.gnd, positions=positions)
    return EvalResult(
        dataset=ds.name,
        map=metrics["map"],
        mp=metrics["mp"],
        aps=metrics["aps"],
        n_queries=ds.n_queries,
        n_images=ds.n_images,
        n_distractors=0 if dis is None else int(dis.shape[0]),
        scales=tuple(float(s) for s in scales),
        image_size=size,
        crop_queries=crop_queries,
        seconds=time.perf_counter() - t0,
        engine=engine.describe(),
    )
