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
from cli_helpers import cli
from PIL import Image

from dtop_export.corpus.shards import MANIFEST, prepare_folder, shard_name
from dtop_export.errors import DToPError

SIZE = 64  # the small model at 64 px: a few milliseconds an image


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three tiny images of different sizes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_the_same_folder_command_with_json_resumes_and_replaces_its_summary(
    small_onnx: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embed SRC -o FOLDER --json run.json` run again after an interruption was refused (run.json exists), and
    --force deleted every finished shard: now the summary is replaced and only the missing shard is written."""
    out, summary = tmp_path / "shards", tmp_path / "run.json"
    args = ["embed", str(small_onnx), str(photos), "-o", str(out), "--json", str(summary), "--shard-size", "2"]
    args += ["--image-size", str(SIZE), "--no-progress"]
    assert cli(*args) == 0
    assert json.loads(summary.read_text())["shards_written"] == 2
    kept = (out / shard_name(0)).stat().st_mtime_ns
    (out / shard_name(1)).unlink()  # interrupted before the second shard
    assert cli(*args) == 0, capsys.readouterr().err
    again = json.loads(summary.read_text())
    assert again["shards_written"] == 1 and again["shards_reused"] == 1 and again["processed"] == 1
    assert (out / shard_name(0)).stat().st_mtime_ns == kept
    assert cli("embed", "--help") == 0
    assert "delete the folder's shards and manifest" in " ".join(capsys.readouterr().out.replace("│", " ").split())
    manifest = (out / MANIFEST).read_bytes()
    for own in (MANIFEST, shard_name(0)):  # the summary would overwrite the job's own files: refused, nothing written
        assert cli(*args[:5], "--json", str(out / own), *args[7:]) == 2
        assert "one of the folder's own files" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == manifest and (out / shard_name(0)).stat().st_mtime_ns == kept


def test_npy_output_writes_its_json_summary_and_all_three_files_together(
    small_onnx: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embed m img -o d.npy --json run.json` wrote no run.json; the matrix went into place before the model was
    hashed and its sidecar written, so a failure there left a new matrix beside an old sidecar."""
    npy, summary = tmp_path / "d.npy", tmp_path / "run.json"
    base = ["embed", str(small_onnx), str(photos), "-o", str(npy), "--no-progress"]
    assert cli(*base, "--json", str(npy.with_suffix(".json"))) == 2
    assert "sidecar" in capsys.readouterr().err and not npy.exists()
    assert cli(*base, "--json", str(summary), "--image-size", str(SIZE)) == 0
    run = json.loads(summary.read_text())
    assert run["mode"] == "local" and run["images"] == run["embedded"] == 3 and run["skipped"] == 0
    assert np.load(npy).shape[0] == 3
    assert cli(*base, "--json", str(summary), "--image-size", str(SIZE)) == 2  # exists: --force
    assert "--force" in capsys.readouterr().err
    before = {p: p.read_bytes() for p in (npy, npy.with_suffix(".json"), summary)}

    def unhashable(*_: Any) -> str:
        raise DToPError("cannot hash the model")

    monkeypatch.setattr("dtop_export.corpus.shards.file_sha256", unhashable)
    assert cli(*base, "--json", str(summary), "--image-size", str(SIZE + 32), "--force") == 2
    assert {p: p.read_bytes() for p in before} == before  # none of the three replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


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


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--address", "auto"], "--address needs --ray"),
        (["--actors", "1"], "--actors needs --ray"),  # the default value, given: refused too
        (["--gpus-per-actor", "1"], "--gpus-per-actor needs --ray"),
        (["--cpus-per-actor", "1"], "--cpus-per-actor needs --ray"),
        (["--ray", "--workers", "2"], "--workers is for the in-process run"),
        (["--ray", "--decode-pool", "thread"], "--decode-pool is for the in-process run"),
        (["-o", "X.npy", "--shard-size", "5"], "--shard-size is for folder output"),
        (["-o", "X.npy", "--workers", "2"], "--workers is for folder output"),
    ],
)
def test_options_of_the_other_mode_are_refused_in_one_line(
    small_onnx: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    said: str,
) -> None:
    out = tmp_path / "out"
    args = ["embed", str(small_onnx), str(photos), "-o", str(out), "--no-progress"]
    if "-o" in extra:
        args[4], extra = str(tmp_path / extra[1]), extra[2:]
    assert cli(*args, *extra) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [photos]  # nothing written


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


def test_connecting_to_ray_keeps_the_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray.init` installs its own SIGTERM handler (`sys.exit(signum)`), which replaced the CLI's: SIGTERM during
    `embed --ray` skipped the interrupt's cleanup and line (a review). connect puts the previous handler back, also
    when ray.init fails (a stub here: no cluster is started)."""
    import signal
    import sys

    ray = pytest.importorskip("ray")

    from dtop_export.corpus import cluster
    from dtop_export.errors import Interrupted, raise_interrupted

    def init_like_ray(**kw: Any) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if kw.get("address") == "bad":
            raise RuntimeError("no cluster there")
        if kw.get("address") == "slow":  # SIGTERM while the node starts: Ray's handler runs
            os.kill(os.getpid(), signal.SIGTERM)

    for key in (*cluster.LOCAL_CLUSTER_ENV, "RAY_AUTH_MODE"):
        monkeypatch.setenv(key, os.environ.get(key, "token"))  # restored after the test
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_like_ray)
    monkeypatch.setattr(cluster, "token_auth_enabled", lambda: True)
    monkeypatch.setattr(cluster, "check_reachable", lambda address, gcs: None)
    monkeypatch.setattr(cluster, "gcs_address", lambda address: None)
    before = signal.signal(signal.SIGTERM, raise_interrupted)  # what main() installs
    try:
        assert cluster.connect("local") is True
        assert signal.getsignal(signal.SIGTERM) is raise_interrupted
        with pytest.raises(RuntimeError, match="no cluster there"):
            cluster.connect("bad")
        assert signal.getsignal(signal.SIGTERM) is raise_interrupted
        with pytest.raises(Interrupted) as stopped:  # was SystemExit(15): no cleanup line, exit 15
            cluster.connect("slow")
        assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is raise_interrupted
    finally:
        signal.signal(signal.SIGTERM, before)
