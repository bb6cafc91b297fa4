"""Corpus jobs and their inputs, in process (no Ray): the exact text of table ids and paths, file names that are not
UTF-8, skipped images embedded again (--retry-skipped), and the temporary files a run may remove."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtop_export.corpus.shards import MANIFEST, CorpusSettings, prepare_folder, shard_name
from dtop_export.corpus.source import list_source
from dtop_export.errors import DToPError


def test_table_ids_and_paths_keep_their_text(tmp_path: Path) -> None:
    """A CSV's ids and paths are their cells' text: `0001` is not `1`, `1` and `001` are two ids, `1.50` stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
