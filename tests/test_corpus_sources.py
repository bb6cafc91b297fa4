"""Corpus jobs and their inputs, in process (no Ray): the exact text of table ids and paths, file names that are not
UTF-8, skipped images embedded again (--retry-skipped), and the temporary files a run may remove."""

from __future__ import annotations

from pathlib import Path

from dtop_export.corpus.shards import MANIFEST, CorpusSettings, prepare_folder, shard_name


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
