"""Corpus embedding (in-process and Ray Data), resumable shards, faiss index + search, shard distractors.

One local Ray cluster (2 CPUs) serves every Ray test of the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import cli
from PIL import Image

from dtop_export.corpus.embed import CorpusJob, ShardAssembler, embed_corpus
from dtop_export.corpus.shards import (
    MANIFEST,
    CorpusSettings,
    Shard,
    ShardedDescriptors,
    iter_shards,
    shard_name,
    write_shard,
)
from dtop_export.corpus.source import CorpusItem, list_source
from dtop_export.errors import DToPError
from dtop_export.retrieval.sample_data import build_sample_dataset

SIZE = 160  # longer side the tests embed at (small model: fast, still several input shapes)
BAD = ("text.jpg", "truncated.jpg", "empty.png")

ray = pytest.importorskip("ray", reason="the corpus Ray tests need ray[data] (pip install 'dtop-export[ray]')")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded sample set's 110 images, 6 generated ones of mixed sizes and modes, and 3 corrupt files."""
    root = tmp_path_factory.mktemp("corpus")
    sample = build_sample_dataset(root / "data") / "jpg"
    folder = root / "images"
    (folder / "sample").mkdir(parents=True)
    for p in sorted(sample.glob("*.jpg")):
        (folder / "sample" / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    gen = folder / "generated"
    gen.mkdir()
    for i, (w, h, mode) in enumerate([(97, 211, "RGB"), (640, 120, "RGB"), (300, 300, "L"), (45, 60, "RGB"),
                                      (512, 384, "RGBA"), (200, 333, "P")]):  # fmt: skip
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode)
        img.save(gen / f"mixed_{i}.png")
    (gen / BAD[0]).write_text("not an image")
    jpg = (sample / sorted(os.listdir(sample))[0]).read_bytes()
    (gen / BAD[1]).write_bytes(jpg[: len(jpg) // 3])
    (gen / BAD[2]).write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Any:
    """One local Ray cluster for the module (2 logical CPUs, as this machine), started as `embed --ray` starts
    one (loopback only, token auth, no dashboard); its GCS address."""
    from conftest import restore_faulthandler

    from dtop_export.corpus.cluster import connect

    assert connect(None, num_cpus=2, object_store_memory=400 * 2**20, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        restore_faulthandler(request.config)  # a later crash of the suite's process names its Python stacks


@pytest.fixture(scope="module")
def local_run(small_onnx: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process shard run of the corpus (the reference the Ray runs are held to)."""
    out = tmp_path_factory.mktemp("local") / "shards"
    job = CorpusJob(str(small_onnx), str(corpus), out, image_size=SIZE, shard_size=16, progress=False)
    summary = embed_corpus(job)
    assert summary.mode == "local" and summary.shards_written == summary.images // 16 + 1
    return out


def _table(folder: Path) -> dict[str, Any]:
    """All shards of a folder: keys, ids, descriptors, plus the manifest's skipped list."""
    shards = list(iter_shards(folder))
    manifest = json.loads((folder / MANIFEST).read_text())
    return {
        "key": np.concatenate([s["key"] for s in shards]),
        "id": [i for s in shards for i in s["id"]],
        "descriptor": np.concatenate([s["descriptor"] for s in shards]),
        "skipped": manifest["skipped"],
        "manifest": manifest,
    }


def _exactly_once(folder: Path) -> dict[str, Any]:
    """Asserts every listed key is in exactly one shard row or skipped record; returns the table."""
    t = _table(folder)
    n = t["manifest"]["settings"]["n_items"]
    keys = list(t["key"]) + [s["key"] for s in t["skipped"]]
    assert sorted(keys) == list(range(n)), "an image is missing or duplicated"
    return t


def _assert_same(a: dict[str, Any], b: dict[str, Any], min_cos: float = 0.99999) -> None:
    assert list(a["key"]) == list(b["key"]) and a["id"] == b["id"]
    assert [(s["id"], s["error"]) for s in a["skipped"]] == [(s["id"], s["error"]) for s in b["skipped"]]
    cos = np.sum(a["descriptor"] * b["descriptor"], axis=1)
    assert cos.min() >= min_cos, f"min cosine {cos.min()}"


# in-process -------------------------------------------------------------------------------------------


def test_folder_output_matches_npy_embed(small_onnx: Path, corpus: Path, local_run: Path, tmp_path: Path) -> None:
    t = _exactly_once(local_run)
    assert sorted(Path(s["id"]).name for s in t["skipped"]) == sorted(BAD)
    assert all("cannot read image" in s["error"] or "not found" in s["error"] for s in t["skipped"])
    npy = tmp_path / "all.npy"
    assert cli("embed", str(small_onnx), str(corpus), "-o", str(npy), "--image-size", str(SIZE), "--no-progress") == 0
    ref = np.load(npy)
    side = json.loads(npy.with_suffix(".json").read_text())
    assert [str(corpus / i) for i in t["id"]] == side["images"]
    np.testing.assert_array_equal(t["descriptor"], ref)  # same path, same batches: bit-identical
    m = t["manifest"]
    assert m["status"] == "complete" and m["counts"] == {
        "images": len(t["id"]) + 3,
        "embedded": len(t["id"]),
        "skipped": 3,
    }
    assert m["settings"]["preprocess"]["size"] and m["settings"]["image_size"] == SIZE
    # the shard schema the issue names: fixed-size float32 list, model hash, scales
    import pyarrow.parquet as pq

    schema = pq.read_schema(local_run / shard_name(0))
    assert str(schema.field("descriptor").type) == "fixed_size_list<element: float>[256]"
    assert {"key", "id", "path", "model_sha256", "scales"} <= set(schema.names)


def test_rerun_reuses_and_refuses_other_settings(small_onnx: Path, corpus: Path, local_run: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in local_run.glob("shard-*.parquet")}
    again = embed_corpus(
        CorpusJob(str(small_onnx), str(corpus), local_run, image_size=SIZE, shard_size=16, progress=False)
    )
    assert again.shards_written == 0 and again.processed == 0 and again.shards_reused == len(before)
    assert {p.name: p.stat().st_mtime_ns for p in local_run.glob("shard-*.parquet")} == before
    with pytest.raises(DToPError, match="scales"):
        embed_corpus(CorpusJob(str(small_onnx), str(corpus), local_run, scales=(1.0, 0.5), image_size=SIZE,
                               shard_size=16, progress=False))  # fmt: skip
    with pytest.raises(DToPError, match="another image size"):
        embed_corpus(CorpusJob(str(small_onnx), str(corpus), local_run, image_size=SIZE + 32, shard_size=16,
                               progress=False))  # fmt: skip


def test_force_replaces_and_damaged_shard_is_redone(small_onnx: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    src = tmp_path / "list.txt"
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png"))
    src.write_text("# generated images\n" + "\n".join(f"{corpus}/{n}" for n in names) + "\n")
    job = CorpusJob(str(small_onnx), str(src), out, image_size=SIZE, shard_size=2, progress=False)
    first = embed_corpus(job)
    assert first.images == len(names) and first.skipped == 1  # empty.png
    (out / shard_name(1)).write_bytes(b"PAR1 damaged")
    (out / ".shard-00002.parquet.abc.tmp").write_bytes(b"left by a killed run")
    again = embed_corpus(CorpusJob(str(small_onnx), str(src), out, image_size=SIZE, shard_size=2, progress=False))
    assert again.shards_written == 1 and again.processed == 2
    assert not list(out.glob(".*.tmp"))
    _exactly_once(out)
    forced = embed_corpus(CorpusJob(str(small_onnx), str(src), out, image_size=SIZE + 32, shard_size=2, force=True,
                                    progress=False))  # fmt: skip
    assert forced.shards_written == first.shards_written


def test_sources_list_table_uri(corpus: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = list_source(corpus)
    assert [i.key for i in folder] == list(range(len(folder)))
    assert folder[0].id == "generated/empty.png" and folder[0].path == str(corpus / "generated" / "empty.png")
    rel = [i.id for i in folder[:5]]
    (tmp_path / "imgs").symlink_to(corpus)
    pq.write_table(
        pa.table({"path": [f"imgs/{r}" for r in rel], "id": [f"n{j}" for j in range(5)]}), tmp_path / "t.parquet"
    )
    table = list_source(tmp_path / "t.parquet")
    assert [i.id for i in table] == [f"n{j}" for j in range(5)]
    assert [i.path for i in table] == [str(tmp_path / "imgs" / r) for r in rel]  # relative to the table's folder
    (tmp_path / "t.csv").write_text("path\n" + "\n".join(f"imgs/{r}" for r in rel) + "\n")
    assert [i.id for i in list_source(tmp_path / "t.csv")] == [f"imgs/{r}" for r in rel]
    uri = list_source(f"file://{corpus}")
    assert [i.id for i in uri] == [i.id for i in folder] and uri[3].path == f"file://{corpus}/{folder[3].id}"
    from dtop_export.corpus.source import load_item

    assert load_item(uri[3].path).size == Image.open(folder[3].path).size
    (tmp_path / "dup.csv").write_text("path,id\na.jpg,x\nb.jpg,x\n")
    with pytest.raises(DToPError, match="appears twice"):
        list_source(tmp_path / "dup.csv")
    (tmp_path / "nopath.csv").write_text("file\na.jpg\n")
    with pytest.raises(DToPError, match="no 'path' column"):
        list_source(tmp_path / "nopath.csv")
    with pytest.raises(DToPError, match="not found"):
        list_source(tmp_path / "missing")


def test_sources_name_rows_as_the_file_counts_them(tmp_path: Path) -> None:
    """Every table/list error names the place the way a user finds it: the line of a CSV or text file (the header
    is line 1; blank lines and quoted line breaks counted), the row of a Parquet table (1 = the first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "dup.csv").write_text('path,id\na.jpg,x\n\n"b\nc.jpg",y\nd.jpg,x\n')
    with pytest.raises(DToPError, match=r"id 'x' appears twice \(line 2 and line 6\): ids must be unique"):
        list_source(tmp_path / "dup.csv")
    (tmp_path / "empty.csv").write_text("path,id\na.jpg,x\n,y\n")
    with pytest.raises(DToPError, match=r"empty\.csv: line 3 has an empty 'path': fill it in or remove the row"):
        list_source(tmp_path / "empty.csv")
    (tmp_path / "dup.txt").write_text("# photos\na.jpg\n\nb.jpg\na.jpg\n")
    with pytest.raises(DToPError, match=r"id 'a\.jpg' appears twice \(line 2 and line 5\)"):
        list_source(tmp_path / "dup.txt")
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg", "c.jpg"], "id": ["x", "y", "x"]}), tmp_path / "dup.parquet")
    with pytest.raises(DToPError, match=r"id 'x' appears twice \(row 1 and row 3\)"):
        list_source(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"path": ["a.jpg", None]}), tmp_path / "null.parquet")
    with pytest.raises(DToPError, match=r"null\.parquet: row 2 has no 'path'"):
        list_source(tmp_path / "null.parquet")


def test_assembler_combines_scales_and_drops_duplicates(tmp_path: Path) -> None:
    settings = CorpusSettings("m", "sha", 4, {}, 64, [1.0, 0.5], 2, "src", 3, "l")
    items = [CorpusItem(k, f"i{k}", f"p{k}") for k in range(3)]
    asm = ShardAssembler(tmp_path, settings, items, [0, 1])
    a, b = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
    assert asm.add(0, 0, a) == 0 and asm.add(0, 0, a) == 0 and asm.duplicates == 1
    assert asm.add(0, 1, b) == 1
    assert asm.fail(1, "cannot read image p1: broken") == 1 and asm.written == 1  # shard 0 complete
    assert asm.fail(1, "again") == 0 and asm.duplicates == 2
    assert asm.add(2, 1, b) == 0 and asm.add(2, 0, a) == 1 and asm.complete
    s0 = next(iter_shards(tmp_path))
    np.testing.assert_allclose(s0["descriptor"][0], (a + b) / np.sqrt(2), rtol=1e-6)
    assert list(s0["key"]) == [0]


def test_embed_cli_errors(small_onnx: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("embed", str(small_onnx), str(corpus), "-o", str(tmp_path / "x.npy"), "--ray") == 2
    assert "give -o a folder" in capsys.readouterr().err
    assert cli("embed", str(small_onnx), str(corpus), str(corpus), "-o", str(tmp_path / "d")) == 2
    assert "one SOURCE" in capsys.readouterr().err
    assert cli("embed", str(small_onnx), str(corpus), "-o", str(tmp_path / "d"), "--precision", "bf16") == 2
    assert "runs at the precision it was built with" in capsys.readouterr().err
    assert cli("embed", str(small_onnx), str(tmp_path / "nope"), "-o", str(tmp_path / "d")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "d" / MANIFEST).exists()


def test_gpu_models_are_placed_before_any_output(
    small_ckpt: Path, small_onnx: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that needs a GPU is refused in one line before the output folder exists: on Ray when its actors
    reserve no GPU (Ray hides every GPU from them), in-process when PyTorch sees no CUDA device."""
    import torch

    from dtop_export.bench.spec import parse_spec
    from dtop_export.engines.pytorch import check_device

    out = tmp_path / "d"
    for model in (f"{small_onnx}:provider=cuda", f"{small_ckpt}:device=cuda:0", str(tmp_path / "m.plan")):
        if model.endswith(".plan"):
            Path(model).write_bytes(b"plan")
        assert cli("embed", model, str(corpus), "-o", str(out), "--ray") == 2
        err = capsys.readouterr().err
        assert "give --gpus-per-actor" in err and err.count("error:") == 1 and "Traceback" not in err
    assert parse_spec(f"{small_ckpt}:fp16,device=cuda:1").options == {"precision": "fp16", "device": "cuda:1"}
    with pytest.raises(DToPError, match="unknown device 'gpu'"):
        check_device("gpu")
    check_device("cpu")
    if not torch.cuda.is_available():
        assert cli("embed", f"{small_ckpt}:device=cuda", str(corpus), "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert "PyTorch sees no CUDA GPU here" in err and "Traceback" not in err
    else:
        with pytest.raises(DToPError, match="use cuda:0 to"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    assert not out.exists()


def test_precision_reaches_the_engine(small_onnx: Path, corpus: Path, local_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "list.txt"
    src.write_text("\n".join(str(p) for p in sorted((corpus / "sample").glob("*.jpg"))[:6]) + "\n")
    job = CorpusJob(f"{small_onnx}:openvino", str(src), tmp_path / "ov", image_size=SIZE, precision="fp32",
                    progress=False)  # fmt: skip
    assert embed_corpus(job).embedded == 6
    ov, ref = _table(tmp_path / "ov"), _table(local_run)
    rows = [ref["id"].index(f"sample/{Path(p).name}") for p in src.read_text().split()]
    assert np.sum(ov["descriptor"] * ref["descriptor"][rows], axis=1).min() >= 0.99999  # OpenVINO fp32 = ORT fp32


def test_actor_resources_never_starve_the_readers() -> None:
    from dtop_export.corpus.ray_pipeline import READ_TASK_CPUS, actor_resources

    def job(**kw: Any) -> CorpusJob:
        return CorpusJob("m.onnx", "src", Path("o"), use_ray=True, **kw)

    for actors in (1, 2, 3):
        cpus, threads = actor_resources(job(actors=actors), 2.0, 0.0)
        assert actors * cpus + READ_TASK_CPUS <= 2.0 and threads >= 1
    assert actor_resources(job(actors=4), 64.0, 0.0) == (15.75, 15)
    assert actor_resources(job(actors=2, threads=4), 64.0, 0.0) == (4.0, 4)
    with pytest.raises(DToPError, match="leave less than"):
        actor_resources(job(actors=2, cpus_per_actor=1.0), 2.0, 0.0)
    with pytest.raises(DToPError, match="GPUs"):
        actor_resources(job(actors=2, gpus_per_actor=1.0), 8.0, 1.0)


def test_gpu_actor_leaves_num_cpus_to_ray_data() -> None:
    """A GPU actor at the default 1 CPU names only its GPUs (Ray warns that giving both is experimental); Ray
    Data itself still reserves 1 CPU for it, so the reservation is unchanged; other sizings are passed on."""
    from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args

    from dtop_export.corpus.ray_pipeline import actor_remote_args, actor_resources

    def job(**kw: Any) -> CorpusJob:
        return CorpusJob("m.pt:device=cuda", "src", Path("o"), use_ray=True, **kw)

    gpu = job(gpus_per_actor=1.0)
    cpus, _ = actor_resources(gpu, 16.0, 1.0)
    assert cpus == 1.0 and actor_remote_args(gpu, cpus) == {"num_gpus": 1.0}
    assert _canonicalize_ray_remote_args(actor_remote_args(gpu, cpus))["num_cpus"] == 1  # Ray's default
    assert actor_remote_args(gpu, 0.5) == {"num_cpus": 0.5, "num_gpus": 1.0}  # a 2-CPU node: less than 1
    asked = job(gpus_per_actor=0.5, cpus_per_actor=1.0)
    assert actor_remote_args(asked, 1.0) == {"num_cpus": 1.0, "num_gpus": 0.5}  # what the user asked for
    assert actor_remote_args(job(), 3.5) == {"num_cpus": 3.5}


def test_actor_batches_rows_of_equal_shape_and_reserves_its_read_memory() -> None:
    """Rows of three interleaved shapes in one actor call run as three full batches of 8, each descriptor in its
    row's place; a read task reserves at least what Ray measured for a 16-row block at 1024 px on a GPU node."""
    from dtop_export.contract import Engine
    from dtop_export.corpus.ray_pipeline import EmbedActor, largest_node_memory, read_block_rows, read_task_memory
    from dtop_export.preprocess import PreprocessConfig

    class CountingEngine(Engine):
        descriptor_dim, stride, preprocess = 4, 16, PreprocessConfig(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
        batches: list[int] = []

        def embed(self, x: np.ndarray) -> np.ndarray:
            self.batches.append(len(x))
            return np.repeat(x.mean(axis=(1, 2, 3))[:, None], 4, axis=1).astype(np.float32)

    actor = EmbedActor.__new__(EmbedActor)
    actor.engine, actor.batch_size, actor.name = CountingEngine(), 8, "test"
    actor.reported, actor.load_s, actor.warmup_s = False, 0.5, 0.25
    shapes = [(48, 64, 3), (64, 48, 3), (64, 64, 3)]
    ragged = np.empty(24, dtype=object)
    ragged[:] = [np.full(shapes[i % 3], i, np.uint8) for i in range(24)]  # uint8 pixels, normalised by the engine
    batch = {"key": np.arange(24), "scale": np.zeros(24, np.int32), "tensor": ragged, "error": np.full(24, "")}
    out = actor(batch)
    assert sorted(actor.engine.batches) == [8, 8, 8]
    assert np.allclose(out["descriptor"][:, 0], np.arange(24))
    assert out["startup_s"].sum() == 0.75 and actor(batch)["startup_s"].sum() == 0  # load + warm-up, reported once
    mib, gib = 2**20, 2**30
    assert read_task_memory(16, 1024, [1.0], 0) > 546 * mib  # Ray's issue detector: "used up to 546.3MiB"
    assert read_task_memory(16, 1024, [1.0, 0.5], 0) > read_task_memory(16, 1024, [1.0], 0)  # one row per scale
    # the decode budget on top: the one image being decoded may hold it
    assert read_task_memory(16, 1024, [1.0], 1024) - read_task_memory(16, 1024, [1.0], 0) == 1024 * mib
    assert read_block_rows(16, 1024, [1.0], 16 * gib, 1024) == 16
    assert read_block_rows(16, 1024, [1.0], 1 * gib, 64) == 8  # halved until within half the node's memory
    assert read_task_memory(8, 1024, [1.0], 64) <= gib / 2 < read_task_memory(16, 1024, [1.0], 64)
    # worker + budget (1184 MiB) fill half of a 2 GiB node whatever the rows: the whole node is the room, not
    # half of it (halving to 1 row would only make 16x the tasks)
    assert read_block_rows(16, 512, [1.0], 2 * gib, 1024) == 16
    assert read_block_rows(16, 1024, [1.0], 0.0, 1024) == 16  # no memory resource reported
    with pytest.raises(DToPError, match="smaller --image-size"):
        read_block_rows(16, 8192, [1.0], 1 * gib, 64)
    with pytest.raises(DToPError, match="--max-decode-mb 2048"):  # a budget no node here can hold
        read_block_rows(16, 512, [1.0], 2 * gib, 2048)
    # a task runs on one node: two 1 GiB nodes (and a dead 16 GiB one) offer 1 GiB, not the 2 GiB Ray sums
    nodes = [{"Alive": True, "Resources": {"CPU": 2, "memory": gib}}] * 2
    nodes += [{"Alive": False, "Resources": {"memory": 16 * gib}}, {"Alive": True, "Resources": {"CPU": 1}}]
    assert largest_node_memory(nodes) == gib
    assert read_block_rows(16, 1024, [1.0], largest_node_memory(nodes), 64) == 8
    assert largest_node_memory([]) == 0.0


def test_progress_rate_is_the_average_since_the_start() -> None:
    """Ray returns whole batches: 12 images in one burst after 30 s read 0.40 img/s, not rich's windowed speed
    over a same-instant burst; the ETA follows the same rate."""
    from types import SimpleNamespace

    from dtop_export.corpus.embed import progress_bar, steady_rate

    bar = progress_bar(False)
    rate, eta = bar.columns[3], bar.columns[6]
    done = SimpleNamespace(completed=12, elapsed=30.0, total=12, finished=True)
    half = SimpleNamespace(completed=6, elapsed=30.0, total=12, finished=False)
    start = SimpleNamespace(completed=0, elapsed=4.0, total=12, finished=False)
    assert str(rate.render(done)) == "0.40 img/s" and str(eta.render(done)) == "0:00:00"
    assert str(rate.render(half)) == "0.20 img/s" and str(eta.render(half)) == "0:00:30"
    assert str(rate.render(start)) == "- img/s" and str(eta.render(start)) == "-:--:--"
    # the summary's rate after start-up: 20 images in the 10 s after the first result at 10 s
    assert steady_rate((10.0, 4), (20.0, 24)) == 2.0 and steady_rate((10.0, 4), (10.0, 4)) is None


# Ray ----------------------------------------------------------------------------------------------------


def test_ray_notices_for_its_own_users_are_dropped() -> None:
    """The two notices the driver drops exist, word for word, in the installed Ray (else the filter silently
    stops working), and only they are dropped: the warning that authentication is *disabled* still shows."""
    import importlib.util
    import logging

    from dtop_export.corpus import cluster

    for name, notice in cluster._NOTICES.items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"Ray has no module {name} any more"
        source = Path(spec.origin).read_text()
        assert all(f'"{start}' in source for start in notice.starts), f"{name} no longer logs {notice.starts}"
    cluster.quiet_notices()
    cluster.quiet_notices()  # idempotent: one filter per logger
    auth = "ray._private.authentication.authentication_token_setup"
    assert len(logging.getLogger(auth).filters) == 1
    seen: list[str] = []

    class Collect(logging.Handler):  # on the loggers themselves: after ray.init, "ray" does not propagate
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    loggers = [logging.getLogger(auth), logging.getLogger("ray.data._internal.progress")]
    handler = Collect(logging.WARNING)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        loggers[0].warning("Token authentication is enabled for this Ray cluster. Set ...")
        loggers[1].warning("Progress bars disabled. To enable, ...")
        loggers[0].warning("Token authentication is disabled for this Ray cluster. Anyone ...")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone ..."]


def test_faulthandler_names_a_crash_after_a_ray_driver_shut_down(tmp_path: Path) -> None:
    """The suite's process died of a segmentation fault twice, after this module's Ray tests, with no Python stack:
    a Ray driver that shuts down leaves SIGSEGV at its default action under an "enabled" faulthandler
    (ray-project/ray#65749). The Ray fixture's teardown installs faulthandler again (``restore_faulthandler``); a
    driver that does so and then crashes names the line."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import ctypes, faulthandler, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "faulthandler.enable()\n"
        "import ray\n"
        "from conftest import restore_faulthandler\n"
        "from dtop_export.corpus.cluster import connect\n"
        "assert connect(None, num_cpus=1, object_store_memory=80 * 2**20, logging_level='ERROR')\n"
        "ray.shutdown()\n"
        "restore_faulthandler()\n"
        "ctypes.string_at(0)  # line 10: the crash\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGSEGV, r.stderr[-3000:]
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr[-3000:]
    assert f'File "{script}", line 10 in <module>' in r.stderr, r.stderr[-3000:]


def test_local_ray_cluster_listens_on_loopback_only_and_keeps_token_auth(ray_cluster: str) -> None:
    """The cluster `embed --ray` starts (the module's fixture, as the CLI starts it): node IP 127.0.0.1, every
    listener of every Ray process on loopback (gcs_server, raylet, agents: the ones that bound :: / 0.0.0.0 / the
    machine's address before), token authentication on, no dashboard HTTP server."""
    import os

    from listeners import RAY_PROCESSES, listeners

    from dtop_export.corpus.cluster import token_auth_enabled

    assert ray_cluster.startswith("127.0.0.1:")
    found = listeners(os.getpid())
    names = {x.name for x in found}
    assert set(RAY_PROCESSES) <= names, f"expected Ray's processes among the listeners, got {sorted(names)}"
    assert [x for x in found if not x.loopback] == []
    assert 8265 not in {x.port for x in found}  # no dashboard
    assert token_auth_enabled()


def test_ray_equals_in_process(
    small_onnx: Path, corpus: Path, local_run: Path, ray_cluster: str, tmp_path: Path
) -> None:
    out = tmp_path / "ray"
    code = cli("embed", str(small_onnx), str(corpus), "-o", str(out), "--image-size", str(SIZE), "--shard-size", "16",
               "--ray", "--actors", "2", "-b", "4", "--no-progress", "--json", str(tmp_path / "s.json"))  # fmt: skip
    assert code == 0
    _assert_same(_exactly_once(out), _table(local_run))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["mode"] == "ray" and summary["duplicates"] == 0
    assert sum(a["images"] for a in summary["actors"]) == summary["embedded"]
    assert len(summary["actors"]) == 2 and all(a["images"] > 0 for a in summary["actors"])  # both actors worked
    assert 0 < summary["first_result_s"] < summary["wall_s"]  # start-up (cluster, actors, model) reported apart
    assert 0 < summary["startup"]["cluster_s"] < summary["first_result_s"]  # joining the cluster, a fixed cost


def test_ray_actor_that_cannot_open_its_engine_stops_the_job_in_one_line(
    small_onnx: Path, corpus: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An engine that fails to open inside the actors (here a bad option; on a cluster a runtime or GPU missing
    on a node) ends the job with one line naming the actor and the reason, no tracebacks (Ray printed ~300). The
    folder it leaves (a manifest, no shard) takes the corrected command without --force."""
    out = tmp_path / "o"
    args = [str(corpus), "-o", str(out), "--image-size", str(SIZE), "--ray", "--no-progress"]
    assert cli("embed", f"{small_onnx}:provider=nope", *args) == 2
    err = capsys.readouterr().err
    assert "a Ray actor could not open" in err and "unknown ONNX Runtime provider 'nope'" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not list(out.glob("shard-*.parquet"))
    if sys.version_info >= (3, 11):  # --debug shows the actor's own traceback
        with pytest.raises(DToPError) as info:
            embed_corpus(CorpusJob(f"{small_onnx}:provider=nope", str(corpus), out, image_size=SIZE, use_ray=True,
                                   progress=False))  # fmt: skip
        note = info.value.__notes__[0]
        assert "Traceback" in note and "ort.py" in note and "unknown ONNX Runtime provider" in note  # its frame
    assert cli("embed", str(small_onnx), *args) == 0


def test_ray_requests_the_cluster_cannot_meet_are_refused_before_any_output(
    small_onnx: Path, corpus: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPUs the cluster lacks, more CPUs per actor than it has, a decode budget no node can reserve: one line, and
    the output folder never made (the job used to create it and a "running" manifest first)."""
    out = tmp_path / "o"
    for extra, message in (
        (["--gpus-per-actor", "1"], "the Ray cluster has 0: use fewer --actors"),
        (["--cpus-per-actor", "8"], "leave less than 0.5 CPU for reading images"),
        (["--max-decode-mb", "100000000"], "--max-decode-mb 100000000"),  # a decode task no node can hold
    ):
        assert cli("embed", str(small_onnx), str(corpus), "-o", str(out), "--ray", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_ray_without_ray_data_is_one_line_before_any_output(
    small_onnx: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The [serve] extra installs Ray without Ray Data's dependencies (no pandas): `embed --ray` passed the check for
    `import ray`, started a cluster and wrote the folder's manifest, then died in `import ray.data` with a
    ModuleNotFoundError traceback (exit 1). Now the [ray] line, exit 2, and no folder."""
    monkeypatch.setitem(sys.modules, "ray.data", None)  # `import ray.data` raises ImportError
    out = tmp_path / "o"
    for model in (str(small_onnx), f"{small_onnx}:provider=cuda"):  # a GPU model: the install before --gpus-per-actor
        assert cli("embed", model, str(corpus), "-o", str(out), "--ray") == 2
        err = capsys.readouterr().err
        assert "pip install 'dtop-export[ray]'" in err and err.count("error:") == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_ray_multiscale_equals_in_process(small_onnx: Path, corpus: Path, ray_cluster: str, tmp_path: Path) -> None:
    src = tmp_path / "list.txt"
    src.write_text("\n".join(str(p) for p in sorted(corpus.rglob("*"))[:40] if p.is_file()) + "\n")
    kw: dict[str, Any] = {"image_size": SIZE, "shard_size": 8, "scales": (1.0, 0.707, 1.414), "progress": False}
    embed_corpus(CorpusJob(str(small_onnx), str(src), tmp_path / "a", **kw))
    embed_corpus(CorpusJob(str(small_onnx), str(src), tmp_path / "b", use_ray=True, batch_size=2, **kw))
    _assert_same(_exactly_once(tmp_path / "b"), _table(tmp_path / "a"))


def test_ray_precision_auto_is_resolved_once_by_the_driver(
    small_ckpt: Path, small_onnx: Path, corpus: Path, ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`embed --ray --precision auto` resolved `auto` in every actor, from its own node's recommendations (another
    CPU: another file or none), while the manifest named the driver's choice. Now the driver resolves it once and
    every actor opens that. Here only the driver has a recommendation (a stand-in): the actors of the old code
    found none and the job stopped."""
    calls: list[Path] = []

    def recommended(checkpoint: Path) -> tuple[Path, dict[str, Any]]:
        calls.append(checkpoint)
        return small_onnx, {}

    monkeypatch.setattr("dtop_export.bench.recommend.resolve_auto", recommended)
    src = tmp_path / "list.txt"
    src.write_text("\n".join(str(p) for p in sorted((corpus / "sample").glob("*.jpg"))[:4]) + "\n")
    out = tmp_path / "auto"
    job = CorpusJob(str(small_ckpt), str(src), out, image_size=SIZE, precision="auto", use_ray=True, progress=False)
    assert embed_corpus(job).embedded == 4 and calls == [small_ckpt]
    assert json.loads((out / MANIFEST).read_text())["settings"]["engine"] == small_onnx.name


def _actor_pids() -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "MapBatches(EmbedActor)" in " ".join(p.info["cmdline"] or []):
            out.append(p.info["pid"])
    return out


def test_ray_killed_actor_every_image_once(small_onnx: Path, corpus: Path, local_run: Path, ray_cluster: str,
                                           tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "killed"
    job = CorpusJob(str(small_onnx), str(corpus), out, image_size=SIZE, shard_size=16, progress=False, use_ray=True)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(summary=embed_corpus(job)))
    thread.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and thread.is_alive() and killed is None:
        pids = _actor_pids()
        if pids and list(out.glob("shard-*.parquet")):  # mid-run: a shard is out, the actor is working
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(300)
    assert killed is not None, "the job finished before an actor could be killed"
    assert not thread.is_alive() and "summary" in result
    t = _exactly_once(out)
    _assert_same(t, _table(local_run))
    assert killed not in _actor_pids()


def test_ray_killed_driver_resumes_missing_shards(small_onnx: Path, corpus: Path, local_run: Path, ray_cluster: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "driver"
    args = [str(small_onnx), str(corpus), "-o", str(out), "--image-size", str(SIZE), "--shard-size", "8", "--ray"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtop_export", "embed", *args, "--address", ray_cluster, "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("shard-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.parquet")}
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert 3 <= len(kept) < 15, f"{len(kept)} shards before the kill"
    code = cli("embed", *args, "--no-progress", "--json", str(tmp_path / "s.json"))
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["shards_reused"] == len(kept) and summary["shards_written"] == 15 - len(kept)
    assert {n: v for n, v in ((p.name, (p.stat().st_ino, p.stat().st_mtime_ns)) for p in out.glob("shard-*.parquet"))
            if n in kept} == kept  # fmt: skip
    _assert_same(_exactly_once(out), _table(local_run))


# index, search, distractors ---------------------------------------------------------------------------------


def test_index_and_search_equal_brute_force(small_onnx: Path, corpus: Path, local_run: Path, tmp_path: Path) -> None:
    idx = tmp_path / "corpus.faiss"
    assert cli("index", str(local_run), "-o", str(idx), "--no-progress") == 0
    queries = sorted((corpus / "sample").glob("*.jpg"))[:3] + [corpus / "generated" / "mixed_1.png"]
    out = tmp_path / "r.json"
    code = cli("search", str(idx), str(small_onnx), *map(str, queries), "-k", "10", "--json", str(out),
               "--picture", str(tmp_path / "r.png"))  # fmt: skip
    assert code == 0
    got = json.loads(out.read_text())["queries"]
    t = _table(local_run)
    from dtop_export.engines import load_engine
    from dtop_export.retrieval.extract import extract

    with load_engine(small_onnx) as engine:
        q = extract(engine, queries, None, (1.0,), None, False, image_size=SIZE)
    scores = q @ t["descriptor"].T
    for qi, res in enumerate(got):
        order = np.argsort(-scores[qi], kind="stable")[:10]
        assert [r["key"] for r in res["results"]] == [int(t["key"][j]) for j in order]
        assert [r["id"] for r in res["results"]] == [t["id"][j] for j in order]
        np.testing.assert_allclose([r["score"] for r in res["results"]], scores[qi][order], atol=1e-5)
    assert got[0]["results"][0]["id"] == queries[0].relative_to(corpus).as_posix()  # a corpus image finds itself
    assert Image.open(tmp_path / "r.png").size[0] > 160 * 9
    assert cli("index", str(local_run), "-o", str(idx), "--no-progress") == 2  # exists: needs --force


def _synthetic(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmark-like descriptors: 5000 places with 1..many views in a 128-d subspace plus noise (unit rows), and
    500 queries that are noisy re-shots of database images."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((5000, 128)).astype(np.float32)
    lat = centers[rng.integers(0, 5000, n)] + 0.6 * rng.standard_normal((n, 128)).astype(np.float32)
    x = lat @ (rng.standard_normal((128, dim)).astype(np.float32) / np.sqrt(128))
    x += 0.3 * np.sqrt(128 / dim) * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, 500, replace=False)] + 0.5 * x.std() * rng.standard_normal((500, dim)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _synthetic_shards(folder: Path, x: np.ndarray, shard_size: int) -> Path:
    """``x`` (unit rows) as a complete shard folder, row i under key i, id ``i<i>``, path ``p<i>``."""
    from dtop_export.corpus.shards import write_manifest

    n, dim = x.shape
    settings = CorpusSettings("m", "sha", dim, {}, 512, [1.0], shard_size, "synthetic", n, "l")
    folder.mkdir()
    for k in range(settings.n_shards()):
        keys = list(settings.shard_keys(k))
        write_shard(folder, Shard(k, keys, [f"i{j}" for j in keys], [f"p{j}" for j in keys], list(x[keys])), settings)
    write_manifest(folder, settings, "complete")
    return folder


def test_the_default_train_size_trains_any_nlist_the_corpus_allows() -> None:
    """The default training sample stopped at 200k rows: `index --type ivfpq --nlist 300000` on 1M descriptors said
    "--train-size 200000 is too small ... (raise it, or leave it out for the default)" though none was given. The
    default now grows to what nlist needs (at most the corpus); a --train-size given below it is still named."""
    from dtop_export.corpus.index import ivfpq_training

    assert ivfpq_training(1_000_000, 256, 300_000, None, 8, None) == (300_000, 32, 8, 300_000)
    assert ivfpq_training(1_000_000, 256, 1000, None, 8, None)[3] == 64_000  # 64 per cell, under the 200k cap
    assert ivfpq_training(1_000_000, 256, 10_000, None, 8, None)[3] == 200_000
    with pytest.raises(DToPError, match="--train-size 200000 is too small"):
        ivfpq_training(1_000_000, 256, 300_000, None, 8, 200_000)


@pytest.mark.parametrize(
    ("train_size", "message"),
    [
        ("3", "--train-size 3 is too small: IVF-PQ with nlist=5 and 4-bit codes trains on at least 16 vectors"),
        ("500", "--train-size 500 is larger than the corpus (200 descriptors)"),
    ],
)
def test_index_names_a_train_size_it_cannot_train_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], train_size: str, message: str
) -> None:
    """Found by review: `index --type ivfpq --train-size 3` on a corpus of 200 said 'needs at least 16 vectors to train
    ..., got 3: use exact (flat) search', blaming the corpus, after sampling; --train-size is now checked up front."""
    pytest.importorskip("faiss")
    from dtop_export.corpus.index import build_corpus_index

    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    folder = _synthetic_shards(tmp_path / "shards", x, 100)
    out = tmp_path / "pq.faiss"
    assert cli("index", str(folder), "-o", str(out), "--type", "ivfpq", "--train-size", train_size) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "flat" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    with pytest.raises(DToPError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_corpus_index(folder, out, "ivfpq", train_size=int(train_size))


def test_ivfpq_recall_on_50k(tmp_path: Path) -> None:
    from dtop_export.corpus.index import CorpusIndex, build_corpus_index

    n, dim = 50_000, 1536
    x, q = _synthetic(n, dim, 0)
    folder = _synthetic_shards(tmp_path / "shards", x, 10_000)
    assert len(ShardedDescriptors(folder)) == n
    build_corpus_index(folder, tmp_path / "flat.faiss", "flat")
    build_corpus_index(folder, tmp_path / "pq.faiss", "ivfpq", train_size=20_000, refine=4, nprobe=64)
    truth = [[h.key for h in hits] for hits in CorpusIndex(tmp_path / "flat.faiss").search(q, 10)]
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(truth, brute)]) >= 9.99  # flat = brute force (float ties)
    pq = CorpusIndex(tmp_path / "pq.faiss")
    for sidecar in (tmp_path / "pq.faiss.json", tmp_path / "pq.faiss.ids.parquet"):  # a sidecar for its index
        assert CorpusIndex(sidecar).path == tmp_path / "pq.faiss"
    plain = [[h.key for h in hits] for hits in pq.search(q, 10, refine=1)]  # k candidates re-ordered: PQ's top-k set
    refined = [[h.key for h in hits] for hits in pq.search(q, 10)]
    one_recall = np.mean([t[0] in p for t, p in zip(truth, plain)])  # faiss's R@10: the true NN in the top 10
    overlap = np.mean([len(set(t) & set(p)) / 10 for t, p in zip(truth, plain)])
    overlap_refined = np.mean([len(set(t) & set(p)) / 10 for t, p in zip(truth, refined)])
    print(f"IVF-PQ 1-recall@10 {one_recall:.3f}, 10-recall@10 {overlap:.3f}, with --refine 4 {overlap_refined:.3f}")
    assert one_recall >= 0.9
    assert overlap_refined >= 0.9 and overlap_refined > overlap


def test_equal_scores_take_the_top_k_in_key_order(tmp_path: Path) -> None:
    """Duplicates of one image score the same: which copies made the top 10 and in which order was faiss's heap's
    choice (keys 493, 411, 36.. of 41 copies, the first at 7). Equal scores now rank by key, the lowest first,
    across the cut of the top k, alone or in a batch (faiss's BLAS path from 3 queries)."""
    from dtop_export.corpus.index import CorpusIndex, build_corpus_index

    n, dim = 3000, 64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = np.sort(np.r_[7, rng.choice(np.arange(8, n), 40, replace=False)])
    x[copies] = x[7]
    build_corpus_index(_synthetic_shards(tmp_path / "shards", x, 1000), tmp_path / "flat.faiss", "flat")
    index = CorpusIndex(tmp_path / "flat.faiss")
    q = x[7] + 0.05 * rng.standard_normal(dim).astype(np.float32)
    q /= np.linalg.norm(q)
    batch = np.vstack([q, rng.standard_normal((4, dim)).astype(np.float32)])
    for queries in (q[None], batch):
        top = index.search(queries, 10)[0]
        assert [h.key for h in top] == list(copies[:10]) and len({h.score for h in top}) == 1
        wide = index.search(queries, 50)[0]  # all 41 copies in key order, then the next best images
        assert [h.key for h in wide[:41]] == list(copies) and wide[40].score > wide[41].score
        assert [h.rank for h in wide] == list(range(1, 51)) and [h.id for h in wide[:2]] == ["i7", f"i{copies[1]}"]


def test_evaluate_accepts_a_shard_folder(small_onnx: Path, local_run: Path, tmp_path: Path) -> None:
    t = _table(local_run)
    np.save(tmp_path / "d.npy", t["descriptor"])
    lazy = ShardedDescriptors(local_run)
    assert lazy.shape == t["descriptor"].shape
    np.testing.assert_array_equal(lazy[5:40], t["descriptor"][5:40])
    runs = []
    for dis in (tmp_path / "d.npy", local_run):
        out = tmp_path / f"{dis.name}.json"
        assert cli("evaluate", str(small_onnx), "--distractors", str(dis), "--image-size", str(SIZE), "--no-progress",
                   "--json", str(out)) == 0  # fmt: skip
        runs.append(json.loads(out.read_text()))
    assert runs[0]["n_distractors"] == runs[1]["n_distractors"] == len(t["id"])
    assert runs[0]["map"] == runs[1]["map"]
