"""The embedded sample set: revisitop layout, deterministic, cached, labels that follow difficulty."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import TinyImageEngine
from PIL import Image

from dtop_export.errors import DToPError
from dtop_export.retrieval.datasets import load_revisitop
from dtop_export.retrieval.evaluate import evaluate
from dtop_export.retrieval.metrics import evaluate_descriptors
from dtop_export.retrieval.sample_data import MAX_SIDE, build_sample_dataset


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample_root")
    build_sample_dataset(root)
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_layout_and_labels(sample_root: Path) -> None:
    folder = sample_root / "sample"
    with open(folder / "gnd_sample.pkl", "rb") as fh:
        cfg = pickle.load(fh)
    assert {"imlist", "qimlist", "gnd"} <= set(cfg)
    n_db, nq = len(cfg["imlist"]), len(cfg["qimlist"])
    assert 60 <= n_db <= 100 and 15 <= nq <= 25
    assert len(set(cfg["imlist"]) | set(cfg["qimlist"])) == n_db + nq  # queries are not database images
    labelled: set[int] = set()
    for qname, g in zip(cfg["qimlist"], cfg["gnd"]):
        easy, hard, junk = set(g["easy"]), set(g["hard"]), set(g["junk"])
        assert easy and hard and junk and not (easy & hard or easy & junk or hard & junk)
        labelled |= easy | hard | junk
        with Image.open(folder / "jpg" / f"{qname}.jpg") as q:
            x1, y1, x2, y2 = g["bbx"]
            assert 0 <= x1 < x2 <= q.width and 0 <= y1 < y2 <= q.height
            assert (x2 - x1) * (y2 - y1) >= 0.2 * q.width * q.height
        # the query's object name appears in every image labelled for it
        obj = qname.split("_")[1]
        assert all(cfg["imlist"][i].startswith(obj) for i in easy | hard | junk)
    distractors = [i for i, n in enumerate(cfg["imlist"]) if n.startswith("distractor_")]
    assert len(distractors) >= 10 and not labelled & set(distractors)
    for name in cfg["imlist"] + cfg["qimlist"]:
        with Image.open(folder / "jpg" / f"{name}.jpg") as im:
            assert im.format == "JPEG" and max(im.size) <= MAX_SIDE
    ds = load_revisitop(sample_root, "sample")
    assert ds.n_images == n_db and ds.image_size == 256


def test_deterministic_and_cached(sample_root: Path, tmp_path: Path) -> None:
    first = _digest(sample_root / "sample")
    other = build_sample_dataset(tmp_path)
    assert _digest(other) == first  # same bytes from a fresh build
    pkl = other / "gnd_sample.pkl"
    before = pkl.stat().st_mtime_ns
    assert build_sample_dataset(tmp_path) == other and pkl.stat().st_mtime_ns == before  # reused
    (other / "jpg" / "astronaut_easy_scale.jpg").unlink()  # a damaged cache is rebuilt
    build_sample_dataset(tmp_path)
    assert _digest(other) == first
    before = pkl.stat().st_mtime_ns
    build_sample_dataset(tmp_path, force=True)
    assert pkl.stat().st_mtime_ns != before and _digest(other) == first
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]  # no temporary folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "mine.txt").write_text("keep me")
    with pytest.raises(DToPError, match="not a sample data set"):
        build_sample_dataset(tmp_path)
    assert (tmp_path / "sample" / "mine.txt").read_text() == "keep me"


def test_labels_follow_difficulty(sample_root: Path) -> None:
    """A trivial colour-layout descriptor finds easy views far better than hard ones, and beats chance."""
    res = evaluate(TinyImageEngine(), sample_root, "sample", progress=False, image_size=128)
    assert res.map["easy"] > res.map["medium"] > res.map["hard"]
    assert res.map["easy"] - res.map["hard"] > 20
    ds = load_revisitop(sample_root, "sample")
    rng = np.random.default_rng(0)
    chance = evaluate_descriptors(rng.normal(size=(ds.n_images, 51)), rng.normal(size=(ds.n_queries, 51)), ds.gnd)
    assert res.map["easy"] > chance["map"]["easy"] + 40
