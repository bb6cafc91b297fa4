"""Revisited Oxford/Paris protocol on hand-worked cases, ranking/distractor equivalences, extraction."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import TinyImageEngine
from PIL import Image

from dtop_export.errors import DToPError
from dtop_export.preprocess import PreprocessConfig
from dtop_export.retrieval.datasets import load_revisitop, resolve_dataset
from dtop_export.retrieval.evaluate import evaluate
from dtop_export.retrieval.extract import MULTI_SCALES, extract, parse_scales
from dtop_export.retrieval.metrics import (
    compute_ap,
    compute_map,
    compute_map_positions,
    evaluate_descriptors,
    rank_database,
    ranking_positions,
    revisited_metrics,
    setup_gnd,
)


def _ranks(*orders: list[int]) -> np.ndarray:
    """ranks[:, q] = database indices of query q, best first."""
    return np.array(orders).T


# hand-worked protocol cases --------------------------------------------------------------------------


def test_perfect_ranking() -> None:
    m, aps, pr, prs = compute_map(_ranks([0, 1, 2, 3]), [{"ok": [0, 1], "junk": []}], [1, 5, 10])
    assert m == pytest.approx(1.0) and aps[0] == pytest.approx(1.0)
    assert pr.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_worst_ranking() -> None:
    # the only positive last of 4: AP = (0/3 + 1/4) / 2 = 0.125
    m, _, pr, _ = compute_map(_ranks([0, 1, 2, 3]), [{"ok": [3], "junk": []}], [1, 5, 10])
    assert m == pytest.approx(0.125)
    # revisitop's mP@k: kq = min(max(pos), k) with 1-based pos = 4 -> P@1 = 0, P@5 = P@10 = 1/4
    assert pr.tolist() == pytest.approx([0.0, 0.25, 0.25])


def test_junk_ranked_before_positives_is_ignored() -> None:
    # order: junk(0), pos(1), neg(2), pos(3). Junk removed -> positives at 0 and 2:
    # AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 2 = 19/24
    gnd = [{"ok": [1, 3], "junk": [0]}]
    m, *_ = compute_map(_ranks([0, 1, 2, 3]), gnd)
    assert m == pytest.approx(19 / 24)
    # the same ranking with the junk image counted as a negative is worse: 1/3
    m_neg, *_ = compute_map(_ranks([0, 1, 2, 3]), [{"ok": [1, 3], "junk": []}])
    assert m_neg == pytest.approx(1 / 3)
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24)


def test_positives_missing_from_a_truncated_ranking_count_as_misses() -> None:
    # 2 positives exist, only one is in the (truncated) ranking, at the top: AP = 1/2
    m, *_ = compute_map(_ranks([5, 0, 1]), [{"ok": [5, 9], "junk": []}])
    assert m == pytest.approx(0.5)


def test_queries_without_positives_are_left_out_of_the_mean() -> None:
    gnd = [{"ok": [3], "junk": []}, {"ok": [], "junk": [1]}, {"ok": [0], "junk": []}]
    m, aps, pr, prs = compute_map(_ranks([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]), gnd, [1, 5])
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert m == pytest.approx((0.125 + 1.0) / 2)  # not / 3
    assert pr.tolist() == pytest.approx([(0 + 1) / 2, (0.25 + 1) / 2])


def test_all_queries_without_positives_give_nan() -> None:
    m, _, pr, _ = compute_map(_ranks([0, 1]), [{"ok": [], "junk": []}], [1])
    assert np.isnan(m) and np.isnan(pr).all()


def test_a_setup_without_positives_is_null_in_json_and_a_dash_in_the_table() -> None:
    """A data set whose queries have no hard positives (a user's own gnd_X.pkl: only easy labelled) scored Hard mAP
    NaN, written to --json as the literal NaN, which is not JSON (an audit of evaluate: jq and strict parsers refuse
    the file); it is null there and a dash in the table."""
    from dtop_export.retrieval.evaluate import EvalResult

    db = np.eye(4, dtype=np.float32)
    gnd = [{"easy": [0], "hard": [], "junk": [1]}, {"easy": [2], "hard": [], "junk": [3]}]
    m = evaluate_descriptors(db, db[[0, 2]], gnd)
    r = EvalResult("mine", m["map"], m["mp"], 2, 4, aps=m["aps"])
    out = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert out["map"]["hard"] is None and out["mp"]["hard"] == {"1": None, "5": None, "10": None}
    assert out["map"]["easy"] == 100.0 and out["ap_per_query"]["hard"] == [None, None]
    table = r.table()
    assert "| mAP | 100.00 | 100.00 | — |" in table and "no query has positives for hard" in table
    assert "nan" not in table


def test_distractor_ranking_reports_its_progress() -> None:
    """+R1M ranks a million distractors (minutes at N=1536) with no progress shown (an audit of evaluate at 1M x 256:
    ~8 s silent after the bars of the queries and the database); ``advance`` counts every distractor once."""
    rng = np.random.default_rng(0)
    db, q, dis = (rng.standard_normal((n, 8)).astype(np.float32) for n in (10, 3, 250))
    seen: list[int] = []
    ranking_positions(db, q, dis, chunk=100, advance=seen.append)
    assert seen == [100, 100, 50]


def test_ties_are_broken_by_database_index() -> None:
    db = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert rank_database(db, q)[:, 0].tolist() == [0, 2, 1]
    # image 2 ties with image 0 but ranks second: AP = (0/1 + 1/2) / 2 = 0.25
    assert evaluate_descriptors(db, q, [{"easy": [2], "hard": [], "junk": []}])["map"]["easy"] == pytest.approx(25)
    assert evaluate_descriptors(db, q, [{"easy": [0], "hard": [], "junk": []}])["map"]["easy"] == pytest.approx(100)
    # a tied junk image ranked first is ignored
    assert evaluate_descriptors(db, q, [{"easy": [2], "hard": [], "junk": [0]}])["map"]["easy"] == pytest.approx(100)


def test_easy_medium_hard_setups() -> None:
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    e, m, h = (setup_gnd(gnd, s)[0] for s in ("easy", "medium", "hard"))
    assert sorted(e["ok"]) == [0] and sorted(e["junk"]) == [1, 2]
    assert sorted(m["ok"]) == [0, 1] and sorted(m["junk"]) == [2]
    assert sorted(h["ok"]) == [1] and sorted(h["junk"]) == [0, 2]
    # ranking 3 (negative), 1 (hard), 2 (junk), 0 (easy):
    # easy: 0 at 3, junk {1, 2} before it -> position 1 -> AP 0.25
    # medium: 1 at 1, 0 at 3 with junk 2 before it -> positions 1, 2 -> AP (1/2/2 + (1/2 + 2/3)/2) / 2 = 5/12
    # hard: 1 at 1, junk {2, 0} after it -> AP 0.25
    res = revisited_metrics(gnd, ranks=_ranks([3, 1, 2, 0]))
    assert res["map"] == pytest.approx({"easy": 25.0, "medium": 500 / 12, "hard": 25.0})
    assert res["mp"]["medium"] == pytest.approx({1: 0.0, 5: 200 / 3, 10: 200 / 3})
    with pytest.raises(DToPError, match="unknown protocol setup"):
        setup_gnd(gnd, "extreme")


def test_positions_path_equals_ranks_path_on_random_data() -> None:
    rng = np.random.default_rng(3)
    n_db, nq = 60, 12
    db = rng.normal(size=(n_db, 8)).round(1).astype(np.float32)  # rounding creates ties
    q = rng.normal(size=(nq, 8)).round(1).astype(np.float32)
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(n_db)
        gnd.append({"ok": perm[: rng.integers(0, 6)], "junk": perm[6 : 6 + rng.integers(0, 4)]})
    a = compute_map(rank_database(db, q), gnd, [1, 5, 10])
    b = compute_map_positions(ranking_positions(db, q), gnd, [1, 5, 10])
    assert a[0] == pytest.approx(b[0])
    assert np.allclose(a[1], b[1], equal_nan=True) and np.allclose(a[3], b[3], equal_nan=True)


def test_an_index_listed_twice_counts_once_on_both_paths() -> None:
    """Found by review: the positions path kept an index listed twice in a ground-truth list (27.08 mAP) where
    revisitop's ``compute_map`` finds each image once (6.25)."""
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.5, 0.2]], dtype=np.float32)
    gnd = [{"easy": [0, 0], "hard": [], "junk": []}]
    assert evaluate_descriptors(db, q, gnd)["map"]["easy"] == pytest.approx(6.25)
    assert revisited_metrics(gnd, ranks=rank_database(db, q))["map"]["easy"] == pytest.approx(6.25)
    rng = np.random.default_rng(8)
    db = rng.normal(size=(30, 8)).astype(np.float32)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    gnd = [{"ok": rng.integers(0, 30, size=5), "junk": rng.integers(0, 30, size=4)} for _ in q]  # with repeats
    a = compute_map(rank_database(db, q), gnd, [1, 5, 10])
    b = compute_map_positions(ranking_positions(db, q), gnd, [1, 5, 10])
    assert a[0] == pytest.approx(b[0]) and np.allclose(a[1], b[1]) and np.allclose(a[3], b[3])


def test_distractors_equal_a_full_ranking_of_the_concatenation() -> None:
    rng = np.random.default_rng(4)
    db = rng.normal(size=(40, 6)).round(1).astype(np.float32)
    q = rng.normal(size=(7, 6)).round(1).astype(np.float32)
    dis = rng.normal(size=(300, 6)).round(1).astype(np.float32)
    dis[:5] = db[:5]  # exact ties between distractors and database images
    gnd = [{"easy": list(rng.choice(40, 3, replace=False)), "hard": [int(rng.integers(40))], "junk": []} for _ in q]
    full = np.argsort(-(np.concatenate([db, dis]) @ q.T), axis=0, kind="stable")
    expected = revisited_metrics(gnd, ranks=full)
    got = evaluate_descriptors(db, q, gnd, distractors=dis)
    for s in ("easy", "medium", "hard"):
        assert got["map"][s] == pytest.approx(expected["map"][s])
        assert got["mp"][s] == pytest.approx(expected["mp"][s])
    # chunked scoring gives the same positions
    assert np.array_equal(ranking_positions(db, q, dis, chunk=17), ranking_positions(db, q, dis))
    # distractors can only push positives down
    assert all(got["map"][s] <= evaluate_descriptors(db, q, gnd)["map"][s] + 1e-9 for s in got["map"])
    with pytest.raises(DToPError, match="distractor descriptors are 5-d"):
        evaluate_descriptors(db, q, gnd, distractors=dis[:, :5])


@pytest.mark.parametrize(("n_db", "nq", "dim"), [(7, 70, 128), (50, 3, 256), (600, 1, 1536)])
def test_a_distractor_that_copies_a_database_image_ties_with_it(n_db: int, nq: int, dim: int) -> None:
    """Found by review: database and distractor scores came from matrix products of different shapes, which BLAS
    computes with different kernels (~3e-8 apart), so an exact copy of a database image among the distractors ranked
    before it in 275 of 600 pairs; ties go to the database image."""
    rng = np.random.default_rng(n_db)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    db, q = unit(rng.normal(size=(n_db, dim))), unit(rng.normal(size=(nq, dim)))
    others = unit(rng.normal(size=(3000, dim)))
    dis = np.concatenate([others[:1000], db[::-1], others[1000:]])  # every database image once more, mid-file
    above = np.argsort(rank_database(db, q), axis=0)  # how many database images rank before each
    expected = ranking_positions(db, q, others) + above  # their copies rank before too; its own copy after it
    assert np.array_equal(ranking_positions(db, q, dis), expected)
    assert np.array_equal(ranking_positions(db, q, dis, chunk=333), expected)


def test_distractors_that_are_no_npy_file_are_named_as_such(tmp_path: Path) -> None:
    """Found by review: a file named .npy that is not one got numpy's advice to load it unsafely with allow_pickle."""
    from dtop_export.corpus.integrity import open_distractors

    fake = tmp_path / "r1m.npy"
    fake.write_text("descriptors, honest\n")
    with pytest.raises(DToPError) as e:
        open_distractors(fake)
    assert str(e.value) == f"cannot read distractor descriptors {fake}: not a NumPy .npy array file"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DToPError, match="objects.npy: Array can't be memory-mapped: Python objects"):
        open_distractors(tmp_path / "objects.npy")


# data set loading ------------------------------------------------------------------------------------


def _write_tiny_set(root: Path, name: str = "tiny") -> Path:
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    imlist, qimlist, gnd = [], [], []
    for i, (cname, c) in enumerate(colours.items()):
        for k in range(2):
            a = np.full((48, 64, 3), c, dtype=np.uint8)
            a[:, : 8 * (k + 1)] = 128
            Image.fromarray(a).save(folder / "jpg" / f"{cname}{k}.jpg", quality=95)
            imlist.append(f"{cname}{k}")
        q = np.full((40, 40, 3), 255, dtype=np.uint8)
        q[10:30, 5:35] = c
        Image.fromarray(q).save(folder / "jpg" / f"q_{cname}.jpg", quality=95)
        qimlist.append(f"q_{cname}")
        gnd.append({"bbx": [5.0, 10.0, 35.0, 30.0], "easy": [2 * i], "hard": [2 * i + 1], "junk": []})
    with open(folder / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh)
    return folder


def test_load_revisitop_layout(tmp_path: Path) -> None:
    _write_tiny_set(tmp_path)
    ds = load_revisitop(tmp_path, "tiny")
    assert ds.n_images == 6 and ds.n_queries == 3
    assert ds.images[0] == tmp_path / "tiny" / "jpg" / "red0.jpg" and all(p.exists() for p in ds.images)
    assert ds.bboxes[1] == [5.0, 10.0, 35.0, 30.0] and ds.gnd[2] == {"easy": [4], "hard": [5], "junk": []}
    assert resolve_dataset(str(tmp_path / "tiny")).images == ds.images
    with pytest.raises(DToPError, match="gnd_roxford5k.pkl not found"):
        resolve_dataset("roxford5k", tmp_path)
    with pytest.raises(DToPError, match="unknown data set"):
        resolve_dataset("nope", tmp_path)


def test_load_revisitop_rejects_bad_ground_truth(tmp_path: Path) -> None:
    folder = _write_tiny_set(tmp_path)
    with open(folder / "gnd_tiny.pkl", "rb") as fh:
        cfg = pickle.load(fh)
    cfg["gnd"][0]["easy"] = [99]
    with open(folder / "gnd_tiny.pkl", "wb") as fh:
        pickle.dump(cfg, fh)
    with pytest.raises(DToPError, match="out of range"):
        load_revisitop(tmp_path, "tiny")
    (folder / "gnd_tiny.pkl").write_bytes(b"garbage")
    with pytest.raises(DToPError, match="cannot read"):
        load_revisitop(tmp_path, "tiny")
    # found by a real-layouts audit: evaluation read gnd_<name>.pkl with pickle.load, so a downloaded file could run
    # code (training's readers already refused that)
    (folder / "gnd_tiny.pkl").write_bytes(pickle.dumps({"imlist": _Evil()}))
    with pytest.raises(DToPError, match=r"refusing to unpickle [\w.]*system"):
        load_revisitop(tmp_path, "tiny")


def _rewrite_gnd(folder: Path, change, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:  # noqa: ANN001
    with open(folder / "gnd_tiny.pkl", "rb") as fh:
        cfg = pickle.load(fh)
    change(cfg)
    with open(folder / "gnd_tiny.pkl", "wb") as fh:
        pickle.dump(cfg, fh, protocol=protocol)


def _set_query(key: str, value: object):  # noqa: ANN202
    return lambda cfg: cfg["gnd"][1].__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_query("bbx", "abc"), r"query 1 \(q_green\) bbx 'abc' is not a box: give 4 finite numbers"),
        (_set_query("bbx", [1.0, 2.0, 3.0]), r"query 1 \(q_green\) bbx \[1.0, 2.0, 3.0\] is not a box"),
        (_set_query("bbx", [1.0, float("nan"), 3.0, 4.0]), r"query 1 \(q_green\) bbx \[1.0, nan, 3.0, 4.0\]"),
        (_set_query("bbx", np.array([1.0, 2.0, np.inf, 4.0])), r"query 1 \(q_green\) bbx \[1.0, 2.0, inf, 4.0\]"),
        (_set_query("bbx", [5.0, 10.0, 5.0, 30.0]), r"query 1 \(q_green\) bbx .* with x2 > x1 and y2 > y1"),
        (_set_query("bbx", [5.0, 30.0, 35.0, 10.0]), r"query 1 \(q_green\) bbx .* is not a box"),
        (_set_query("junk", None), r"query 1 \(q_green\) junk is None: give a list of database image indices"),
        (_set_query("hard", [1.7]), r"query 1 \(q_green\) hard is \[1.7\]: give a list of database image"),
        (_set_query("easy", ["2"]), r"query 1 \(q_green\) easy is \['2'\]: give a list"),
        (_set_query("easy", [True]), r"query 1 \(q_green\) easy is \[True\]: give a list"),
        (_set_query("easy", 2), r"query 1 \(q_green\) easy is 2: give a list"),
        (_set_query("easy", [-1]), r"query 1 \(q_green\) easy index out of range 0..5"),
        (_set_query("easy", np.array([6])), r"query 1 \(q_green\) easy index out of range 0..5: \[6\]"),
        (lambda cfg: cfg.update(qimlist=[], gnd=[]), r"qimlist is empty: a revisitop set needs at least one query"),
        (lambda cfg: cfg.update(imlist=[]), r"imlist is empty: a revisitop set needs at least one database image"),
        (lambda cfg: cfg.update(imlist="red0"), r"imlist should be a list of image names"),
        (lambda cfg: cfg["gnd"].pop(), r"3 queries but 2 ground-truth entries"),
        (lambda cfg: cfg.update(gnd=None), r"gnd is a NoneType, not a list of one entry per query"),
    ],
)
def test_malformed_ground_truth_is_one_line_naming_the_query_and_key(tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    """Found by review: a box of text, None for a list, a NaN box, fractional indices and empty lists gave
    tracebacks (ValueError, TypeError), failed mid-extraction, were rounded silently (1.7 -> 1) or embedded the whole
    set to print only dashes."""
    folder = _write_tiny_set(tmp_path)
    _rewrite_gnd(folder, change)
    with pytest.raises(DToPError, match=message):
        load_revisitop(tmp_path, "tiny")


def test_whole_numbers_of_any_type_are_read_as_indices(tmp_path: Path) -> None:
    folder = _write_tiny_set(tmp_path)
    _rewrite_gnd(folder, lambda cfg: cfg["gnd"][0].update(easy=np.array([0], dtype=np.int32), hard=[1.0], junk=()))
    ds = load_revisitop(tmp_path, "tiny")
    assert ds.gnd[0] == {"easy": [0], "hard": [1], "junk": []} and all(type(i) is int for i in ds.gnd[0]["hard"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("empty", [False, True])
def test_numpy_ground_truth_loads_at_every_pickle_protocol(tmp_path: Path, protocol: int, empty: bool) -> None:
    """Found by review: the safe unpickler refused ordinary numpy pickles: protocol 5 (numpy's ``_frombuffer``) and
    empty arrays at protocol <= 2 (``__builtin__.bytes``)."""
    folder = _write_tiny_set(tmp_path)

    def as_numpy(cfg: dict) -> None:
        for g in cfg["gnd"]:
            g["bbx"] = np.asarray(g["bbx"], dtype=np.float64)
            for k in ("easy", "hard", "junk"):
                g[k] = np.asarray([] if empty and k == "junk" else g[k] or [0], dtype=np.int64)

    _rewrite_gnd(folder, as_numpy, protocol)
    ds = load_revisitop(tmp_path, "tiny")
    assert ds.bboxes[0] == [5.0, 10.0, 35.0, 30.0] and ds.gnd[1]["easy"] == [2] and ds.gnd[1]["hard"] == [3]
    assert ds.gnd[1]["junk"] == ([] if empty else [0])


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_evaluate_refuses_missing_images_before_embedding(tmp_path: Path) -> None:
    # found by a real-layouts audit: a jpg/ with images missing failed only once the extraction reached one
    # ("image ... not found" after the queries and part of the database were embedded)
    folder = _write_tiny_set(tmp_path)
    names = sorted((folder / "jpg").iterdir())
    names[-1].unlink()
    names[-2].unlink()
    engine = TinyImageEngine()
    with pytest.raises(
        DToPError, match=r"2 of the \d+ images of gnd_tiny.pkl are missing \(first: .*\): put the whole"
    ):
        evaluate(engine, tmp_path, "tiny", progress=False, image_size=64)
    assert engine.calls == []


def test_evaluate_crops_queries_to_their_box(tmp_path: Path) -> None:
    _write_tiny_set(tmp_path)
    engine = TinyImageEngine()
    res = evaluate(engine, tmp_path, "tiny", progress=False, image_size=64)
    # cropped, each query is a pure colour: its own object's two views rank first
    assert res.map == pytest.approx({"easy": 100.0, "medium": 100.0, "hard": 100.0})
    # the 30x20 box of a 40x40 query at 64 px: never enlarged (cirtorch), 30x20 -> stride 16: 32x16 (was 64x48)
    assert engine.calls[0][2:] == (16, 32)
    uncropped = TinyImageEngine()
    evaluate(uncropped, tmp_path, "tiny", progress=False, image_size=64, crop_queries=False)
    assert uncropped.calls[0][2:] == (64, 64)  # the whole 40x40 query
    q_cropped = extract(engine, [tmp_path / "tiny/jpg/q_red.jpg"], bboxes=[[5, 10, 35, 30]], progress=False)
    q_whole = extract(engine, [tmp_path / "tiny/jpg/q_red.jpg"], progress=False)
    assert (q_cropped @ q_whole.T)[0, 0] < 0.999
    d = res.to_dict()
    json.dumps(d)
    assert d["n_queries"] == 3 and d["crop_queries"] is True and d["map"]["hard"] == 100.0
    table = res.table()
    assert table.splitlines()[2].startswith("| mAP | 100.00") and "mP@10" in table


def test_evaluate_uses_the_datasets_image_size(tmp_path: Path) -> None:
    folder = _write_tiny_set(tmp_path)
    with open(folder / "gnd_tiny.pkl", "rb") as fh:
        cfg = pickle.load(fh)
    cfg["image_size"] = 32
    with open(folder / "gnd_tiny.pkl", "wb") as fh:
        pickle.dump(cfg, fh)
    engine = TinyImageEngine()
    res = evaluate(engine, tmp_path, "tiny", progress=False)
    assert res.image_size == 32 and max(engine.calls[-1][2:]) == 32


# extraction ------------------------------------------------------------------------------------------


def _images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    sizes = [(64, 48), (48, 64), (64, 48), (80, 80), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def test_multiscale_is_the_normalised_mean_of_normalised_descriptors() -> None:
    engine = TinyImageEngine()
    imgs = _images()
    scales = (1.0, 0.5)
    ms = extract(engine, imgs, scales=scales, progress=False, image_size=64)
    singles = [extract(engine, imgs, scales=(s,), progress=False, image_size=64) for s in scales]
    expected = singles[0] + singles[1]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(ms, expected, atol=1e-6)
    assert not np.allclose(ms, singles[0], atol=1e-3)
    assert np.allclose(np.linalg.norm(ms, axis=1), 1.0, atol=1e-6)


def test_extract_image_sizes_per_scale() -> None:
    engine = TinyImageEngine()
    extract(engine, _images(1), scales=MULTI_SCALES, progress=False, image_size=128)
    # 64x48 image: longer side 128, 90.5, 181 -> widths 128, 96, 176; heights rounded to 16
    assert [c[2:] for c in engine.calls] == [(96, 128), (64, 96), (128, 176)]


def test_batching_groups_equal_shapes_and_changes_nothing() -> None:
    imgs = _images()
    one = TinyImageEngine()
    a = extract(one, imgs, progress=False, image_size=64, batch_size=1)
    many = TinyImageEngine()
    b = extract(many, imgs, progress=False, image_size=64, batch_size=4)
    assert np.allclose(a, b, atol=1e-6)
    assert max(c[0] for c in many.calls) == 3  # the three 64x48 images went together
    assert sum(c[0] for c in many.calls) == len(imgs)


def test_progress_counts_images_once_every_scale_is_embedded(tmp_path: Path) -> None:
    """``advance`` fires after the engine ran on an image's last scale (was: as soon as it was read, so the
    bar ran ahead of batched work and a corpus job's start-up ended before anything was embedded)."""
    engine = TinyImageEngine()
    log: list[tuple[int, int]] = []  # (images reported done, engine calls made by then)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    imgs: list[Image.Image | Path] = [*_images(), bad]
    extract(
        engine, imgs, scales=(1.0, 0.5), progress=False, image_size=128, batch_size=4, errors=[],
        advance=lambda k: log.append((k, len(engine.calls))),
    )  # fmt: skip
    # nothing fills a batch of 4 while reading, so only the unreadable file is reported before the engine
    # runs; then each image when its second scale's batch is done: the three 64x48 images (2 batches), the
    # 48x64 one (2 more), the 80x80 one (2 more)
    assert log == [(1, 0), (3, 2), (1, 4), (1, 6)]


def test_two_scales_of_one_shape_in_one_batch_finish_the_image() -> None:
    engine, done = TinyImageEngine(), []
    img = _images(1)
    same = extract(engine, img, scales=(1.0, 1.05), progress=False, image_size=64, batch_size=2, advance=done.append)
    assert engine.calls == [(2, 3, 48, 64)]  # both scales round to one shape: one batch holds the image twice
    assert done == [1]
    assert np.allclose(same, extract(TinyImageEngine(), img, progress=False, image_size=64), atol=1e-6)


def test_unreadable_images_are_recorded_or_raised(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _images(1)[0].save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    errors: list[tuple[int, str]] = []
    out = extract(TinyImageEngine(), [good, bad, good], progress=False, image_size=64, errors=errors)
    assert out.shape == (2, 51) and [i for i, _ in errors] == [1] and "bad.jpg" in errors[0][1]
    with pytest.raises(DToPError, match="bad.jpg"):
        extract(TinyImageEngine(), [good, bad], progress=False, image_size=64)


def test_extract_uses_the_given_preprocessing() -> None:
    imgs = _images(2)
    a = extract(TinyImageEngine(), imgs, PreprocessConfig(mean=(0.5, 0.5, 0.5)), progress=False, image_size=64)
    b = extract(TinyImageEngine(), imgs, PreprocessConfig(mean=(0.2, 0.5, 0.8)), progress=False, image_size=64)
    assert not np.allclose(a, b, atol=1e-3)


def test_parse_scales() -> None:
    assert parse_scales("1,0.707,1.414") == (1.0, 0.707, 1.414)
    assert parse_scales("ms") == MULTI_SCALES
    for bad in ("", "1,x", "0", "-1", "nan"):
        with pytest.raises(DToPError, match="scales"):
            parse_scales(bad)


def test_small_model_on_the_sample_set(small_model, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.preprocess import default_preprocess

    root = tmp_path_factory.getbasetemp() / "data"
    engine = TorchEngine(small_model, default_preprocess("dtop_tiny_r_s16", 16))
    res = evaluate(engine, root, "sample", progress=False, image_size=128)
    assert res.n_queries == 20 and res.n_images == 90 and res.image_size == 128
    assert all(0.0 < res.map[s] <= 100.0 for s in res.map)
    # ranking and metric code against a direct computation from the same descriptors
    ds = load_revisitop(root, "sample")
    q = extract(engine, ds.queries, bboxes=ds.bboxes, progress=False, image_size=128)
    db = extract(engine, ds.images, progress=False, image_size=128)
    direct = revisited_metrics(ds.gnd, ranks=rank_database(db, q))
    assert res.map == pytest.approx(direct["map"], abs=1e-6)
