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
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise DToPError(f"{pkl}: {len(cfg['qimlist'])} queries but {len(cfg['gnd'])} ground-truth entries")
    ext, qext = cfg.get("ext", ".jpg"), cfg.get("qext", ".jpg")
    jpg = folder / "jpg"
    n_db = len(cfg["imlist"])
    for i, g in enumerate(gnd_entries(cfg["gnd"], pkl)):
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
