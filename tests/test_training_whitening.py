"""Whitening: Lw on synthetic pairs whitens and equals the textbook (cirtorch) steps; PCA; the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_data import make_folder
from cli_helpers import cli

from dtop_export.checkpoint import load_checkpoint
from dtop_export.errors import DToPError
from dtop_export.training.whitening import (
    condition_number,
    learn_lw,
    learn_pca,
    ledoit_wolf_shrinkage,
    read_pairs,
    whiten_checkpoint,
)


def _pairs(n_dim: int = 12, n_pairs: int = 400, seed: int = 0) -> tuple[np.ndarray, list[int], list[int]]:
    """Pairs of noisy views of random 'landmarks'; the view noise is strongly anisotropic."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_pairs, n_dim))
    mix = rng.normal(0, 1, (n_dim, n_dim)) * np.linspace(0.05, 1.0, n_dim)
    q = centres + rng.normal(0, 1, (n_pairs, n_dim)) @ mix.T
    p = centres + rng.normal(0, 1, (n_pairs, n_dim)) @ mix.T
    X = np.concatenate([q, p])
    return X, list(range(n_pairs)), list(range(n_pairs, 2 * n_pairs))


def _textbook_lw(X: np.ndarray, qidxs: list[int], pidxs: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Radenović et al.'s steps with descriptors as columns, as cirtorch's whitenlearn writes them."""
    Xc = X.T
    m = Xc[:, qidxs].mean(axis=1, keepdims=True)
    df = Xc[:, qidxs] - Xc[:, pidxs]
    S = df @ df.T / df.shape[1]
    P = np.linalg.inv(np.linalg.cholesky(S))
    Y = P @ (Xc - m)
    eigval, eigvec = np.linalg.eigh(Y @ Y.T)
    order = eigval.argsort()[::-1]
    return m[:, 0], eigvec[:, order].T @ P


def _align(P: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Eigenvectors are defined up to sign: flip rows of P to agree with ref."""
    signs = np.sign(np.sum(P * ref, axis=1, keepdims=True))
    return P * signs


def test_lw_matches_the_textbook_steps_and_whitens_pair_differences() -> None:
    X, q, p = _pairs()
    m, P, alpha = learn_lw(torch.from_numpy(X), q, p, shrinkage=0)
    assert alpha == 0
    m_ref, P_ref = _textbook_lw(X, q, p)
    np.testing.assert_allclose(m.numpy(), m_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_align(P.numpy(), P_ref), P_ref, rtol=1e-6, atol=1e-8)
    # whitened pair differences have identity covariance
    d = (torch.from_numpy(X[q] - X[p]) @ P.T).numpy()
    np.testing.assert_allclose(d.T @ d / len(q), np.eye(X.shape[1]), atol=1e-8)
    # ... and the data, projected, is decorrelated with decreasing variance (the PCA step)
    y = ((torch.from_numpy(X) - m) @ P.T).numpy()
    cov = y.T @ y
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-6 * np.abs(cov).max()
    assert np.all(np.diff(np.diag(cov)) <= 1e-9)
    # the naive covariance was far from identity: the test can fail
    d0 = X[q] - X[p]
    assert np.abs(d0.T @ d0 / len(q) - np.eye(X.shape[1])).max() > 0.5


def test_lw_output_dimension_keeps_leading_components() -> None:
    X, q, p = _pairs()
    _, full, _ = learn_lw(torch.from_numpy(X), q, p)
    _, part, _ = learn_lw(torch.from_numpy(X), q, p, dim=5)
    assert part.shape == (5, X.shape[1])
    np.testing.assert_allclose(np.abs(part.numpy()), np.abs(full[:5].numpy()), rtol=1e-8)
    with pytest.raises(DToPError, match="dimension"):
        learn_lw(torch.from_numpy(X), q, p, dim=100)


def test_pca_whitening_gives_identity_covariance() -> None:
    X, _, _ = _pairs(n_dim=10, n_pairs=300, seed=1)
    m, P = learn_pca(torch.from_numpy(X))
    y = ((torch.from_numpy(X) - m) @ P.T).numpy()
    np.testing.assert_allclose(y.T @ y / len(X), np.eye(10), atol=1e-8)
    np.testing.assert_allclose(m.numpy(), X.mean(0), atol=1e-12)
    with pytest.raises(DToPError, match="more than"):
        learn_pca(torch.from_numpy(X[:5]), dim=8)


def test_read_pairs_formats(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "pairs.csv").write_text("query,positive\na.jpg,b.jpg\nc.jpg,a.jpg\n")
    pl = read_pairs(tmp_path / "pairs.csv")
    assert pl.paths == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert (pl.qidxs, pl.pidxs) == ([0, 2], [1, 0])
    # a BOM (Excel's UTF-8) made the header a pair of images "\ufeffquery" and "positive"
    (tmp_path / "pairs.csv").write_bytes(b"\xef\xbb\xbfquery,positive\r\na.jpg,b.jpg\r\nc.jpg,a.jpg\r\n")
    bom = read_pairs(tmp_path / "pairs.csv")
    assert (bom.paths, bom.qidxs, bom.pidxs) == (pl.paths, pl.qidxs, pl.pidxs)
    (tmp_path / "pairs.csv").write_bytes(b"query,positive\na.jpg,b.jpg\ncaf\xe9.jpg,a.jpg\n")
    with pytest.raises(DToPError, match=r"pairs.csv: line 3 is not UTF-8"):
        read_pairs(tmp_path / "pairs.csv")
    with open(tmp_path / "x-whiten.pkl", "wb") as fh:
        pickle.dump({"cids": ["abcdef01", "abcdef02"], "qidxs": [0], "pidxs": [1]}, fh)
    pl = read_pairs(tmp_path / "x-whiten.pkl")
    assert pl.paths[0] == str(tmp_path / "ims" / "01" / "ef" / "cd" / "abcdef01") and pl.qidxs == [0]
    # an index past the cids was an IndexError traceback once the images were checked
    with open(tmp_path / "x-whiten.pkl", "wb") as fh:
        pickle.dump({"cids": ["abcdef01", "abcdef02"], "qidxs": [0, 5], "pidxs": [1, 0]}, fh)
    with pytest.raises(DToPError, match=r"x-whiten.pkl: qidxs\[1\] is 5, not an index in 0..1"):
        read_pairs(tmp_path / "x-whiten.pkl")


def test_read_pairs_from_a_downloaded_set_folder(tmp_path: Path) -> None:
    """`whiten --pairs <an SfM-120k download>` said "set data.dataset=sfm120k", a training key no option of whiten
    takes (a review of the data side): the folder's own pickle is read (its val pairs, images under its ims/); a
    GLDv2 download says what --pairs takes instead."""
    from _training_data import make_gldv2, make_sfm120k

    (tmp_path / "sfm").mkdir()
    db = make_sfm120k(tmp_path / "sfm")
    pl = read_pairs(tmp_path / "sfm")
    assert (pl.qidxs, pl.pidxs) == (db["val"]["qidxs"], db["val"]["pidxs"]) and len(pl.paths) == 4
    assert all(Path(p).is_file() and (tmp_path / "sfm" / "ims") in Path(p).parents for p in pl.paths)
    assert read_pairs(tmp_path / "sfm", split="train").qidxs == db["train"]["qidxs"]
    (tmp_path / "gld").mkdir()
    make_gldv2(tmp_path / "gld")
    with pytest.raises(DToPError, match=r"holds a gldv2 set \(its classes are in a list file, not folders\): give"):
        read_pairs(tmp_path / "gld")


def test_whiten_checkpoint_pca_and_lw(tmp_path: Path, small_ckpt: Path) -> None:
    make_folder(tmp_path / "imgs", classes=4, per_class=4)
    out = tmp_path / "w.pt"
    path, wh = whiten_checkpoint(small_ckpt, out, images=tmp_path / "imgs", dim=8, size=64, progress=False)
    ck = load_checkpoint(path)
    assert ck.whitening is not None and ck.whitening.kind == "pca"
    assert tuple(ck.whitening.proj.shape) == (8, 256) and ck.provenance["whitening"]["images"] == 16
    assert torch.equal(ck.state_dict["head.fc.weight"], load_checkpoint(small_ckpt).state_dict["head.fc.weight"])
    path, wh = whiten_checkpoint(small_ckpt, out, pairs=tmp_path / "imgs", size=64, progress=False)
    ck = load_checkpoint(out)
    assert ck.whitening.kind == "lw" and ck.whitening.info["pairs"] == 12 and ck.whitening.out_dim == 256
    with pytest.raises(DToPError, match="either --pairs"):
        whiten_checkpoint(small_ckpt, out, progress=False)


def test_whiten_skips_images_that_fail_to_decode(
    tmp_path: Path, small_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # found by a real-layouts audit: a truncated JPEG (header fine, body cut) among the images stopped whiten
    # mid-embedding ("cannot read image ...: image file is truncated") though unreadable images are to be skipped
    from _training_data import write_truncated

    make_folder(tmp_path / "imgs", classes=4, per_class=4)
    write_truncated(tmp_path / "imgs" / "class0" / "9.jpg")
    out = tmp_path / "w.pt"
    _, wh = whiten_checkpoint(small_ckpt, out, images=tmp_path / "imgs", dim=8, size=64, progress=False)
    assert wh.info["images"] == 16 and "1 image(s) failed to decode, skipped (first: " in caplog.text
    _, wh = whiten_checkpoint(small_ckpt, out, pairs=tmp_path / "imgs", size=64, progress=False)
    assert (wh.info["pairs"], wh.info["images"]) == (12, 16)  # class0's 3-9 pair is gone


def test_whiten_cli(tmp_path: Path, small_ckpt: Path) -> None:
    make_folder(tmp_path / "imgs", classes=3, per_class=4)
    ck = tmp_path / "c.pt"
    ck.write_bytes(small_ckpt.read_bytes())
    exe = [sys.executable, "-m", "dtop_export", "whiten", str(ck)]
    r = subprocess.run(
        [*exe, "--images", str(tmp_path / "imgs"), "--dim", "4", "--size", "64", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "pca whitening 256 -> 4 (12 images, condition number" in r.stdout
    assert load_checkpoint(ck).whitening.out_dim == 4
    r = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: give either --pairs")
    assert len(r.stderr.strip().splitlines()) == 1


# shrinkage (issue: FP16 that holds on trained models) ---------------------------------------------------


def _ledoit_wolf_reference(D: np.ndarray) -> float:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4 with centred rows: a_n = <S, I>/p ... written out in numpy."""
    n, p = D.shape
    S = D.T @ D / n
    mu = np.trace(S) / p
    d2 = np.sum((S - mu * np.eye(p)) ** 2) / p
    b2_bar = sum(np.sum((np.outer(x, x) - S) ** 2) for x in D) / n**2 / p
    return float(min(b2_bar, d2) / d2)


def test_ledoit_wolf_shrinkage_matches_the_paper_and_its_limits() -> None:
    rng = np.random.default_rng(0)
    aniso = rng.normal(0, 1, (60, 10)) * np.linspace(0.1, 3.0, 10)
    assert ledoit_wolf_shrinkage(torch.from_numpy(aniso)) == pytest.approx(_ledoit_wolf_reference(aniso), rel=1e-9)
    few = rng.normal(0, 1, (15, 40)) * np.linspace(0.5, 1.5, 40)  # fewer samples than dimensions
    assert ledoit_wolf_shrinkage(torch.from_numpy(few)) == pytest.approx(_ledoit_wolf_reference(few), rel=1e-9)
    # many samples of a very anisotropic covariance: little shrinkage; isotropic data: (almost) all of it
    many = rng.normal(0, 1, (20000, 8)) * np.array([0.01, 0.1, 1, 3, 5, 8, 10, 20])
    assert ledoit_wolf_shrinkage(torch.from_numpy(many)) < 0.01
    iso = rng.normal(0, 1, (50, 30))
    assert ledoit_wolf_shrinkage(torch.from_numpy(iso)) > 0.5


def test_lw_shrinkage_bounds_the_condition_number_and_keeps_the_ranking() -> None:
    # the demo's regime: few pairs for the dimension, so the raw pair covariance is ill-conditioned
    X, q, p = _pairs(n_dim=64, n_pairs=90, seed=3)
    Xt = torch.from_numpy(X)
    _, P0, a0 = learn_lw(Xt, q, p, shrinkage=0)
    _, Pa, aa = learn_lw(Xt, q, p, shrinkage="auto")
    _, P1, a1 = learn_lw(Xt, q, p, shrinkage=1)
    assert a0 == 0 and 0 < aa < 1 and a1 == 1
    c0, ca, c1 = condition_number(P0), condition_number(Pa), condition_number(P1)
    assert c0 > 50 and ca < c0 / 3, (c0, ca)
    assert c1 < ca  # full shrinkage: P1 only rotates and scales the data covariance's PCA
    # matching pairs stay closer than non-matching ones after shrunk whitening
    y = torch.nn.functional.normalize((Xt - Xt[q].mean(0)) @ Pa.T, dim=1)
    pos = (y[q] * y[p]).sum(1).mean()
    neg = (y[q] * y[p].roll(1, 0)).sum(1).mean()
    assert pos > neg + 0.15
    with pytest.raises(DToPError, match="--shrinkage must be"):
        learn_lw(Xt, q, p, shrinkage=1.5)
    with pytest.raises(DToPError, match="--shrinkage must be"):
        learn_lw(Xt, q, p, shrinkage="lots")


def test_whiten_records_shrinkage_condition_and_warns_when_ill_conditioned(
    tmp_path: Path, small_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_folder(tmp_path / "imgs", classes=4, per_class=4)
    out = tmp_path / "w.pt"
    with caplog.at_level("WARNING", logger="dtop_export.training.whitening"):
        _, exact = whiten_checkpoint(small_ckpt, out, pairs=tmp_path / "imgs", size=64, progress=False, shrinkage=0)
    # 12 pairs for 256 dimensions: the exact Lw is degenerate, the warning says so with the number
    assert exact.info["shrinkage"] == 0 and exact.info["condition_number"] > 1000
    assert any("ill-conditioned" in r.getMessage() and "--shrinkage auto" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dtop_export.training.whitening"):
        _, auto = whiten_checkpoint(small_ckpt, out, pairs=tmp_path / "imgs", size=64, progress=False)
    assert 0 < auto.info["shrinkage"] <= 1 and auto.info["condition_number"] < exact.info["condition_number"]
    assert load_checkpoint(out).provenance["whitening"]["condition_number"] == auto.info["condition_number"]


def test_whiten_cli_dim_and_shrinkage_for_lw(tmp_path: Path, small_ckpt: Path) -> None:
    from dtop_export.contract import read_metadata
    from dtop_export.export import export_onnx

    make_folder(tmp_path / "imgs", classes=3, per_class=4)
    ck = tmp_path / "c.pt"
    ck.write_bytes(small_ckpt.read_bytes())
    exe = [sys.executable, "-m", "dtop_export", "whiten", str(ck), "--pairs", str(tmp_path / "imgs")]
    r = subprocess.run([*exe, "--dim", "32", "--size", "64", "--no-progress", "--shrinkage", "0.25"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "lw whitening 256 -> 32 (9 pairs, 12 images, shrinkage 0.25, condition number" in r.stdout
    wh = load_checkpoint(ck).whitening
    assert wh.out_dim == 32 and wh.info["shrinkage"] == 0.25
    res = export_onnx(ck, tmp_path / "c.onnx")  # --dim reaches the deployed descriptor
    assert read_metadata(res.path)["dtop.descriptor_dim"] == "32"
    for bad in ("2", "x"):
        r = subprocess.run([*exe, "--shrinkage", bad], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith("error: --shrinkage must be 'auto' or a number")
    r = subprocess.run([*exe[:5], "--images", str(tmp_path / "imgs"), "--shrinkage", "0.1"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "--shrinkage applies to supervised Lw" in r.stderr


# refusals before the embedding (audit) --------------------------------------------------------------------------


def test_whiten_refuses_an_existing_output_without_force(
    tmp_path: Path, small_ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "imgs", classes=3, per_class=4)
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"another checkpoint")
    args = ["whiten", str(small_ckpt), "--images", str(tmp_path / "imgs"), "--dim", "2", "--size", "64"]
    with monkeypatch.context() as m:
        m.setattr("dtop_export.training.whitening._embed", _no_embedding)
        assert cli(*args, "--no-progress", "-o", str(victim)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {victim} exists: pass --force to overwrite it\n"
    assert victim.read_bytes() == b"another checkpoint"
    assert cli(*args, "--no-progress", "-o", str(victim), "--force") == 0
    assert load_checkpoint(victim).whitening.out_dim == 2


@pytest.mark.parametrize(
    ("dim", "message"),
    [
        ("0", "--dim must be >= 1, got 0"),
        ("-1", "--dim must be >= 1, got -1"),
        ("257", "whitening output dimension (--dim) must be in 1..256 (the descriptor's size), got 257"),
    ],
)
def test_whiten_refuses_a_dim_out_of_range_before_embedding(
    tmp_path: Path,
    small_ckpt: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dim: str,
    message: str,
) -> None:
    make_folder(tmp_path / "imgs", classes=1, per_class=2)
    monkeypatch.setattr("dtop_export.training.whitening._embed", _no_embedding)
    out = tmp_path / "w.pt"
    assert cli("whiten", str(small_ckpt), "--images", str(tmp_path / "imgs"), "--dim", dim, "-o", str(out)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def _no_embedding(*args: object, **kwargs: object) -> None:
    """Stands in for the embedding: what is refused must be refused before the minutes it takes."""
    raise AssertionError("embedded before refusing")


def test_degenerate_whitening_input_is_one_line(tmp_path: Path, small_ckpt: Path, capsys) -> None:  # noqa: ANN001
    # found by a data audit: Lw from pairs whose two images were the same (duplicates) or from one pair, and PCA of
    # duplicate images, returned a projection scaling noise by up to 1e6 (a jitter of 1e-10 on a zero covariance,
    # eigenvalues clamped to 1e-12), with no error and, for identical descriptors, no ill-conditioning warning
    X = torch.randn(6, 32, dtype=torch.float64)
    with pytest.raises(DToPError, match="one query/positive pair is too few"):
        learn_lw(X, [0], [1])
    with pytest.raises(DToPError, match="every pair's two images have the same descriptor"):
        learn_lw(X, [0, 1, 2], [0, 1, 2])
    with pytest.raises(DToPError, match=r"the 40 descriptors span only 0 .*: give different images"):
        learn_pca(X[[0] * 40])
    with pytest.raises(DToPError, match=r"to 30 dimensions: the 60 descriptors span only 5 .*use --dim <= 5"):
        learn_pca(torch.cat([X] * 10), 30)
    _, P = learn_pca(torch.cat([X] * 10), 5)  # within the span: fine
    assert P.shape == (5, 32) and float(P.abs().max()) < 1e3
    # the CLI: a folder of one photo copied into two classes is one line, exit 2, and the checkpoint untouched
    make_folder(tmp_path / "one", classes=1, per_class=1)
    (tmp_path / "one" / "class1").mkdir()
    (tmp_path / "one" / "class1" / "0.jpg").write_bytes((tmp_path / "one" / "class0" / "0.jpg").read_bytes())
    for c in ("class0", "class1"):
        (tmp_path / "one" / c / "1.jpg").write_bytes((tmp_path / "one" / "class0" / "0.jpg").read_bytes())
    ck = tmp_path / "c.pt"
    ck.write_bytes(small_ckpt.read_bytes())
    before = ck.read_bytes()
    capsys.readouterr()
    assert cli("whiten", str(ck), "--pairs", str(tmp_path / "one"), "--size", "64", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: whitening: every pair's two images have the same descriptor"), err
    assert len(err.splitlines()) == 1 and ck.read_bytes() == before
