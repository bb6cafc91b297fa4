"""CLI: data sample, evaluate, embed, parity (exit codes, one-line errors, files written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtop_export.checkpoint import load_checkpoint, save_checkpoint

EXE = [sys.executable, "-m", "dtop_export"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    r = run("data", "sample", root)
    assert r.returncode == 0, r.stderr
    assert "90 database images, 20 queries" in r.stdout
    return root


def test_data_sample_is_cached_and_forced(data_root: Path) -> None:
    pkl = data_root / "sample" / "gnd_sample.pkl"
    before = pkl.stat().st_mtime_ns
    assert run("data", "sample", data_root).returncode == 0 and pkl.stat().st_mtime_ns == before
    assert run("data", "sample", data_root, "--force").returncode == 0 and pkl.stat().st_mtime_ns != before


def test_evaluate_prints_the_table_and_writes_json(small_ckpt: Path, data_root: Path, tmp_path: Path) -> None:
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.retrieval.evaluate import evaluate

    out = tmp_path / "eval.json"
    r = run("evaluate", small_ckpt, "--data-root", data_root, "--image-size", "128", "--json", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| sample (20 queries, 90 images) | Easy | Medium | Hard |")
    assert any(line.startswith("| mAP |") for line in lines) and any(line.startswith("| mP@10 |") for line in lines)
    report = json.loads(out.read_text())
    assert report["image_size"] == 128 and report["crop_queries"] is True and report["n_queries"] == 20
    expected = evaluate(TorchEngine.from_checkpoint(small_ckpt), data_root, "sample", progress=False, image_size=128)
    assert report["map"] == pytest.approx(expected.map, abs=1e-3)
    assert f"| mAP | {expected.map['easy']:.2f} |" in r.stdout
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "roxford5k"], "gnd_roxford5k.pkl not found"),
        (["--scales", "0,1"], "cannot read scales"),
        (["--dataset", "no/such/folder"], "unknown data set"),
    ],
)
def test_evaluate_errors_are_one_line(small_ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = run("evaluate", small_ckpt, "--data-root", tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_evaluate_missing_model(tmp_path: Path) -> None:
    r = run("evaluate", tmp_path / "nope.pt", "--data-root", tmp_path)
    assert r.returncode == 2 and "nope.pt not found" in r.stderr


def test_evaluate_missing_distractors_come_before_any_warning(small_ckpt: Path, tmp_path: Path) -> None:
    """A missing --distractors file (or MODEL) is the one line printed: no warning before it that the distractors
    record no checkpoint."""
    r = run("evaluate", small_ckpt, "--data-root", tmp_path, "--distractors", tmp_path / "desc.npy")
    assert r.returncode == 2 and r.stderr == f"error: distractor file {tmp_path / 'desc.npy'} not found\n", r.stderr
    r = run("evaluate", tmp_path / "nope.onnx", "--data-root", tmp_path, "--distractors", small_ckpt)
    assert r.returncode == 2 and r.stderr == f"error: model file {tmp_path / 'nope.onnx'} not found\n", r.stderr


def test_embed_skips_unreadable_images(small_ckpt: Path, tmp_path: Path) -> None:
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.retrieval.extract import extract

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    a, b, c = tmp_path / "a.png", folder / "b.jpg", folder / "sub" / "c.png"
    for p, size in ((a, (80, 60)), (b, (64, 96)), (c, (50, 50))):
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(p)
    bad = folder / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "desc.npy"
    r = run("embed", small_ckpt, a, folder, "-o", out, "--image-size", "64", "--batch-size", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stderr and r.stderr.startswith("skipped: ")
    desc = np.load(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["images"] == [str(a), str(b), str(c)] and [s["path"] for s in side["skipped"]] == [str(bad)]
    assert desc.shape == (3, side["descriptor_dim"]) and desc.dtype == np.float32
    expected = extract(TorchEngine.from_checkpoint(small_ckpt), [a, b, c], progress=False, image_size=64)
    assert np.allclose(desc, expected, atol=1e-5)
    assert "skipped 1 unreadable" in r.stdout


def test_embed_errors(small_ckpt: Path, tmp_path: Path) -> None:
    r = run("embed", small_ckpt, tmp_path, "-o", tmp_path / "d.npy")
    assert r.returncode == 2 and "no images given" in r.stderr
    r = run("embed", small_ckpt, tmp_path, "-o", tmp_path / "d.txt")
    assert r.returncode == 2 and "should end in .npy" in r.stderr
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    r = run("embed", small_ckpt, bad, "-o", tmp_path / "d.npy")
    assert r.returncode == 2 and "none of the 1 images could be read" in r.stderr
    assert not (tmp_path / "d.npy").exists()


def test_parity_cli_passes_itself_and_fails_a_perturbed_checkpoint(
    small_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    ckpt = load_checkpoint(small_ckpt)
    model = ckpt.build_model()
    with torch.no_grad():
        model.head.fc.weight.mul_(1.0 + 0.2 * torch.randn(model.head.fc.weight.shape, generator=torch.Generator()))
    perturbed = tmp_path / "perturbed.pt"
    save_checkpoint(perturbed, model, ckpt.preprocess, ckpt.whitening, ckpt.provenance)
    out = tmp_path / "parity.json"
    common = ["--data-root", data_root, "--image-size", "64", "--no-progress", "--json", out]
    r = run("parity", small_ckpt, small_ckpt, *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and json.loads(out.read_text())["passed"] is True
    r = run("parity", small_ckpt, small_ckpt, perturbed, *common)
    assert r.returncode == 2 and "parity.json exists: pass --force" in r.stderr  # the report is not replaced
    r = run("parity", small_ckpt, small_ckpt, perturbed, *common, "--force")
    assert r.returncode == 1
    fails = [line for line in r.stderr.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "perturbed.pt" in fails[0] and "cosine_min" in fails[0]
    report = json.loads(out.read_text())
    assert [e["passed"] for e in report["engines"]] == [True, False]


def test_parity_cli_errors(small_ckpt: Path, tmp_path: Path) -> None:
    onnx_like = tmp_path / "m.onnx"
    onnx_like.write_bytes(b"x")
    r = run("parity", onnx_like, small_ckpt)
    assert r.returncode == 2 and "must be a checkpoint" in r.stderr
    r = run("parity", small_ckpt)
    assert r.returncode == 2 and "at least one MODEL" in r.stderr
