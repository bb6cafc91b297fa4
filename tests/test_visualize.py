"""The retrieval picture marks each result by its label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_export.retrieval.visualize import COLOURS, retrieval_grid


def test_retrieval_grid_colours_results(tmp_path: Path) -> None:
    q = [Image.new("RGB", (80, 60), (0, 0, 0)), Image.new("L", (50, 90), 128)]
    res = [[Image.new("RGB", (40, 40))] * 3, [Image.new("RGB", (40, 40))] * 3]
    lab = [["positive", "junk", "negative"], ["negative", "positive", "positive"]]
    out = retrieval_grid(q, res, lab, tmp_path / "r.png", tile=100, border=5)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (24 + 4 + 2 * (100 + 18 + 4), 4 * (100 + 4) + 4, 3)
    y0 = 24
    for row, labels in enumerate(lab):
        y = y0 + row * (100 + 18 + 4) + 1  # inside the top border of each tile
        assert tuple(img[y, 4 + 50]) == COLOURS["query"]
        for j, label in enumerate(labels):
            x = 4 + (j + 1) * 104 + 50
            assert tuple(img[y, x]) == COLOURS[label], (row, j)
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_pick_queries_spreads_over_the_ap_ranking() -> None:
    from dtop_export.retrieval.visualize import pick_queries

    aps = [50.0, None, 100.0, 10.0, 75.0, 0.0]
    assert pick_queries(aps, 3) == [2, 0, 5]  # best, middle, worst; queries without positives left out
    assert pick_queries(aps, 10) == [2, 4, 0, 3, 5]
    assert pick_queries([None, None], 3) == []


def test_retrieval_picture_marks_ground_truth(tmp_path: Path) -> None:
    """Descriptors built from the ground truth: every query's top results are its positives (green); a
    query whose descriptor is flipped ranks its positives last, so its row is red."""
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.metrics import setup_gnd
    from dtop_export.retrieval.visualize import retrieval_picture

    ds = resolve_dataset("sample", tmp_path / "data")
    gnd = setup_gnd(ds.gnd, "medium")
    nq = ds.n_queries
    q = np.eye(nq, dtype=np.float32)
    db = np.zeros((ds.n_images, nq), dtype=np.float32)
    for i, g in enumerate(gnd):
        db[g["ok"], i] = 1.0
    q[0] *= -1  # query 0 now prefers everything but its positives
    out = retrieval_picture(ds, db, q, tmp_path / "r.png", n_queries=nq, k=3, tile=60)
    img = np.asarray(Image.open(out).convert("RGB"))
    row_h = 60 + 18 + 4
    rows = (img.shape[0] - 24 - 4) // row_h
    worst = None
    for row in range(rows):
        y = 24 + row * row_h + 1
        tiles = [tuple(img[y, 4 + j * 64 + 30]) for j in range(4)]
        assert tiles[0] == COLOURS["query"]
        if tiles[1:] != [COLOURS["positive"]] * 3:
            worst = row
            assert COLOURS["positive"] not in tiles[1:]
    assert worst == rows - 1  # only the flipped query fails, and it is listed last (lowest AP)


def _small_set(tmp_path: Path, junk_only: bool = False):  # noqa: ANN202
    """Four database images and two queries (no boxes); with ``junk_only`` no query has easy or hard images."""
    import pickle

    folder = tmp_path / "small"
    (folder / "jpg").mkdir(parents=True)
    names = [f"db{i}" for i in range(4)] + ["q0", "q1"]
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(folder / "jpg" / f"{name}.jpg")
    gnd = [{"bbx": None, "easy": [] if junk_only else [i], "hard": [], "junk": [2 + i]} for i in range(2)]
    with open(folder / "gnd_small.pkl", "wb") as fh:
        pickle.dump({"imlist": names[:4], "qimlist": names[4:], "gnd": gnd}, fh)
    return folder


def test_the_picture_ranks_with_the_distractors_as_the_table_does(tmp_path: Path) -> None:
    """Found by review: `evaluate --picture --distractors` ranked the database alone, so its APs and top results
    disagreed with the table; a distractor is now a grey tile marked wrong, where the evaluation ranked it."""
    from dtop_export.retrieval.datasets import resolve_dataset
    from dtop_export.retrieval.metrics import ranking_positions
    from dtop_export.retrieval.visualize import retrieval_picture

    ds = resolve_dataset(str(_small_set(tmp_path)))
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.8, 0.0, 0.6, 0.0], [0.0, 0.8, 0.0, 0.6]], dtype=np.float32)
    dis = np.array([[0.8, 0.0, 0.6, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)  # beats query 0's positive
    positions = ranking_positions(db, q, dis)
    alone = np.asarray(Image.open(retrieval_picture(ds, db, q, tmp_path / "a.png", k=2, tile=60)).convert("RGB"))
    out = retrieval_picture(ds, db, q, tmp_path / "d.png", k=2, tile=60, positions=positions, n_distractors=2)
    ranked = np.asarray(Image.open(out).convert("RGB"))
    row_h, y = 60 + 18 + 4, 24 + 1
    # rows: best AP first; alone both queries find their positive first, with distractors query 0 drops to row 2
    assert [tuple(alone[y + r * row_h, 4 + 64 + 30]) for r in range(2)] == [COLOURS["positive"]] * 2
    assert tuple(ranked[y, 4 + 64 + 30]) == COLOURS["positive"]  # query 1: no distractor above its positive
    assert tuple(ranked[y + row_h, 4 + 64 + 30]) == COLOURS["negative"]  # query 0: a distractor first...
    assert tuple(ranked[y + row_h + 30, 4 + 64 + 30]) == (200, 200, 200)  # ... drawn as a grey tile
    assert tuple(ranked[y + row_h, 4 + 2 * 64 + 30]) == COLOURS["positive"]  # then its positive


def test_a_picture_of_a_set_without_positives_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: `evaluate --picture` on a set whose queries have no easy/hard images embedded everything,
    wrote --json, then failed with a ValueError traceback; now refused before the model is even opened."""
    from cli_helpers import cli

    folder = _small_set(tmp_path, junk_only=True)
    model = tmp_path / "m.onnx"
    model.write_text("never opened")
    j, pic = tmp_path / "e.json", tmp_path / "e.png"
    assert cli("evaluate", str(model), "-d", str(folder), "--json", str(j), "--picture", str(pic)) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --picture: no query of small has easy or hard images to show (its ground truth lists none): "
        "leave --picture out\n"
    )
    assert not j.exists() and not pic.exists()


def test_evaluate_writes_json_and_picture_as_one_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: --json was written before the picture was drawn, so a picture that failed left it behind."""
    from cli_helpers import cli
    from eval_helpers import TinyImageEngine

    import dtop_export.cli.evaluate as cli_evaluate
    import dtop_export.retrieval.visualize as visualize
    from dtop_export.errors import DToPError

    folder = _small_set(tmp_path)
    monkeypatch.setattr(cli_evaluate, "open_engine", lambda model, precision=None: TinyImageEngine())
    j, pic = tmp_path / "e.json", tmp_path / "e.png"
    args = ("evaluate", "m.onnx", "-d", str(folder), "--no-crop", "--image-size", "32", "--no-progress")
    args = (*args, "--json", str(j))
    assert cli(*args, "--picture", str(pic)) == 0
    assert j.is_file() and pic.is_file() and capsys.readouterr().out.endswith(f"wrote {j}\nwrote {pic}\n")

    def fails(*args: object, **kwargs: object) -> None:
        raise DToPError("cannot read image db0.jpg: truncated")

    monkeypatch.setattr(visualize, "retrieval_picture", fails)
    j.unlink()
    pic.unlink()
    assert cli(*args, "--picture", str(pic)) == 2
    assert capsys.readouterr().err == "error: cannot read image db0.jpg: truncated\n"
    assert sorted(tmp_path.iterdir()) == [folder]
