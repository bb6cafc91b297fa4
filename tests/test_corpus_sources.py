"""Corpus jobs and their inputs, in process (no Ray): the exact text of table ids and paths, file names that are not
UTF-8, skipped images embedded again (--retry-skipped), and the temporary files a run may remove."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli
from PIL import Image

from dtop_export.corpus.embed import CorpusJob, embed_corpus
from dtop_export.corpus.shards import MANIFEST, CorpusSettings, prepare_folder, read_shard, shard_name
from dtop_export.corpus.source import list_source
from dtop_export.errors import DToPError
from dtop_export.preprocess import DecodeBudget

SIZE = 64  # the small model at its smallest useful size: these tests are about bookkeeping, not descriptors


def _images(folder: Path, sizes: dict[str | bytes, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        target = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(target, format="PNG")
    return folder


def test_retry_skipped_embeds_what_a_raised_limit_admits(
    small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image over --max-pixels is skipped and its shard is complete: a re-run with a higher limit reuses the shard
    (as before), --retry-skipped embeds the skipped image again, keeping the shard's other rows and other shards."""
    src = _images(tmp_path / "src", {"a.png": (40, 40), "big.png": (100, 100), "c.png": (48, 64)})
    out = tmp_path / "out"
    args = ("embed", str(small_onnx), str(src), "-o", str(out), "--image-size", str(SIZE), "--shard-size", "2")
    assert cli(*args, "--no-progress", "--max-pixels", "5000") == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "skipped 1 image(s) (1 over --max-pixels)" in said and "unreadable" not in said
    assert "re-run with --retry-skipped" in said
    manifest = json.loads((out / MANIFEST).read_text())
    [skip] = manifest["skipped"]
    assert skip["id"] == "big.png" and "raise --max-pixels and re-run with --retry-skipped" in skip["error"]
    assert manifest["last_run"]["skip_reasons"] == {"over --max-pixels": 1}
    first = read_shard(out / shard_name(0))
    kept_mtime = (out / shard_name(1)).stat().st_mtime_ns

    def job(**kw: object) -> CorpusJob:
        return CorpusJob(str(small_onnx), str(src), out, image_size=SIZE, shard_size=2, progress=False, **kw)

    again = embed_corpus(job())  # the default budget admits it, but the complete shard is reused
    assert again.processed == 0 and again.skipped == 1
    retried = embed_corpus(job(retry_skipped=True))
    assert (retried.processed, retried.shards_written, retried.shards_reused) == (1, 1, 1)
    assert (retried.embedded, retried.skipped, retried.skip_reasons) == (3, 0, {})
    shard = read_shard(out / shard_name(0))
    assert shard["id"] == ["a.png", "big.png"] and list(shard["key"]) == [0, 1]
    np.testing.assert_array_equal(shard["descriptor"][0], first["descriptor"][0])  # a.png: its row, kept
    assert abs(float(np.linalg.norm(shard["descriptor"][1])) - 1) < 1e-5
    assert (out / shard_name(1)).stat().st_mtime_ns == kept_mtime  # a shard without skips is not rewritten
    assert json.loads((out / MANIFEST).read_text())["skipped"] == []
    assert embed_corpus(job(retry_skipped=True)).processed == 0  # nothing left to retry
    # still over a limit: skipped again, the shard rewritten with the new reason
    assert embed_corpus(job(force=True, decode=DecodeBudget(max_pixels=5000))).skipped == 1
    again = embed_corpus(job(retry_skipped=True, decode=DecodeBudget(max_pixels=2000)))
    assert (again.processed, again.skipped, again.skip_reasons) == (1, 1, {"over --max-pixels": 1})
    [skip] = json.loads((out / MANIFEST).read_text())["skipped"]
    assert skip["id"] == "big.png" and "over the limit of 2000" in skip["error"]
    assert cli("embed", str(small_onnx), str(src), "-o", str(tmp_path / "x.npy"), "--retry-skipped") == 2
    assert "--retry-skipped is for folder output" in capsys.readouterr().err


@pytest.mark.parametrize("string_view", [True, False], ids=["pyarrow", "pyarrow<16"])
def test_table_ids_and_paths_keep_their_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, string_view: bool
) -> None:
    """A CSV's ids and paths are their cells' text: `0001` is not `1`, `1` and `001` are two ids, `1.50` stays;
    also on pyarrow 14-15 (pyproject's floor), which has no is_string_view (an AttributeError traceback, a review)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not string_view:
        monkeypatch.delattr(pa.types, "is_string_view", raising=False)

    (tmp_path / "t.csv").write_text("path,id\n0001,0001\n1.50,1\n2,001\n")
    items = list_source(tmp_path / "t.csv")
    assert [i.id for i in items] == ["0001", "1", "001"]
    assert [Path(i.path).name for i in items] == ["0001", "1.50", "2"]
    (tmp_path / "p.csv").write_text("path\n007\n")  # no id column: the path's text is the id
    assert [i.id for i in list_source(tmp_path / "p.csv")] == ["007"]
    # Parquet keeps its types: integer ids are their decimal text; other types are refused in one line
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "id": pa.array([7, 10], pa.int64())}), tmp_path / "i.parquet")
    assert [i.id for i in list_source(tmp_path / "i.parquet")] == ["7", "10"]
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "id": [1.5, 1.50]}), tmp_path / "f.parquet")
    with pytest.raises(DToPError, match=r"the 'id' column holds double, not text: store its values as strings or int"):
        list_source(tmp_path / "f.parquet")
    pq.write_table(pa.table({"path": pa.array([b"a.jpg"], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(DToPError, match=r"the 'path' column holds binary, not text: store its values as strings$"):
        list_source(tmp_path / "b.parquet")
    cats = pa.table({"path": pa.array(["a.jpg", "b.jpg"]).dictionary_encode(), "id": ["x", "y"]})
    pq.write_table(cats, tmp_path / "d.parquet")  # a pandas category column reads back as a dictionary of strings
    assert [Path(i.path).name for i in list_source(tmp_path / "d.parquet")] == ["a.jpg", "b.jpg"]


def test_file_names_that_are_not_utf8_are_left_out_and_counted(
    small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name that is not UTF-8 cannot be a Parquet string: the file is left out of the listing (the same on
    every run, so the job resumes) with one warning line, and counted as skipped; no traceback."""
    src = _images(tmp_path / "src", {"ok.png": (40, 40), b"caf\xe9.png": (40, 40), b"\xff.png": (40, 40)})
    left_out: list[str] = []
    assert [i.id for i in list_source(src, left_out)] == ["ok.png"] and len(left_out) == 2
    out = tmp_path / "out"
    args = ("embed", str(small_onnx), str(src), "-o", str(out), "--image-size", str(SIZE), "--no-progress")
    assert cli(*args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: left out 2 file(s) whose names are not UTF-8 (first: b'" in said
    assert "skipped 2 image(s) (2 file name not UTF-8)" in said and "--retry-skipped" not in said
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["counts"] == {"images": 3, "embedded": 1, "skipped": 2}
    assert sorted(e["path"] for e in manifest["left_out"]) == sorted(
        repr(os.fsencode(src / n)) for n in (os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"\xff.png"))
    )
    again = embed_corpus(CorpusJob(str(small_onnx), str(src), out, image_size=SIZE, progress=False))
    assert (again.processed, again.shards_reused, again.skipped) == (0, 1, 2)  # resumed: the same listing
    uri: list[str] = []  # pyarrow.fs lists them too, but cannot name them as text
    assert [i.id for i in list_source(f"file://{src}", uri)] == ["ok.png"] and len(uri) == 2
    only_bad = _images(tmp_path / "bad", {b"\xe9.png": (40, 40)})
    with pytest.raises(DToPError, match=r"lists no images whose names are UTF-8 \(1 are not: rename them\)"):
        list_source(only_bad)
    named = os.path.join(os.fsencode(tmp_path), b"ph\xf6tos")
    os.mkdir(named)
    with pytest.raises(DToPError, match=r"source b'.*ph\\xf6tos' has a name that is not UTF-8: rename it"):
        list_source(os.fsdecode(named))


def test_a_run_removes_only_its_own_temporary_files(tmp_path: Path) -> None:
    """-o may be any folder (-o .): a run removes the temporary names atomic_path gives shards and the manifest,
    never another hidden .tmp file."""
    from dtop_export.atomic import atomic_path
    from dtop_export.corpus.shards import TEMP_FILE

    (tmp_path / "names").mkdir()
    for name in (shard_name(3), shard_name(123456), MANIFEST):  # the names atomic_path really makes
        with atomic_path(tmp_path / "names" / name) as tmp:
            assert TEMP_FILE.fullmatch(tmp.name), tmp.name
    theirs = [".notes.tmp", ".vimrc.swp.tmp", ".shard-00000.parquet.tmp", ".manifest.json.tmp", ".index.faiss.a1.tmp"]
    ours = [".shard-00002.parquet.k3_9x0ab.tmp", ".manifest.json.q8w7e6r5.tmp", ".shard-1234567.parquet.abc.tmp"]
    for name in theirs + ours:
        (tmp_path / name).write_text("x")
    settings = CorpusSettings("m", "sha", 4, {}, 64, [1.0], 2, "src", 3, "l")
    assert prepare_folder(tmp_path, settings, force=False) == [0, 1]
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted(theirs)
