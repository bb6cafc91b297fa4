"""Whitening: Lw on synthetic pairs whitens and equals the textbook (cirtorch) steps; PCA; the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_data import make_folder

from dtop_export.checkpoint import load_checkpoint
from dtop_export.errors import DToPError
from dtop_export.training.whitening import learn_lw, learn_pca, read_pairs, whiten_checkpoint


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
    m, P = learn_lw(torch.from_numpy(X), q, p)
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
    _, full = learn_lw(torch.from_numpy(X), q, p)
    _, part = learn_lw(torch.from_numpy(X), q, p, dim=5)
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
    with open(tmp_path / "x-whiten.pkl", "wb") as fh:
        pickle.dump({"cids": ["abcdef01", "abcdef02"], "qidxs": [0], "pidxs": [1]}, fh)
    pl = read_pairs(tmp_path / "x-whiten.pkl")
    assert pl.paths[0] == str(tmp_path / "ims" / "01" / "ef" / "cd" / "abcdef01") and pl.qidxs == [0]


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
    assert "pca whitening 256 -> 4 (12 images)" in r.stdout
    assert load_checkpoint(ck).whitening.out_dim == 4
    r = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: give either --pairs")
    assert len(r.stderr.strip().splitlines()) == 1
