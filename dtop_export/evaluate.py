"""Retrieval evaluation on the Revisited Oxford/Paris protocol (Radenović et al., CVPR 2018).

The metric code follows revisitop's ``evaluate.py`` exactly:

- ``compute_ap(ranks, nres)``: trapezoidal average precision over the 0-based positions of the positives.
- ``compute_map(ranks, gnd, kappas)``: per query, the positives (``ok``) and ``junk`` images are located in
  the ranking; each positive's position is decreased by the number of junk images ranked before it (junk is
  ignored); AP uses ``nres = len(ok)``; mP@k uses ``kq = min(max(pos), k)`` and ``(pos <= kq).sum() / kq``
  on 1-based positions; queries without positives are left out of the means (their AP is NaN).
- Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk. Hard: ok = hard,
  junk = junk + easy. Results in percent, kappas 1, 5, 10.

The ranking is by descending inner product of L2-normalised descriptors; ties are broken by database
index (stable sort), so results never depend on the sort algorithm. With +R1M distractors (a ``.npy``
descriptor file) the distractors rank after database images they tie with, and only the positions of
the database images are computed (exactly as if the full ranking had been sorted).

Extraction follows cirtorch: each image is resized so its longer side is ``image_size * scale`` (sides
rounded to the stride), the L2-normalised descriptors of the scales are averaged and normalised again.
Queries are cropped to their bounding box first (the protocol), unless ``crop_queries=False``.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

    from dtop_export.preprocess import PreprocessConfig
    from engines.base import Engine

KAPPAS = (1, 5, 10)
SETUPS = ("easy", "medium", "hard")
DATASETS = ("roxford5k", "rparis6k")
MULTI_SCALES = (1.0, 1 / math.sqrt(2), math.sqrt(2))


# revisitop metrics -----------------------------------------------------------------------------------


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision from the sorted 0-based positions ``ranks`` of the positives found; ``nres`` positives
    exist in total (revisitop's trapezoidal rule)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _query_metrics(pos: np.ndarray, junk: np.ndarray, nres: int, kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """AP and precision@kappas of one query from the sorted positions of its positives and junk images."""
    pos = np.array(pos, dtype=np.int64)
    if len(junk):
        # decrease positions of positives by the number of junk images ranked before them
        k = 0
        ij = 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
    ap = compute_ap(pos, nres)
    prs = np.zeros(len(kappas))
    if len(pos):  # revisitop assumes at least one positive is in the ranking
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(int(pos1.max()), kappa)
            prs[j] = (pos1 <= kq).sum() / kq
    return ap, prs


def _finish(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    n = int(valid.sum())
    if n == 0:
        return float("nan"), np.full(prs.shape[1], np.nan)
    return float(aps[valid].sum() / n), prs[valid].sum(axis=0) / n


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``: ``ranks`` [n_ranked, n_queries] holds database indices, best first.

    ``gnd[i]`` has ``ok`` (positives) and optionally ``junk``. Returns (mAP, APs per query, mean
    precision at kappas, precision at kappas per query); queries without positives get NaN and are left
    out of the means. Values are fractions (revisitop's), not percent.
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        qgndj = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        aps[i], prs[i] = _query_metrics(pos, junk, len(qgnd), kappas)
    m, pr = _finish(aps, prs)
    return m, aps, pr, prs


def compute_map_positions(
    positions: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compute_map` from ``positions`` [n_db, n_queries]: the 0-based place of every database image
    in each query's full ranking (which may also hold distractors). Same results, no full sort needed."""
    positions = np.asarray(positions)
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        qgndj = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        pos = np.sort(positions[qgnd, i])
        junk = np.sort(positions[qgndj, i]) if len(qgndj) else np.empty(0, dtype=np.int64)
        aps[i], prs[i] = _query_metrics(pos, junk, len(qgnd), kappas)
    m, pr = _finish(aps, prs)
    return m, aps, pr, prs


def setup_gnd(gnd: Sequence[dict[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """The ok/junk lists of one protocol setup (``easy``, ``medium`` or ``hard``) from revisitop's gnd."""

    def cat(*keys: str) -> np.ndarray:
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in keys]) if keys else np.empty(0)

    out = []
    for g in gnd:
        if setup == "easy":
            ok, junk = ("easy",), ("junk", "hard")
        elif setup == "medium":
            ok, junk = ("easy", "hard"), ("junk",)
        elif setup == "hard":
            ok, junk = ("hard",), ("junk", "easy")
        else:
            raise DToPError(f"unknown protocol setup {setup!r}: choose easy, medium or hard")
        out.append({"ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]), "junk": cat(*junk)})
    return out


def revisited_metrics(
    gnd: Sequence[dict[str, Any]],
    *,
    ranks: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    kappas: Sequence[int] = KAPPAS,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@kappas in percent, from a ranking or from positions (one of the two)."""
    if (ranks is None) == (positions is None):
        raise ValueError("give either ranks or positions")
    out: dict[str, Any] = {"map": {}, "mp": {}, "aps": {}}
    for setup in SETUPS:
        g = setup_gnd(gnd, setup)
        if ranks is not None:
            m, aps, pr, _ = compute_map(ranks, g, kappas)
        else:
            m, aps, pr, _ = compute_map_positions(positions, g, kappas)
        out["map"][setup] = float(m * 100)
        out["mp"][setup] = {int(k): float(p * 100) for k, p in zip(kappas, pr)}
        out["aps"][setup] = [None if np.isnan(a) else float(a * 100) for a in aps]
    return out


# ranking --------------------------------------------------------------------------------------------


def rank_database(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Full ranking [n_db, n_queries] by descending inner product; ties by database index."""
    scores = np.asarray(db, dtype=np.float32) @ np.asarray(queries, dtype=np.float32).T
    return np.argsort(-scores, axis=0, kind="stable")


def ranking_positions(
    db: np.ndarray, queries: np.ndarray, distractors: np.ndarray | None = None, chunk: int = 65536
) -> np.ndarray:
    """0-based place [n_db, n_queries] of every database image in each query's ranking over db + distractors.

    Equal to inverting ``argsort(-scores(concat(db, distractors)), kind="stable")``, without building it.
    """
    db = np.asarray(db, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    ranks = rank_database(db, queries)
    n_db, nq = ranks.shape
    positions = np.empty((n_db, nq), dtype=np.int64)
    cols = np.arange(nq)[None, :]
    positions[ranks, np.broadcast_to(cols, ranks.shape)] = np.arange(n_db)[:, None]
    if distractors is None or len(distractors) == 0:
        return positions
    if distractors.shape[1] != db.shape[1]:
        raise DToPError(
            f"distractor descriptors are {distractors.shape[1]}-d but the model's are {db.shape[1]}-d: "
            "extract them with the same model"
        )
    scores = db @ queries.T  # [n_db, nq]
    for start in range(0, len(distractors), chunk):
        d = np.asarray(distractors[start : start + chunk], dtype=np.float32)
        ds = np.sort(d @ queries.T, axis=0)  # ascending, [m, nq]
        m = ds.shape[0]
        for q in range(nq):
            # distractors scoring strictly higher rank before; ties go to the database image (lower index)
            positions[:, q] += m - np.searchsorted(ds[:, q], scores[:, q], side="right")
    return positions


# data sets ------------------------------------------------------------------------------------------


@dataclass
class RevisitopDataset:
    """A data set in revisitop's layout: ``<root>/<name>/gnd_<name>.pkl`` and ``<root>/<name>/jpg/``."""

    name: str
    folder: Path
    images: list[Path]
    queries: list[Path]
    bboxes: list[list[float] | None]
    gnd: list[dict[str, Any]]
    image_size: int | None = None

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_queries(self) -> int:
        return len(self.queries)


def load_revisitop(data_root: str | Path, name: str) -> RevisitopDataset:
    """Read ``<data_root>/<name>/gnd_<name>.pkl``; image paths are ``<data_root>/<name>/jpg/<imlist[i]>.jpg``."""
    return load_revisitop_folder(Path(data_root) / name, name)


def load_revisitop_folder(folder: str | Path, name: str) -> RevisitopDataset:
    """Read ``<folder>/gnd_<name>.pkl`` (keys imlist, qimlist, gnd[i] with bbx/easy/hard/junk) and ``jpg/``."""
    folder = Path(folder)
    pkl = folder / f"gnd_{name}.pkl"
    if not pkl.exists():
        hint = (
            "run `dtop-export data sample DIR` to build it"
            if name == "sample"
            else "download revisitop's files (gnd_<name>.pkl and jpg/) there or pass --data-root"
        )
        raise DToPError(f"{pkl} not found: {hint}")
    try:
        with open(pkl, "rb") as fh:
            cfg = pickle.load(fh)
    except Exception as e:  # noqa: BLE001 - pickle raises many types
        raise DToPError(f"cannot read {pkl}: {e}") from e
    if not isinstance(cfg, dict):
        raise DToPError(f"{pkl} is not a revisitop ground-truth file")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise DToPError(f"{pkl} is not a revisitop ground-truth file: no {', '.join(missing)}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise DToPError(f"{pkl}: {len(cfg['qimlist'])} queries but {len(cfg['gnd'])} ground-truth entries")
    ext, qext = cfg.get("ext", ".jpg"), cfg.get("qext", ".jpg")
    jpg = folder / "jpg"
    n_db = len(cfg["imlist"])
    for i, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g.get(key, []), dtype=np.int64)
            if len(idx) and (idx.min() < 0 or idx.max() >= n_db):
                raise DToPError(f"{pkl}: query {i} {key} index out of range 0..{n_db - 1}")
    return RevisitopDataset(
        name=name,
        folder=folder,
        images=[jpg / f"{n}{ext}" for n in cfg["imlist"]],
        queries=[jpg / f"{n}{qext}" for n in cfg["qimlist"]],
        bboxes=[list(map(float, g["bbx"])) if g.get("bbx") is not None else None for g in cfg["gnd"]],
        gnd=[{k: list(g.get(k, [])) for k in ("easy", "hard", "junk")} for g in cfg["gnd"]],
        image_size=cfg.get("image_size"),
    )


def resolve_dataset(dataset: str, data_root: str | Path | None = None) -> RevisitopDataset:
    """``roxford5k``/``rparis6k``/``sample`` under ``data_root`` (default :func:`default_data_root`; the sample
    set is built there on first use), or a folder holding exactly one ``gnd_<name>.pkl`` and ``jpg/``."""
    from dtop_export.sample_data import NAME as SAMPLE
    from dtop_export.sample_data import build_sample_dataset

    if dataset in (*DATASETS, SAMPLE):
        root = Path(data_root) if data_root is not None else default_data_root()
        if dataset == SAMPLE:
            build_sample_dataset(root)
        return load_revisitop(root, dataset)
    folder = Path(dataset)
    if not folder.is_dir() and data_root is not None and (Path(data_root) / dataset).is_dir():
        folder = Path(data_root) / dataset
    if folder.is_dir():
        pkls = sorted(folder.glob("gnd_*.pkl"))
        if len(pkls) != 1:
            raise DToPError(f"{folder} should hold exactly one gnd_<name>.pkl (found {len(pkls)})")
        return load_revisitop_folder(folder, pkls[0].stem[len("gnd_") :])
    raise DToPError(
        f"unknown data set {dataset!r}: use roxford5k, rparis6k, sample or a folder with gnd_<name>.pkl and jpg/"
    )


def default_data_root() -> Path:
    """``$DTOP_EXPORT_DATA``, else ``~/.cache/dtop-export/data``."""
    import os

    env = os.environ.get("DTOP_EXPORT_DATA")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dtop-export" / "data"


# extraction -----------------------------------------------------------------------------------------


def _progress(enabled: bool) -> Any:
    """A rich progress bar (a no-op when disabled)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


def extract_many(
    engines: Sequence[Engine],
    images: Sequence[str | Path | Image.Image],
    preprocess: PreprocessConfig | None = None,
    scales: Sequence[float] = (1.0,),
    bboxes: Sequence[Sequence[float] | None] | None = None,
    progress: bool = True,
    image_size: int | None = None,
    batch_size: int = 1,
    errors: list[tuple[int, str]] | None = None,
    description: str = "extracting",
) -> list[np.ndarray]:
    """Descriptors [n, N] of ``images`` from every engine, each image preprocessed once and fed to all.

    ``preprocess`` defaults to the first engine's; ``image_size`` to ``preprocess.size``. Images of equal
    input shape are batched up to ``batch_size``. With ``errors`` (a list), unreadable images are recorded
    there as ``(index, message)`` and left out of the result; otherwise they raise :class:`DToPError`.
    """
    from dtop_export.preprocess import load_image, prepare

    if not engines:
        raise ValueError("no engines given")
    if not scales or any(s <= 0 for s in scales):
        raise DToPError(f"scales must be positive numbers, got {list(scales)}")
    if batch_size < 1:
        raise DToPError(f"batch size must be >= 1, got {batch_size}")
    cfg = preprocess or engines[0].preprocess
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError("bboxes must be parallel to images")
    n = len(images)
    dims = [e.descriptor_dim for e in engines]
    acc = [np.zeros((n, d), dtype=np.float64) for d in dims]
    ok = np.ones(n, dtype=bool)
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}

    def flush(key: tuple[int, ...]) -> None:
        items = buckets.pop(key, [])
        if not items:
            return
        batch = np.stack([t for _, t in items])
        idx = [i for i, _ in items]
        for a, e in zip(acc, engines):
            out = np.asarray(e.embed(batch), dtype=np.float32)
            if out.shape != (len(idx), a.shape[1]):
                raise DToPError(f"{e.label} returned {list(out.shape)} for a batch of {len(idx)}")
            if len(scales) == 1:
                a[idx] = out
            else:
                a[idx] += out

    with _progress(progress) as prog:
        task = prog.add_task(description, total=n)
        for i, item in enumerate(images):
            try:
                img = item if not isinstance(item, (str, Path)) else load_image(item)
                bbx = bboxes[i] if bboxes is not None else None
                tensors = [prepare(img, cfg, image_size, s, bbx) for s in scales]
            except DToPError as e:
                if errors is None:
                    raise
                errors.append((i, str(e)))
                ok[i] = False
                prog.advance(task)
                continue
            for t in tensors:
                key = t.shape
                buckets.setdefault(key, []).append((i, t))
                if len(buckets[key]) >= batch_size:
                    flush(key)
            prog.advance(task)
        for key in list(buckets):
            flush(key)
    results = []
    for a in acc:
        a = a[ok]
        if len(scales) > 1:
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        results.append(a.astype(np.float32))
    return results


def extract(
    engine: Engine,
    images: Sequence[str | Path | Image.Image],
    preprocess: PreprocessConfig | None = None,
    scales: Sequence[float] = (1.0,),
    bboxes: Sequence[Sequence[float] | None] | None = None,
    progress: bool = True,
    *,
    image_size: int | None = None,
    batch_size: int = 1,
    errors: list[tuple[int, str]] | None = None,
    description: str = "extracting",
) -> np.ndarray:
    """Descriptors [n, N] of image files or PIL images (multi-scale: mean of L2-normalised, normalised).

    ``bboxes[i]`` (x1, y1, x2, y2) crops image i first. See :func:`extract_many` for the other options.
    """
    return extract_many(
        [engine],
        images,
        preprocess,
        scales,
        bboxes,
        progress,
        image_size=image_size,
        batch_size=batch_size,
        errors=errors,
        description=description,
    )[0]


# evaluation -----------------------------------------------------------------------------------------


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
            "map": {k: round(v, 4) for k, v in self.map.items()},
            "mp": {s: {str(k): round(v, 4) for k, v in d.items()} for s, d in self.mp.items()},
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
        lines.append("| mAP | " + " | ".join(f"{self.map[s]:.2f}" for s in SETUPS) + " |")
        kappas = sorted(next(iter(self.mp.values())).keys()) if self.mp else []
        for k in kappas:
            lines.append(f"| mP@{k} | " + " | ".join(f"{self.mp[s][k]:.2f}" for s in SETUPS) + " |")
        return "\n".join(lines)


def load_distractors(path: str | Path) -> np.ndarray:
    """Distractor descriptors [M, N] from a ``.npy`` file (memory-mapped; +R1M is ~6 GB at N=1536)."""
    path = Path(path)
    if not path.exists():
        raise DToPError(f"distractor file {path} not found")
    try:
        d = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DToPError(f"cannot read distractor descriptors {path}: {e}") from e
    if d.ndim != 2:
        raise DToPError(f"{path} should hold descriptors [M, N], got shape {list(d.shape)}")
    return d


def evaluate_descriptors(
    db: np.ndarray,
    queries: np.ndarray,
    gnd: Sequence[dict[str, Any]],
    distractors: np.ndarray | None = None,
    kappas: Sequence[int] = KAPPAS,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@k (percent) of given descriptors on revisitop ground truth."""
    positions = ranking_positions(db, queries, distractors)
    return revisited_metrics(gnd, positions=positions, kappas=kappas)


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
) -> EvalResult:
    """:func:`evaluate` on an already loaded :class:`RevisitopDataset`."""
    t0 = time.perf_counter()
    size = image_size or ds.image_size or engine.preprocess.size
    bboxes = ds.bboxes if crop_queries else None
    if crop_queries and any(b is None for b in ds.bboxes):
        raise DToPError(f"{ds.name}: some queries have no bounding box: pass --no-crop")
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
    metrics = evaluate_descriptors(db, q, ds.gnd, dis)
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


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.707,1.414"`` (or ``ms`` for cirtorch's 1, 1/√2, √2) -> a tuple of positive floats."""
    if text.strip().lower() in ("ms", "multi", "multiscale"):
        return MULTI_SCALES
    try:
        out = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        out = ()
    if not out or any(not (s > 0) or not math.isfinite(s) for s in out):
        raise DToPError(f"cannot read scales {text!r}: write positive numbers separated by commas, e.g. 1,0.707,1.414")
    return out
