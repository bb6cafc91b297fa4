"""Tiny training-set fixtures in the real on-disk formats (generated; nothing is downloaded)."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from dtop_export.training.config import TrainConfig

# the training tests' run: the small preset on tiny images (groups of area ~64^2), one thread, no validation
BASE = [
    "model.preset=small",
    "data.dataset=folder",
    "data.workers=0",
    "sampler.base_size=64",
    "sampler.batch_size=4",
    "sampler.aspect_ratios=[0.75, 1.0, 1.333, 2.0]",
    "optim.optimizer=adamw",
    "optim.lr=1e-3",
    "optim.warmup_epochs=0.5",
    "epochs=2",
    "val.enabled=false",
    "progress=false",
    "log_every=1",
    "threads=1",
]


def train_config(out: Path, data: Path, *extra: str) -> TrainConfig:
    """BASE (+ ``extra``) on the set at ``data``, writing to ``out``."""
    from dtop_export.training.config import load_config

    return load_config(None, [*BASE, f"data.root={data}", f"out_dir={out}", *extra])


def train_sets(data: Path, *extra: str) -> list[str]:
    """BASE (+ ``extra``) as ``train -s`` options."""
    return [a for item in [*BASE, f"data.root={data}", *extra] for a in ("-s", item)]


# (width, height) cycle: landscape, portrait, square, wide — several aspect groups
SIZES = [(64, 48), (48, 64), (64, 64), (96, 48)]


def write_image(path: Path, cls: int, k: int, size: tuple[int, int] | None = None) -> Path:
    """A JPEG whose content depends on the class (a coloured pattern) and the view (noise)."""
    rng = np.random.default_rng(1000 * cls + k)
    w, h = size or SIZES[k % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            127 + 100 * np.sin(xx / (3 + cls)),
            127 + 100 * np.cos(yy / (2 + cls)),
            np.full((h, w), 40.0 * cls % 255),
        ],
        axis=-1,
    )
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=90)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


def write_truncated(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A JPEG whose header reads fine but whose body is cut: fails only when decoded."""
    write_image(path, 0, 0, size)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # the end of the scan data and the EOI marker
    return path


def make_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    for c in range(classes):
        for k in range(per_class):
            write_image(root / f"class{c}" / f"{k}.jpg", c, k)
    return root


def make_sfm120k(root: Path) -> dict:
    """cirtorch layout: retrieval-SfM-120k.pkl + ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>."""
    from dtop_export.training.datasets import cid2filename

    cids, clusters = [], []
    for c in range(3):
        for k in range(4):
            cid = f"{c:02d}{k:02d}abcdef{c}{k}"
            cids.append(cid)
            clusters.append(c)
            write_image(cid2filename(cid, root / "ims"), c, k)
    cids.append("missingimage0001")  # listed but not on disk
    clusters.append(2)
    cids.append("garbageimage0002")  # on disk but not an image
    clusters.append(2)
    write_garbage(cid2filename("garbageimage0002", root / "ims"))
    qidxs = [0, 4, 8, 1, 12]  # the last pair uses the missing image
    pidxs = [1, 5, 9, 2, 3]
    db = {
        "train": {"cids": cids, "cluster": clusters, "qidxs": qidxs, "pidxs": pidxs, "bbxs": [None] * len(qidxs)},
        "val": {"cids": cids[:4], "cluster": clusters[:4], "qidxs": [0], "pidxs": [1], "bbxs": [None]},
    }
    with open(root / "retrieval-SfM-120k.pkl", "wb") as fh:
        pickle.dump(db, fh)
    return db


def make_gldv2(root: Path) -> None:
    """GLDv2-clean: train_clean.csv (landmark_id,images) + train/a/b/c/<id>.jpg."""
    from dtop_export.training.datasets import gldv2_path

    rows = []
    for c in range(3):
        ids = [f"{c}{k}{c}f00d{k:04x}" for k in range(3)]
        for k, i in enumerate(ids):
            write_image(gldv2_path(root, i), c, k)
        rows.append((str(100 + c), " ".join(ids)))
    rows.append(("999", "abc0missing cd"))  # one missing image and one malformed id
    write_garbage(gldv2_path(root, "fffgarbage"))
    rows[0] = (rows[0][0], rows[0][1] + " fffgarbage")
    with open(root / "train_clean.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["landmark_id", "images"])
        w.writerows(rows)


def make_gldv1(root: Path) -> None:
    """GLDv1: train.csv (id,url,landmark_id) + train/<id>.jpg; a None label and a missing image."""
    rows = []
    for c in range(3):
        for k in range(3):
            i = f"{c:x}{k:x}0123456789abcd"
            write_image(root / "train" / f"{i}.jpg", c, k)
            rows.append((i, f"http://example.invalid/{i}.jpg", str(7 + c)))
    rows.append(("deadbeefdeadbeef", "http://example.invalid/x.jpg", "8"))  # not downloaded
    rows.append(("cafecafecafecafe", "http://example.invalid/y.jpg", "None"))  # no label
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "url", "landmark_id"])
        w.writerows(rows)


def make_nc_clean(root: Path) -> None:
    """NC-clean (dirtorch layout): annotations/annotation_clean_train.txt with 'path label' lines."""
    lines = []
    for c in range(3):
        for k in range(3):
            rel = f"images/{c}_{k}.jpg"
            write_image(root / rel, c, k)
            lines.append(f"{rel} landmark_{c}")
    lines.append("images/missing.jpg landmark_0")
    write_garbage(root / "images" / "bad.jpg")
    lines.append("images/bad.jpg landmark_1")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "annotation_clean_train.txt").write_text("\n".join(lines) + "\n")


def make_revisitop(root: Path, name: str = "tiny", classes: int = 3, db_per_class: int = 4) -> Path:
    """revisitop layout: <root>/<name>/gnd_<name>.pkl + jpg/; one query per class, its views as positives."""
    folder = root / name / "jpg"
    imlist, qimlist, gnd = [], [], []
    for c in range(classes):
        ids = []
        for k in range(db_per_class):
            n = f"db_{c}_{k}"
            write_image(folder / f"{n}.jpg", c, k + 10)
            ids.append(len(imlist))
            imlist.append(n)
        q = f"q_{c}"
        write_image(folder / f"{q}.jpg", c, 99, (64, 64))
        qimlist.append(q)
        gnd.append({"bbx": [4, 4, 60, 60], "easy": ids[:2], "hard": ids[2:3], "junk": ids[3:]})
    with open(root / name / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd, "ext": ".jpg", "qext": ".jpg"}, fh)
    return root
