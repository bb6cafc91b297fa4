"""Evaluation data sets in revisitop's layout (ROxford5k, RParis6k, the embedded sample, any folder) and
+R1M-style distractor descriptors."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.errors import DToPError

DATASETS = ("roxford5k", "rparis6k")
NPY_FORMAT = "dtop-export/descriptors"  # the .json sidecar of `embed -o X.npy`


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
    cfg = load_pickle(pkl)  # revisitop's files are plain data: a pickle that would run code is refused
    if not isinstance(cfg, dict):
        raise DToPError(f"{pkl} is not a revisitop ground-truth file")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise DToPError(f"{pkl} is not a revisitop ground-truth file: no {', '.join(missing)}")
    imlist, qimlist = _names(cfg, "imlist", pkl), _names(cfg, "qimlist", pkl)
    entries = cfg["gnd"].tolist() if isinstance(cfg["gnd"], np.ndarray) else cfg["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise DToPError(f"{pkl}: gnd is a {type(entries).__name__}, not a list of one entry per query")
    if len(entries) != len(qimlist):
        raise DToPError(f"{pkl}: {len(qimlist)} queries but {len(entries)} ground-truth entries")
    ext, qext = cfg.get("ext", ".jpg"), cfg.get("qext", ".jpg")
    jpg = folder / "jpg"
    bboxes, gnd = [], []
    for i, g in enumerate(gnd_entries(entries, pkl)):
        where = f"{pkl}: query {i} ({qimlist[i]})"
        bboxes.append(_box(g.get("bbx"), where))
        gnd.append({k: db_indices(g.get(k, []), len(imlist), f"{where} {k}") for k in ("easy", "hard", "junk")})
    return RevisitopDataset(
        name=name,
        folder=folder,
        images=[jpg / f"{n}{ext}" for n in imlist],
        queries=[jpg / f"{n}{qext}" for n in qimlist],
        bboxes=bboxes,
        gnd=gnd,
        image_size=cfg.get("image_size"),
    )


def _names(cfg: dict[str, Any], key: str, pkl: Path) -> list[str]:
    """``imlist``/``qimlist``: a non-empty list of image names (an empty one would embed a set to score nothing)."""
    names = cfg[key]
    what = "database image" if key == "imlist" else "query"
    if isinstance(names, np.ndarray) and names.ndim == 1:
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DToPError(f"{pkl}: {key} should be a list of image names, one per {what}")
    if not names:
        raise DToPError(f"{pkl}: {key} is empty: a revisitop set needs at least one {what}")
    return list(names)


def _shown(value: Any) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _box(bbx: Any, where: str) -> list[float] | None:
    """A query's ``bbx``: None, or 4 finite numbers x1, y1, x2, y2 with x2 > x1 and y2 > y1."""
    if bbx is None:
        return None
    try:
        ok = not isinstance(bbx, (str, bytes, dict)) and len(bbx) == 4
        ok = ok and not any(isinstance(v, (str, bytes, bool, np.bool_)) for v in bbx)
        box = [float(v) for v in bbx] if ok else []
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise DToPError(
            f"{where} bbx {_shown(bbx)} is not a box: give 4 finite numbers x1, y1, x2, y2 with x2 > x1 and y2 > y1"
        )
    return box


def db_indices(value: Any, n_db: int, where: str) -> list[int]:
    """An ``easy``/``hard``/``junk`` list: database indices, whole numbers in ``0..n_db-1`` (never rounded)."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    ok = isinstance(value, (list, tuple))
    items = list(value) if ok else []
    for v in items:
        whole = isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
        if not whole or isinstance(v, (bool, np.bool_)):
            ok = False
            break
    if not ok:
        raise DToPError(f"{where} is {_shown(value)}: give a list of database image indices (whole numbers)")
    out = [int(v) for v in items]
    if out and (min(out) < 0 or max(out) >= n_db):
        raise DToPError(f"{where} index out of range 0..{n_db - 1}: {_shown(value)}")
    return out


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data set file must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
        # what numpy writes for ordinary arrays too: protocol 5 (array bytes in the pickle, rebuilt by _frombuffer)
        # and protocol <= 2 for empty arrays (bytes() of nothing): constructors of data, nothing else
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def load_pickle(path: str | Path) -> Any:
    """Load a data set pickle (cirtorch/revisitop) allowing only plain data: never runs code from it."""
    path = Path(path)
    if not path.is_file():
        raise DToPError(f"{path} not found")
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DToPError(f"cannot read {path}: {e} (expected a plain-data pickle)") from e


def gnd_entries(gnd: Any, path: Path) -> Any:
    """revisitop's ``gnd`` list, checked: one dict per query (``easy``/``hard``/``junk`` index lists)."""
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise DToPError(
                f"{path}: gnd[{i}] is a {type(g).__name__}, not revisitop's {{'bbx', 'easy', 'hard', 'junk'}}"
            )
    return gnd


def resolve_dataset(dataset: str, data_root: str | Path | None = None) -> RevisitopDataset:
    """``roxford5k``/``rparis6k``/``sample`` under ``data_root`` (default :func:`default_data_root`; the sample
    set is built there on first use), or a folder holding exactly one ``gnd_<name>.pkl`` and ``jpg/``."""
    from dtop_export.retrieval.sample_data import NAME as SAMPLE
    from dtop_export.retrieval.sample_data import build_sample_dataset

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
    from dtop_export.host import cache_dir

    return cache_dir("data")


def load_distractors(path: str | Path) -> Any:
    """Distractor descriptors [M, N] from a ``.npy`` file (memory-mapped; +R1M is ~6 GB at N=1536) or a folder of
    shards written by ``embed -o FOLDER`` (read one shard at a time, see
    :class:`~dtop_export.corpus.shards.ShardedDescriptors`), refused unless they are sound (float32, finite, unit
    norm; a complete shard folder: :func:`~dtop_export.corpus.integrity.open_distractors`)."""
    from dtop_export.corpus.integrity import open_distractors

    return open_distractors(path)[0]
