"""Nearest-neighbour search: faiss exact = numpy brute force, IVF-PQ recall, lazy import, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtop_export.errors import DToPError
from dtop_export.retrieval.search import build_index, have_faiss, knn

needs_faiss = pytest.mark.skipif(not have_faiss(), reason="faiss-cpu not installed")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int = 500, nq: int = 20, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    db = _unit(rng.normal(size=(n, dim)))
    q = _unit(db[:nq] + 0.2 * rng.normal(size=(nq, dim)) / np.sqrt(dim))
    return db, q


def test_numpy_exact_is_brute_force() -> None:
    db, q = _data()
    scores, ids = knn(db, q, 10, use_faiss=False)
    full = q @ db.T
    expected = np.argsort(-full, axis=1)[:, :10]
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(full, expected, axis=1), atol=1e-6)
    assert np.array_equal(ids[:, 0], np.arange(len(q)))  # each query's source is its nearest neighbour


@needs_faiss
def test_faiss_exact_matches_numpy() -> None:
    db, q = _data()
    s1, i1 = knn(db, q, 10)
    s2, i2 = knn(db, q, 10, use_faiss=False)
    assert build_index(db).backend == "faiss"
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)


def test_k_larger_than_the_database_pads() -> None:
    db, q = _data(n=5, nq=2)
    scores, ids = knn(db, q, 8, use_faiss=False)
    assert ids.shape == (2, 8) and (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


@needs_faiss
def test_ivfpq_finds_the_true_neighbour() -> None:
    db, q = _data(n=2000, nq=100, dim=32, seed=1)
    index = build_index(db, "ivfpq", nprobe=8)
    assert index.method == "ivfpq" and index.ntotal == 2000
    _, ids = index.search(q, 10)
    recall = np.mean([i in row for i, row in enumerate(ids)])
    assert recall >= 0.9, recall


@needs_faiss
def test_ivfpq_refuses_what_it_cannot_do() -> None:
    db, _ = _data(n=100)
    with pytest.raises(DToPError, match="at least"):
        build_index(db, "ivfpq", nlist=64, nbits=8)
    with pytest.raises(DToPError, match="must divide"):
        build_index(db, "ivfpq", m=5)


def test_errors() -> None:
    db, q = _data()
    with pytest.raises(DToPError, match="unknown search method"):
        build_index(db, "hnsw")
    with pytest.raises(DToPError, match="queries are 16-d"):
        knn(db, q[:, :16], 5)
    with pytest.raises(DToPError, match="matrix"):
        build_index(db[0])
    with pytest.raises(DToPError, match="needs faiss"):
        build_index(db, "ivfpq", use_faiss=False)


def test_faiss_is_imported_lazily() -> None:
    code = (
        "import sys, dtop_export.retrieval.search, dtop_export.retrieval.evaluate; "
        "assert 'faiss' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _query() -> str:
    from conftest import CORPUS_PHOTOS

    from dtop_export.retrieval.sample_data import skimage_data_dir

    return str(skimage_data_dir() / CORPUS_PHOTOS[0])


@needs_faiss
def test_search_refuses_a_file_that_is_no_model_before_any_warning(
    small_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`search corpus.faiss notes.txt ...`: one line saying what a MODEL is, and no warning before it that notes.txt
    "records no checkpoint" (the provenance check ran before the model was looked at)."""
    from cli_helpers import cli

    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    assert cli("search", str(small_index), str(notes), _query()) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: don't know how to run") and captured.err.count("\n") == 1, captured.err
    assert "warning" not in captured.out + captured.err


@needs_faiss
def test_search_says_nprobe_is_ignored_on_a_flat_index(
    small_index: Path, small_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nprobe on a flat (exact) index is a note on stderr, as `index` notes IVF-PQ options for a flat index; the
    results are the same as without it."""
    from cli_helpers import cli

    assert cli("search", str(small_index), str(small_onnx), _query(), "-k", "3") == 0
    plain = capsys.readouterr()
    assert "nprobe" not in plain.err
    assert cli("search", str(small_index), str(small_onnx), _query(), "-k", "3", "--nprobe", "5") == 0
    noted = capsys.readouterr()
    assert noted.err == f"note: {small_index} is a flat index (exact): --nprobe (IVF-PQ indexes) ignored\n"
    assert noted.out == plain.out


@needs_faiss
def test_an_index_and_a_shard_folder_swapped_are_named_as_such(
    small_index: Path, small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newcomer's mix-ups (a README audit): `search corpus/ ...` said 'corpus not found' of a folder that exists,
    `index corpus.faiss -o ...` 'shard folder corpus.faiss not found' of a file that exists, and `evaluate
    --distractors corpus.faiss` ended in numpy's advice to unpickle the index; each is one line saying what to give."""
    from cli_helpers import cli

    folder = tmp_path / "corpus"
    folder.mkdir()
    cases = [
        (("search", str(folder), str(small_onnx), _query()), "is a folder, not an index: index its shards with"),
        (("index", str(small_index), "-o", str(tmp_path / "x.faiss")), "is a file, not a shard folder"),
        (("evaluate", str(small_onnx), "--distractors", str(small_index)), "give an .npy"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert "not found" not in err and "pickle" not in err and "warning" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@needs_faiss
def test_search_picture_draws_an_unreadable_result_as_a_grey_tile(
    small_index: Path, small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Found by review: `search --picture` wrote --json, then failed (exit 2) on a result image it could not read (moved
    since it was embedded), leaving the JSON behind; now that result is a grey tile with a warning line."""
    from cli_helpers import cli
    from PIL import Image

    import dtop_export.corpus.source as source

    read = source.load_item
    gone: list[str] = []

    def load_item(path: str, budget: object = None) -> Image.Image:
        if not gone:
            gone.append(path)
        if path == gone[0]:
            raise DToPError(f"image {path} not found")
        return read(path)

    monkeypatch.setattr(source, "load_item", load_item)
    j, pic = tmp_path / "hits.json", tmp_path / "hits.png"
    args = ("search", str(small_index), str(small_onnx), _query(), "-k", "3", "--json", str(j), "--picture", str(pic))
    assert cli(*args) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: --picture: image {gone[0]} not found: drawn as a grey tile\n"
    assert captured.out.endswith(f"wrote {j}\nwrote {pic}\n")
    hits = json.loads(j.read_text())["queries"][0]["results"]
    assert gone[0] == hits[0]["path"]
    img = np.asarray(Image.open(pic).convert("RGB"))
    assert tuple(img[24 + 20, 4 + 164 + 20]) == (200, 200, 200)  # the first result's tile: the grey placeholder
