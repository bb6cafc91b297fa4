"""`embed` and `index` as commands (a review of the corpus code): what a re-run does with --json, files that belong
together going into place together, options of the other mode refused, the decoder in the settings fingerprint,
`--address local`. No Ray cluster: a few tiny images and synthetic shards."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dtop_export.corpus.shards import MANIFEST, prepare_folder
from dtop_export.errors import DToPError


def test_index_and_its_sidecars_go_into_place_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`index` renamed `.faiss.ids.parquet` and `.faiss.json` into place before the index: a failed rename of the
    index left the new sidecars beside the old index."""
    from test_corpus import _synthetic_shards

    from dtop_export.corpus.index import CorpusIndex, build_corpus_index, sidecar_paths

    rng = np.random.default_rng(0)
    folders = []
    for i, n in enumerate((12, 20)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        folders.append(_synthetic_shards(tmp_path / f"s{i}", x / np.linalg.norm(x, axis=1, keepdims=True), 5))
    out = tmp_path / "c.faiss"
    build_corpus_index(folders[0], out, "flat")
    files = [out, *sidecar_paths(out)]
    before = {p: p.read_bytes() for p in files}
    real_replace = os.replace

    def replace_failing_on_the_index(src: Any, dst: Any) -> None:
        if Path(dst) == out and str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_on_the_index)
    with pytest.raises(OSError, match="No space"):
        build_corpus_index(folders[1], out, "flat")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in files} == before
    assert CorpusIndex(out).index.ntotal == 12


def test_gpu_decode_is_in_the_fingerprint_and_older_folders_resume_without_it(small_onnx: Path, tmp_path: Path) -> None:
    """--gpu-decode was not part of the settings: a job resumed with the other decoder mixed the two. Folders written
    before the field (no `gpu_decode` in the manifest or the shards) resume as before with the flag off."""
    from test_corpus import _synthetic_shards

    from dtop_export.corpus.embed import CorpusJob, job_settings
    from dtop_export.corpus.runtime import model_contract
    from dtop_export.corpus.shards import CorpusSettings
    from dtop_export.corpus.source import CorpusItem

    items = [CorpusItem(0, "a", "a.jpg")]
    contract = model_contract(str(small_onnx))
    for on in (False, True):
        job = CorpusJob(str(small_onnx), "src", tmp_path / "o", gpu_decode=on)
        assert job_settings(job, items, contract, "e").gpu_decode is on
    folder = _synthetic_shards(tmp_path / "old", np.eye(4, dtype=np.float32), 2)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["settings"].pop("gpu_decode") is False  # as written before the field
    (folder / MANIFEST).write_text(json.dumps(manifest))
    settings = CorpusSettings("m", "sha", 4, {}, 512, [1.0], 2, "synthetic", 4, "l")
    assert "gpu_decode" not in settings.fingerprint()
    assert prepare_folder(folder, settings, False) == []  # every shard reused
    with pytest.raises(DToPError, match=r"decoder \(--gpu-decode\)"):
        prepare_folder(folder, replace(settings, gpu_decode=True), False)
    gpu = _synthetic_shards(tmp_path / "gpu", np.eye(4, dtype=np.float32), 2)
    manifest = json.loads((gpu / MANIFEST).read_text())
    manifest["settings"]["gpu_decode"] = True  # a folder a GPU-decoded job began
    (gpu / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DToPError, match=r"decoder \(--gpu-decode\)"):
        prepare_folder(gpu, settings, False)


def test_address_local_is_a_local_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--address local` (the help's name for the default) was refused by the reachability check."""
    ray = pytest.importorskip("ray")

    from dtop_export.corpus import cluster
    from dtop_export.corpus.embed import CorpusJob
    from dtop_export.serve.run import ServeOptions

    assert CorpusJob("m.onnx", "src", Path("o"), address="local").address is None
    assert ServeOptions("m.onnx", address="local").address is None
    assert CorpusJob("m.onnx", "src", Path("o"), address="auto").address == "auto"
    for key in (*cluster.LOCAL_CLUSTER_ENV, "RAY_AUTH_MODE"):
        monkeypatch.setenv(key, os.environ.get(key, "token"))  # restored after the test
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cluster, "token_auth_enabled", lambda: True)
    assert cluster.connect("local") is True
    assert len(calls) == 1 and "address" not in calls[0] and calls[0]["_node_ip_address"] == "127.0.0.1"
