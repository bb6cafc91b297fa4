"""The right model for the corpus: `search`, `evaluate --distractors` and `serve --index` refuse a model of another
checkpoint than the corpus's (one line, exit 2) unless --force; any export of the same checkpoint passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from conftest import CORPUS_PHOTOS

from dtop_export.errors import DToPError


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint with other weights (another seed): a model of another checkpoint."""
    from dtop_export.checkpoint import new_provenance, save_checkpoint
    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other") / "other.pt"
    model = build_model(get_preset("small")).eval()
    save_checkpoint(path, model, default_preprocess("dtop_tiny_r_s16", 16), provenance=new_provenance("test"))
    return path


@pytest.fixture(scope="module")
def reexport(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another file from the same checkpoint (a re-export: different bytes, same dtop.checkpoint_sha256)."""
    import onnx

    from dtop_export.contract import metadata_of, set_metadata

    proto = onnx.load(str(small_onnx))
    meta = metadata_of(proto) | {"dtop.toolkit_version": "re-export"}
    set_metadata(proto, meta)
    out = tmp_path_factory.mktemp("reexport") / "again.onnx"
    onnx.save(proto, str(out))
    return out


def query() -> str:
    from dtop_export.retrieval.sample_data import skimage_data_dir

    return str(skimage_data_dir() / CORPUS_PHOTOS[0])


def test_search_refuses_a_model_of_another_checkpoint(
    small_index: Path, other_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("search", str(small_index), str(other_ckpt), query(), "-k", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "another" not in err.split(":")[0]
    assert "checkpoint" in err and "--force" in err and "Traceback" not in err
    assert cli("search", str(small_index), str(other_ckpt), query(), "-k", "2", "--force") == 0
    captured = capsys.readouterr()  # the warning on stderr (as evaluate's), the results alone on stdout
    assert "warning:" in captured.err and "(--force)" in captured.err and "warning" not in captured.out


def test_search_accepts_any_export_of_the_same_checkpoint(
    small_index: Path, small_ckpt: Path, reexport: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for model in (small_ckpt, reexport):  # the checkpoint itself, and another ONNX file of it
        assert cli("search", str(small_index), str(model), query(), "-k", "1") == 0, model
        captured = capsys.readouterr()
        assert "warning" not in captured.out + captured.err and CORPUS_PHOTOS[0] in captured.out


def test_an_index_from_before_the_check_is_judged_by_its_model_file(
    small_index: Path, other_ckpt: Path, reexport: Path, tmp_path: Path
) -> None:
    """An index sidecar without checkpoint_sha256 (written before this check): the checkpoint is read from the
    corpus's model file while it is still there, unchanged; when it is gone, the answer is a warning."""
    from dtop_export.corpus.index import sidecar_paths
    from dtop_export.identity import check_model_for_corpus

    meta, _ = sidecar_paths(small_index)
    corpus = json.loads(meta.read_text())["corpus"]
    corpus.pop("checkpoint_sha256")
    with pytest.raises(DToPError, match="--force"):
        check_model_for_corpus(other_ckpt, corpus, "index old.faiss")
    assert check_model_for_corpus(reexport, corpus, "index old.faiss") is None
    gone = corpus | {"model": str(tmp_path / "moved.onnx")}
    assert "cannot tell" in (check_model_for_corpus(other_ckpt, gone, "index old.faiss") or "")


def test_evaluate_refuses_distractors_of_another_checkpoint(
    small_index: Path, other_ckpt: Path, small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dtop_export.identity import check_distractors

    shards = small_index.parent / "shards"
    assert cli("evaluate", str(other_ckpt), "--distractors", str(shards), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "distractors" in err and "checkpoint" in err and "--force" in err and "Traceback" not in err
    assert check_distractors(small_ckpt, shards) is None  # the corpus's checkpoint: no complaint
    assert "--force" in (check_distractors(other_ckpt, shards, force=True) or "")
    npy = tmp_path / "d.npy"  # `embed X.npy` records the checkpoint in X.json
    assert cli("embed", str(small_ckpt), query(), "-o", str(npy), "--image-size", "64", "--no-progress") == 0
    assert json.loads(npy.with_suffix(".json").read_text())["checkpoint_sha256"]
    with pytest.raises(DToPError, match="checkpoint"):
        check_distractors(other_ckpt, npy)
    assert check_distractors(small_ckpt, npy) is None
    bare = tmp_path / "bare.npy"
    shutil.copy(npy, bare)
    assert "cannot tell" in (check_distractors(other_ckpt, bare) or "")


def test_serve_index_refuses_a_model_of_another_checkpoint(small_index: Path, other_ckpt: Path, reexport: Path) -> None:
    """`serve --index` checks before starting anything (no cluster needed to see it)."""
    from dtop_export.serve.run import ServeOptions, service_info

    with pytest.raises(DToPError, match="--force"):
        service_info(ServeOptions(str(other_ckpt), index=small_index))
    assert service_info(ServeOptions(str(other_ckpt), index=small_index, force=True)).index == str(small_index)
    info = service_info(ServeOptions(str(reexport), index=small_index))
    assert info.image_size == 128 and info.checkpoint_sha256
