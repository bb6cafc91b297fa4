"""Training-set readers (paper §4.1) in their real on-disk formats (the images they feed: ``transforms``).

Every reader returns a :class:`TrainSet`: absolute image paths, contiguous class labels, image sizes
(for group-size sampling) and counts of what was skipped. Missing or unreadable images are counted and
skipped, never fatal; so is an image that fails to decode later, during training.

Formats
    sfm120k   cirtorch's ``retrieval-SfM-120k.pkl`` ({'train'|'val': {'cids', 'cluster', 'qidxs', 'pidxs'}})
              with images at ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``; labels are the clusters.
    gldv2     GLDv2-clean ``train_clean.csv`` (``landmark_id,images`` with space-separated ids) and the
              ``train/<a>/<b>/<c>/<id>.jpg`` tree.
    gldv1     GLDv1 ``train.csv`` (``id,url,landmark_id``; ``None`` labels skipped) + local ``<id>.jpg``
              files in ``train/`` (or the root).
    nc-clean  NC-clean list (Gordo et al.; dirtorch's ``annotation_clean_train.txt``): ``path label``
              per line relative to the root (``.txt``/``.csv``/``.json`` {path: label}).
    folder    one sub-folder per class, images anywhere below it.
    revisitop a revisitop-layout set ``<root>/<name>/gnd_<name>.pkl`` + ``jpg/``: every query with its
              easy and hard positives is one class (queries sharing positives are merged).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dtop_export.atomic import file_state
from dtop_export.errors import DToPError
from dtop_export.preprocess import image_size
from dtop_export.retrieval.datasets import db_indices, gnd_entries, load_pickle
from dtop_export.training.lists import as_list, csv_rows, path_label_lines, read_text, sfm120k_lists
from dtop_export.training.scan import (
    folder_entries,
    guess_layout,
    layout_setting,
    read_size_cache,
    unreadable_reason,
    write_size_cache,
)

log = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """A labelled list of usable images.

    paths/labels/sizes are aligned; labels are 0..num_classes-1; sizes are (width, height).
    qidxs/pidxs: query/positive index pairs (SfM-120k) into ``paths``; None for class-labelled sets.
    skipped: counts of dropped entries by reason (``missing``, ``unreadable``, ``unlabelled``, ...).
    skipped_files: (reason, path) of every file among them (not those of classes left out on purpose).
    """

    name: str
    root: Path
    paths: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]
    class_names: list[str]
    qidxs: list[int] | None = None
    pidxs: list[int] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()) if v) or "none"
        pairs = f", {len(self.qidxs)} query/positive pairs" if self.qidxs is not None else ""
        return f"{self.name}: {len(self)} images, {self.num_classes} classes{pairs} (skipped: {skipped})"


# image scanning -------------------------------------------------------------------------------------------


def finalize(
    name: str,
    root: Path,
    entries: Iterable[tuple[str, str]],
    skipped: Counter | None = None,
    min_per_class: int = 1,
    max_images: int | None = None,
    size_cache: Path | None = None,
    threads: int = 16,
    exclude_classes: Sequence[str] = (),
    files: list[tuple[str, str]] | None = None,
) -> TrainSet:
    """Turn (path, label) candidates into a :class:`TrainSet`: check every image, relabel 0..C-1.

    ``files``: (reason, path) of the files ``skipped`` already counts; with those skipped here, the set's
    ``skipped_files``, of which the warning names one per reason."""
    skipped = Counter() if skipped is None else skipped
    files = [] if files is None else files
    entries = list(entries)
    if exclude_classes:
        excluded = {str(c) for c in exclude_classes}
        n = len(entries)
        entries = [e for e in entries if e[1] not in excluded]
        if len(entries) < n:
            skipped["excluded_classes"] += n - len(entries)
    first: dict[str, str] = {}  # an image listed twice (GLDv2 ids repeated, a query that is also a db image) once
    for p, label in entries:
        if p in first:
            reason = "duplicate" if first[p] == label else "duplicate_other_label"
            skipped[reason] += 1
            files.append((reason, p))
        else:
            first[p] = label
    entries = list(first.items())
    cache = read_size_cache(size_cache)
    paths = [p for p, _ in entries]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # a cached size counts for the file it was read from: same bytes and mtime (a replaced image is read again)
        state = dict(zip(paths, pool.map(file_state, paths, chunksize=256)))
        stale = [p for p in paths if p in cache and cache[p][2:] != state[p]]
        for p in stale:
            del cache[p]
        todo = sorted(p for p in paths if state[p] is not None and p not in cache)
        # headers only: a PNG's EXIF after its pixels would cost a full decode (its group may then be off)
        for p, s in zip(todo, pool.map(partial(image_size, header_only=True), todo, chunksize=64)):
            if s is not None:
                cache[p] = (*s, *state[p])
    if (todo or stale) and size_cache is not None and size_cache.parent.is_dir():
        write_size_cache(size_cache, cache)
    usable: list[tuple[str, str, tuple[int, int]]] = []
    for p, label in entries:
        c = cache.get(p)  # every cached entry of this set is its file as it is now
        s = None if c is None else c[:2]
        if s is None:
            reason = "missing" if state[p] is None and not Path(p).exists() else unreadable_reason(p)
            skipped[reason] += 1
            files.append((reason, p))
            continue
        usable.append((p, label, s))
    counts = Counter(lbl for _, lbl, _ in usable)
    if min_per_class > 1:
        small = {lbl for lbl, n in counts.items() if n < min_per_class}
        if small:
            skipped["in_small_classes"] += sum(counts[lbl] for lbl in small)
            usable = [u for u in usable if u[1] not in small]
    if max_images is not None and len(usable) > max_images:
        skipped["over_max_images"] += len(usable) - max_images
        usable = usable[:max_images]
    if not usable:
        check = "data.exclude_classes" if set(skipped) == {"excluded_classes"} else "data.root"
        if skipped["in_small_classes"]:
            check = f"data.min_per_class={min_per_class} (the largest class has {max(counts.values())} images)"
        raise DToPError(f"{name} at {root}: no usable images ({_fmt(skipped)}); check {check}")
    class_names = sorted({lbl for _, lbl, _ in usable}, key=_natural)
    index = {c: i for i, c in enumerate(class_names)}
    ts = TrainSet(
        name=name,
        root=root,
        paths=[u[0] for u in usable],
        labels=[index[u[1]] for u in usable],
        sizes=[u[2] for u in usable],
        class_names=class_names,
        skipped=dict(skipped),
        skipped_files=files,
    )
    if any(skipped.values()):
        log.warning("%s: skipped %s", name, _fmt(skipped, {r: f for r, f in reversed(files)}))
    return ts


def _natural(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _fmt(c: Counter | dict, examples: dict[str, str] | None = None) -> str:
    """``3 missing, 1 unreadable``; with ``examples``, each reason's first path: ``1 unreadable (e.g. a.jpg)``."""
    ex = examples or {}
    parts = (f"{v} {k}" + (f" (e.g. {ex[k]})" if k in ex else "") for k, v in sorted(c.items()) if v)
    return ", ".join(parts) or "nothing"


def _need_dir(root: str | Path | None, what: str) -> Path:
    if root is None:
        raise DToPError(f"{what}: set data.root to the dataset folder")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DToPError(f"{what}: data.root {root} is not a folder")
    return root.resolve()


def _need_file(path: Path, what: str, hint: str, root: Path | None = None) -> Path:
    """``path``, or a one-line error; when ``root`` holds another downloaded layout, the line names its dataset."""
    if not path.is_file():
        other = guess_layout(root, folders=True) if root is not None else None
        setting = layout_setting(root, other) if root is not None and other is not None else None
        if setting is not None and setting != f"data.dataset={what}":
            raise DToPError(f"{what}: {path} not found, and {root} holds a {other} set: set {setting}")
        raise DToPError(f"{what}: {path} not found ({hint})")
    return path


# readers --------------------------------------------------------------------------------------------------


def cid2filename(cid: str, ims_root: Path) -> Path:
    """cirtorch's image path for an SfM-120k cluster image id."""
    return ims_root / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def read_sfm120k(
    root: str | Path | None, split: str = "train", list_file: str | Path | None = None, **kw: Any
) -> TrainSet:
    """SfM-120k (Radenović et al.): clusters as labels, plus the query/positive pairs of ``split``."""
    root = _need_dir(root, "sfm120k")
    pkl = _need_file(
        Path(list_file) if list_file else root / "retrieval-SfM-120k.pkl",
        "sfm120k",
        "expected cirtorch's retrieval-SfM-120k.pkl; set data.list_file",
        root,
    )
    db = load_pickle(pkl)
    if not isinstance(db, dict) or split not in db:
        raise DToPError(f"{pkl}: no '{split}' part (expected cirtorch's {{'train': ..., 'val': ...}})")
    cids, clusters, qidxs, pidxs = sfm120k_lists(db, pkl, split)
    ims = root / "ims"
    paths = [str(cid2filename(str(c), ims)) for c in cids]
    entries = [(p, str(int(c))) for p, c in zip(paths, clusters)]
    ts = finalize("sfm120k", root, entries, **kw)
    pos = {p: i for i, p in enumerate(ts.paths)}
    q, pp = [], []
    lost = 0
    for a, b in zip(qidxs, pidxs):
        ia, ib = pos.get(paths[int(a)]), pos.get(paths[int(b)])
        if ia is None or ib is None:
            lost += 1
            continue
        q.append(ia)
        pp.append(ib)
    if lost:
        ts.skipped["pairs_with_skipped_image"] = lost
    if not q:
        raise DToPError(f"{pkl}: no query/positive pair has both images on disk under {ims}")
    ts.qidxs, ts.pidxs = q, pp
    return ts


def gldv2_path(root: Path, image_id: str) -> Path:
    """GLDv2's ``train/<a>/<b>/<c>/<id>.jpg`` path."""
    return root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_gldv2(root: str | Path | None, list_file: str | Path | None = None, **kw: Any) -> TrainSet:
    """GLDv2-clean (Weyand et al.): ``train_clean.csv`` rows ``landmark_id,images`` (space-separated ids); or, as
    ``data.list_file``, GLDv2's full ``train.csv`` (``id,url,landmark_id``), whose images share the same tree."""
    root = _need_dir(root, "gldv2")
    path = _need_file(
        Path(list_file) if list_file else root / "train_clean.csv",
        "gldv2",
        "expected train_clean.csv with columns landmark_id,images",
        root,
    )
    entries = []
    skipped: Counter = Counter()
    try:
        rows = csv_rows(path, ("landmark_id", "images"), "")
    except DToPError:
        both = "landmark_id,images (GLDv2 train_clean.csv) or id,url,landmark_id (GLDv2 train.csv)"
        rows = csv_rows(path, ("id", "landmark_id"), both)
    for row in rows:
        label = (row.get("landmark_id") or "").strip()
        ids = (row.get("images") or row.get("id") or "").split()
        if not label:
            skipped["unlabelled"] += len(ids)
            continue
        for image_id in ids:
            if len(image_id) < 3:
                skipped["bad_id"] += 1
                continue
            entries.append((str(gldv2_path(root, image_id)), label))
    return finalize("gldv2", root, entries, skipped, **kw)


def read_gldv1(root: str | Path | None, list_file: str | Path | None = None, **kw: Any) -> TrainSet:
    """GLDv1 noisy (Noh et al.): ``train.csv`` rows ``id,url,landmark_id`` + downloaded ``<id>.jpg``."""
    root = _need_dir(root, "gldv1")
    path = _need_file(
        Path(list_file) if list_file else root / "train.csv",
        "gldv1",
        "expected train.csv with columns id,url,landmark_id",
        root,
    )
    images = root / "train" if (root / "train").is_dir() else root
    if guess_layout(root) == "gldv2":  # GLDv2's full train.csv: same name and columns, images in train/<a>/<b>/<c>/
        raise DToPError(
            f"gldv1: {root} holds a gldv2 set (train/<a>/<b>/<c>/<id>.jpg): set {layout_setting(root, 'gldv2')}"
        )
    entries = []
    skipped: Counter = Counter()
    for row in csv_rows(path, ("id", "landmark_id"), "id,url,landmark_id (GLDv1 train.csv)"):
        image_id = (row.get("id") or "").strip()
        label = (row.get("landmark_id") or "").strip()
        if not image_id or not label or label == "None":
            skipped["unlabelled"] += 1
            continue
        entries.append((str(images / f"{image_id}.jpg"), label))
    return finalize("gldv1", root, entries, skipped, **kw)


NC_CLEAN_LISTS = ("annotations/annotation_clean_train.txt", "nc_clean.txt", "list.txt")


def read_nc_clean(root: str | Path | None, list_file: str | Path | None = None, **kw: Any) -> TrainSet:
    """NC-clean (Gordo et al.): ``path label`` lines (``.txt``/``.csv``) or a ``.json`` {path: label}."""
    root = _need_dir(root, "nc-clean")
    if list_file:
        path = _need_file(Path(list_file), "nc-clean", "set data.list_file to the image list")
    else:
        found = [root / c for c in NC_CLEAN_LISTS if (root / c).is_file()]
        if not found:
            other = guess_layout(root, folders=True)
            hint = f"; it holds a {other} set: set {layout_setting(root, other)}" if other else ": set data.list_file"
            raise DToPError(f"nc-clean: no image list in {root} (looked for {', '.join(NC_CLEAN_LISTS)}){hint}")
        path = found[0]
    pairs: list[tuple[str, str]] = []
    skipped: Counter = Counter()
    if path.suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DToPError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise DToPError(f"{path}: expected a JSON object {{image_path: label}}")
        pairs = [(str(k), str(v)) for k, v in data.items()]
    else:
        pairs, unlabelled = path_label_lines(path, root)
        if unlabelled:
            skipped["unlabelled"] = unlabelled
    entries = [(str(root / p), lbl) for p, lbl in pairs]
    return finalize("nc-clean", root, entries, skipped, **kw)


def read_folder(root: str | Path | None, name: str = "folder", **kw: Any) -> TrainSet:
    """One sub-folder per class (``root/<class>/**/<image>``); non-image files are ignored."""
    root = _need_dir(root, "folder")
    other = guess_layout(root)
    if other is not None:  # its list's folders (train/, ims/, jpg/) would be read as classes
        raise DToPError(f"folder: {root} holds a {other} set, not class folders: set {layout_setting(root, other)}")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DToPError(f"folder: {root} has no class sub-folders (expected root/<class>/<image>.jpg)")
    skipped: Counter = Counter()
    files: list[tuple[str, str]] = []
    entries = folder_entries(classes, skipped, files)
    return finalize(name, root, entries, skipped, files=files, **kw)


def read_revisitop(root: str | Path | None, name: str = "sample", **kw: Any) -> TrainSet:
    """A revisitop-layout set as classes: each query + its easy/hard positives (overlaps merged)."""
    root = _need_dir(root, "revisitop")
    folder = root / name
    names = sorted(p.parent.name for p in root.glob("*/gnd_*.pkl") if p.name == f"gnd_{p.parent.name}.pkl")
    hint = f"set data.name to one of {', '.join(names)}" if names else "data.root holds no <name>/gnd_<name>.pkl"
    gnd_path = _need_file(folder / f"gnd_{name}.pkl", "revisitop", hint)
    cfg = load_pickle(gnd_path)
    try:
        imlist, qimlist, gnd = (
            as_list(cfg["imlist"]),
            as_list(cfg["qimlist"]),
            gnd_entries(as_list(cfg["gnd"]), gnd_path),
        )
    except (KeyError, TypeError) as e:
        raise DToPError(f"{gnd_path}: not a revisitop ground truth (missing {e})") from None
    ext = cfg.get("ext", ".jpg") or ""
    qext = cfg.get("qext", ext) or ""
    # union-find over queries sharing a positive
    parent = list(range(len(qimlist)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for qi, g in enumerate(gnd):
        where = f"{gnd_path}: query {qi} ({qimlist[qi]})"
        for di in [d for k in ("easy", "hard") for d in db_indices(g.get(k, []), len(imlist), f"{where} {k}")]:
            if di in owner:
                parent[find(qi)] = find(owner[di])
            else:
                owner[di] = qi
    entries = [(str(folder / "jpg" / f"{qimlist[qi]}{qext}"), f"q{find(qi)}") for qi in range(len(qimlist))]
    entries += [(str(folder / "jpg" / f"{imlist[di]}{ext}"), f"q{find(qi)}") for di, qi in sorted(owner.items())]
    return finalize(f"revisitop:{name}", root, entries, **kw)


def read_sample(root: str | Path | None, **kw: Any) -> TrainSet:
    """The embedded offline training set (class-per-folder views of packaged photos), built on demand."""
    from dtop_export.training.sample import build_training_sample

    return read_folder(build_training_sample(root), name="sample", **kw)


def load_train_set(data: Any, size_cache: Path | None = None) -> TrainSet:
    """Read the set a :class:`training.config.DataSection` names."""
    kw: dict[str, Any] = {
        "min_per_class": data.min_per_class,
        "max_images": data.max_images,
        "exclude_classes": tuple(data.exclude_classes),
    }
    kw["size_cache"] = Path(data.size_cache) if data.size_cache else size_cache
    ds = data.dataset
    if ds == "sample":
        return read_sample(data.root, **kw)
    if ds == "folder":
        return read_folder(data.root, **kw)
    if ds == "revisitop":
        return read_revisitop(data.root, data.name, **kw)
    if ds == "sfm120k":
        return read_sfm120k(data.root, data.split, data.list_file, **kw)
    if ds == "gldv2":
        return read_gldv2(data.root, data.list_file, **kw)
    if ds == "gldv1":
        return read_gldv1(data.root, data.list_file, **kw)
    if ds == "nc-clean":
        return read_nc_clean(data.root, data.list_file, **kw)
    raise DToPError(f"unknown dataset {ds!r}")
