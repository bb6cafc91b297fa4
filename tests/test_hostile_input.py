"""The corpus, index, search, evaluate --distractors, openvino, cpp and info commands against a hostile user
(issue 34): one job per output folder (two real processes, SIGKILL, Ctrl-C), numbers checked before anything is
written, folders and indexes checked against what they claim to be, no traceback, no silent overwrite, paths that
open from anywhere. Cheap by design: 10 small images at 64 px, synthetic shards, no Ray cluster, no C++ build."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli
from PIL import Image

from dtop_export.corpus.embed import CorpusJob, embed_corpus
from dtop_export.corpus.shards import MANIFEST, CorpusSettings, Shard, shard_name, write_manifest, write_shard

SIZE = "64"
EXE = [sys.executable, "-m", "dtop_export"]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 small JPEGs of random pixels, of several shapes."""
    folder = tmp_path_factory.mktemp("imgs") / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (50 + 9 * i, 90, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.jpg")
    return folder


@pytest.fixture(scope="module")
def run(small_onnx: Path, imgs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10 images embedded at 64 px into 3 shards of 4 (do not change it: tests copy it)."""
    out = tmp_path_factory.mktemp("run") / "corpus"
    embed_corpus(CorpusJob(str(small_onnx), str(imgs), out, image_size=int(SIZE), shard_size=4, progress=False))
    return out


def _refused(capsys: pytest.CaptureFixture[str], *argv: str, match: str) -> str:
    """``dtop-export ARGV`` exits 2 with one ``error:`` line containing ``match`` and no traceback."""
    code = cli(*argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert err.count("error:") == 1 and "Traceback" not in err and match in err, err
    return err


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _synthetic(folder: Path, n: int = 600, dim: int = 64, shard_size: int = 200) -> Path:
    """A complete shard folder of ``n`` random unit descriptors (no model: for index parameters)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    settings = CorpusSettings("m.onnx", "a" * 64, dim, {}, 64, [1.0], shard_size, "synthetic", n, "l")
    folder.mkdir()
    for k in range(settings.n_shards()):
        keys = list(settings.shard_keys(k))
        write_shard(folder, Shard(k, keys, [f"i{j}" for j in keys], [f"p{j}" for j in keys], list(x[keys])), settings)
    write_manifest(folder, settings, "complete", {"counts": {"images": n, "embedded": n, "skipped": 0}})
    return folder


# 1. one job per folder; 12. Ctrl-C says what was kept --------------------------------------------------------


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise AssertionError(f"{what} exited {proc.returncode}: {err}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_for_reader(fifo: Path, proc: subprocess.Popen[str], timeout: float = 90) -> int:
    """A write end of ``fifo`` once ``proc`` has it open for reading (before that: ENXIO); the reader then blocks in
    read() for as long as the caller keeps the returned descriptor open."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        if proc.poll() is not None:
            raise AssertionError(f"the job exited {proc.returncode} before it read {fifo.name}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for the job to open {fifo.name}")


def _holder(lock: Path) -> str:
    return lock.read_text() if lock.is_file() else ""


def test_one_job_per_folder_stale_safe_after_sigkill_and_ctrl_c_says_how_to_resume(
    small_onnx: Path, imgs: Path, tmp_path: Path
) -> None:
    """A job blocked on a FIFO holds the folder: a second job (a second process) is refused in one line naming the
    holder; after the holder is SIGKILLed the next job takes the folder at once (no stale lock); Ctrl-C on that one
    exits 130 saying what was kept; the command run again writes only the missing shard."""
    fifo = tmp_path / "stuck.jpg"  # opening it blocks until a writer comes: the job stays mid-run
    os.mkfifo(fifo)
    files = sorted(imgs.glob("*.jpg"))
    src = tmp_path / "list.txt"
    src.write_text("\n".join(map(str, [*files[:4], fifo, files[4]])) + "\n")  # shards (0,1) (2,3) (fifo,4)
    out = tmp_path / "out"
    args = ["embed", str(small_onnx), str(src), "-o", str(out), "--image-size", SIZE, "--shard-size", "2"]
    lock = out / ".dtop-export.lock"
    procs: list[subprocess.Popen[str]] = []
    writer: int | None = None

    def spawn() -> subprocess.Popen[str]:
        procs.append(subprocess.Popen([*EXE, *args, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env=os.environ | {"PYTHONFAULTHANDLER": "1"}))  # fmt: skip
        return procs[-1]

    try:
        first = spawn()
        _wait_for(lambda: (out / shard_name(1)).exists() and f'"pid": {first.pid}' in _holder(lock), first, "job 1")
        second = subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another embed job: pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        first.kill()
        first.wait()
        third = spawn()
        _wait_for(lambda: f'"pid": {third.pid}' in _holder(lock), third, "the job after a SIGKILL")
        writer = _wait_for_reader(fifo, third)  # its decode is in the FIFO: it blocks in read() while we hold this
        third.send_signal(signal.SIGINT)
        try:
            _, err = third.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            third.send_signal(signal.SIGABRT)
            raise AssertionError(f"Ctrl-C did not end the job:\n{third.communicate(timeout=30)[1][-6000:]}") from None
        assert third.returncode == 130, err[-2000:]
        assert "interrupted: 2 of 3 shard(s) are complete" in err and "run the same command again" in err, err
    finally:
        if writer is not None:
            os.close(writer)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    fifo.unlink()
    shutil.copy(files[5], fifo)
    assert cli(*args, "--no-progress", "--json", str(tmp_path / "s.json")) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["shards_reused"], summary["shards_written"], summary["embedded"]) == (2, 1, 6)
    assert _holder(lock) == ""  # released: no holder named


# 2. ranges (the OOM case by its refusal); 10. Ray options before any output --------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "0"], "--image-size must be >= 1, got 0"),
        (["--image-size", "-5"], "--image-size must be >= 1, got -5"),
        (["--image-size", "8"], "--image-size must be at least the model's stride 16"),
        (["--image-size", "100000"], "GiB are available here: use --image-size"),
        (["--scales", "100"], "at scale 100 needs at least"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--shard-size", "0"], "--shard-size must be >= 1"),
        (["--ray", "--actors", "0"], "--actors must be >= 1"),
        (["--ray", "--cpus-per-actor", "0"], "--cpus-per-actor must be > 0"),
        (["--ray", "--gpus-per-actor", "-1"], "--gpus-per-actor must be >= 0"),
        (["--ray", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    ],
)
def test_numbers_and_ray_options_are_refused_before_anything_is_written(
    small_onnx: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    _refused(capsys, "embed", str(small_onnx), str(imgs), "-o", str(out), *extra, match=message)
    assert not out.exists()
    if "--ray" not in extra:
        npy = tmp_path / "d.npy"
        _refused(capsys, "embed", str(small_onnx), str(imgs), "-o", str(npy), *extra, match=message)
        assert not npy.exists()


def _too_many_threads() -> str:
    from dtop_export.host import usable_cpus

    return str(usable_cpus() + 1)


@pytest.mark.parametrize(
    "spec, extra, message",
    [
        (":foo=1", [], "small.onnx: onnxruntime takes no option 'foo': it takes graph_optimization, provider, spin, "),
        (":threads=abc", [], "threads must be a whole number of at least 1, got 'abc'"),
        (":provider=cpu,threds=2", [], "onnxruntime takes no option 'threds'"),
        (
            "",
            ["--threads", _too_many_threads()],
            f"{_too_many_threads()} threads asked for (--threads or MODEL:threads=), and this process can run",
        ),
    ],
    ids=["unknown-option", "threads-not-a-number", "typo-among-good-ones", "more-threads-than-cpus"],
)
def test_engine_options_are_checked_before_anything_is_written(
    small_onnx: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, extra: list[str],
    message: str,
) -> None:  # fmt: skip
    """A typo in MODEL:key=value was a TypeError traceback from the engine, after a corpus job had made its folder
    (manifest "running" + lock); a million --threads had ONNX Runtime allocate threads, unkillable, for minutes."""
    model = str(small_onnx) + spec
    out, npy = tmp_path / "out", tmp_path / "d.npy"
    _refused(capsys, "embed", model, str(imgs), "-o", str(out), *extra, match=message)
    _refused(capsys, "embed", model, str(imgs), "-o", str(npy), *extra, match=message)
    assert not out.exists() and not npy.exists()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["quantize", "{onnx}", "-o", "{out}/q.onnx", "--calib-sizes", "320,100000"], "--calib-sizes"),
        (["openvino", "{onnx}", "--int8", "-o", "{out}/q.xml", "--calib-sizes", "100000"], "--calib-sizes"),
        (["parity", "{ckpt}", "{onnx}", "--image-size", "100000", "--json", "{out}/p.json"], "--image-size"),
        (["whiten", "{ckpt}", "--images", "{imgs}", "--size", "100000", "-o", "{out}/w.pt"], "--size"),
        (["check", "{onnx}", "--fp16-audit", "--image-size", "100000", "--json", "{out}/c.json"], "--image-size"),
        (["onnx", "{ckpt}", "-o", "{out}/s.onnx", "--static", "100000x64"], "--static's longer side"),
    ],
    ids=["quantize", "openvino-int8", "parity", "whiten", "check-fp16-audit", "onnx-static"],
)
def test_every_size_option_is_checked_against_memory_before_any_work(
    small_onnx: Path, small_ckpt: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], option: str,
) -> None:  # fmt: skip
    """Only embed, evaluate, bench and cpp parity checked their sizes: `quantize --calib-sizes 100000` ran 105 s
    and was killed by the kernel (exit 137), the others ended in a MemoryError or allocator traceback."""
    out = tmp_path / "out"
    out.mkdir()
    fill = {"onnx": str(small_onnx), "ckpt": str(small_ckpt), "imgs": str(imgs), "out": str(out)}
    _refused(capsys, *(a.format(**fill) for a in argv), match=f"{option} 100000 needs at least")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "openvino", "optimize"])
def test_a_checkpoint_given_for_an_onnx_file_says_to_export_it(
    small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Was "not a readable ONNX file (DecodeError)" or "X.int8.onnx exists" (the output checked first)."""
    _refused(capsys, command, str(small_ckpt), match="is a PyTorch checkpoint, not ONNX: export it first with")


def test_engine_options_are_each_engines_constructor_parameters() -> None:
    """What a user may set per runtime: the constructors' keyword-only parameters (what comes before the ``*`` —
    the model, a loader's or a caller's arguments such as ``on_run`` — is not an option; it was a hand-kept list)."""
    from dtop_export.engines import engine_factory

    assert engine_factory(Path("m.onnx"))[2] == ("graph_optimization", "provider", "spin", "threads")
    assert engine_factory(Path("m.xml"))[2] == ("device", "mode", "precision", "threads")
    assert engine_factory(Path("m.onnx"), "openvino")[0] == "openvino"
    assert engine_factory(Path("m.pte"))[2] == ("precision", "threads")
    assert engine_factory(Path("m.plan"))[2] == ("device", "runtime_cache", "sidecar")
    torch_options = engine_factory(Path("m.pt"))[2]
    assert {"whiten", "precision", "device", "threads", "compile", "cast", "fixed_batch"} <= set(torch_options)
    assert not {"cls", "model", "path", "preprocess", "whitening", "source", "kwargs"} & set(torch_options)


# 3. folder integrity (index, evaluate --distractors); 4. no tracebacks -------------------------------------------


def test_index_checks_the_folder_against_its_manifest(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = _copy(run, tmp_path / "gone")
    (gone / shard_name(1)).unlink()
    _refused(capsys, "index", str(gone), "-o", str(tmp_path / "g.faiss"), match="1 of the 3 shards of")
    assert not (tmp_path / "g.faiss").exists()
    assert cli("index", str(gone), "-o", str(tmp_path / "g.faiss"), "--force", "--no-progress") == 0
    assert "--force: 1 of the 3 shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.faiss.json").read_text())["ntotal"] == 6  # what is there, said so
    foreign = _copy(run, tmp_path / "foreign")  # a shard of another job dropped in: the same keys twice
    shutil.copy(run / shard_name(0), foreign / shard_name(3))
    _refused(capsys, "index", str(foreign), "-o", str(tmp_path / "f.faiss"), match="its manifest does not list")
    other = _copy(run, tmp_path / "other")  # a shard written under other settings in a shard's place
    shutil.copy(_synthetic(tmp_path / "syn", n=12, shard_size=4) / shard_name(1), other / shard_name(1))
    _refused(capsys, "index", str(other), "-o", str(tmp_path / "o.faiss"), match="written by another job")
    from dtop_export.corpus.integrity import check_rows, settings_of
    from dtop_export.errors import DToPError

    settings = settings_of(json.loads((run / MANIFEST).read_text()), run)
    narrow = {"key": np.arange(4), "descriptor": np.full((4, 64), 0.125, np.float32)}  # `index` has no model
    with pytest.raises(DToPError, match="holds 64-d descriptors; its manifest says 256-d ones"):
        check_rows(narrow, run / shard_name(0), settings, force=True)
    cut = _copy(run, tmp_path / "cut")
    data = (run / shard_name(2)).read_bytes()
    (cut / shard_name(2)).write_bytes(data[: len(data) // 2])
    _refused(capsys, "index", str(cut), "-o", str(tmp_path / "c.faiss"), match="is damaged or not a shard")
    running = _copy(run, tmp_path / "running")
    manifest = json.loads((running / MANIFEST).read_text())
    (running / MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))
    _refused(capsys, "index", str(running), "-o", str(tmp_path / "r.faiss"), match="is unfinished")
    assert [p.name for p in tmp_path.glob("*.faiss")] == ["g.faiss"]  # only the forced one


def test_evaluate_refuses_distractors_that_do_not_fit_before_embedding(
    small_onnx: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refusal comes before the data set is embedded (the mAP 92.9 -> 4.9 of unnormalised distractors, with no
    message, is what they prevented)."""
    evaluate = ["evaluate", str(small_onnx), "--no-progress"]
    args = [*evaluate, "--image-size", SIZE, "--distractors"]
    running = _copy(run, tmp_path / "running")
    manifest = json.loads((running / MANIFEST).read_text())
    (running / MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))
    _refused(capsys, *args, str(running), match="is unfinished")
    _refused(capsys, *evaluate, "--distractors", str(run), match="at image size 64; this evaluation runs at 256")
    _refused(capsys, *args, str(run), "--scales", "1,0.5", match="embedded at scales 1; this evaluation uses 1,0.5")
    good = np.concatenate(_descriptors(run))
    cases = {
        "int32.npy": (good * 1000).astype(np.int32),
        "nan.npy": np.where(np.arange(good.size).reshape(good.shape) == 7, np.nan, good).astype(np.float32),
        "scaled.npy": good * 3,
        "narrow.npy": good[:, :128] / np.linalg.norm(good[:, :128], axis=1, keepdims=True),
    }
    messages = ["int32 values", "non-finite values", "not L2-normalised", "128-d descriptors; the model gives 256-d"]
    for (name, array), message in zip(cases.items(), messages):
        np.save(tmp_path / name, array)
        _refused(capsys, *args, str(tmp_path / name), match=message)
    side = tmp_path / "sized.npy"
    np.save(side, good)
    side.with_suffix(".json").write_text(json.dumps({"image_size": 128, "scales": [1.0]}))
    _refused(capsys, *args, str(side), match="embedded at image size 128")
    out = tmp_path / "e.json"
    assert cli(*args, str(tmp_path / "scaled.npy"), "--force", "--json", str(out)) == 0  # forced: used, with a warning
    assert "warning:" in capsys.readouterr().err and json.loads(out.read_text())["n_distractors"] == 10
    bare = tmp_path / "nan.npy"  # no sidecar: its provenance is unknown, but its refusal is the one line printed
    assert cli(*args, str(bare)) == 2
    assert capsys.readouterr().err.count("\n") == 1
    shown = [*evaluate[:2], "--image-size", SIZE, "--distractors", str(run), "--json", str(tmp_path / "p.json")]
    assert cli(*shown) == 0  # the distractors' check and ranking have bars of their own (+R1M: minutes)
    bars = capsys.readouterr().out
    assert "checking distractors" in bars and "10/10" in bars.split("checking distractors")[1].splitlines()[0]
    assert any(line.startswith("distractors") and "10/10" in line for line in bars.splitlines())


def test_distractor_shards_are_read_once_whatever_the_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The +R1M ranking slices a shard folder in chunks of 65536 rows: a shard across a chunk boundary was read
    (decoded from Parquet) once per chunk it falls in, a folder of 200k-row shards 4x (an audit of evaluate at scale);
    slices in order now read each shard once."""
    import dtop_export.corpus.shards as shards

    folder = _synthetic(tmp_path / "syn", n=600, shard_size=200)
    reads: list[str] = []
    real = shards.read_shard
    monkeypatch.setattr(shards, "read_shard", lambda path, columns: reads.append(path.name) or real(path, columns))
    m = shards.ShardedDescriptors(folder)
    reads.clear()  # the constructor reads the first shard's width
    got = np.concatenate([m[a : a + 150] for a in range(0, 600, 150)])
    assert reads == [shard_name(k) for k in range(3)]
    np.testing.assert_array_equal(got, np.concatenate([real(f, ("descriptor",))["descriptor"] for f in m.files]))


def test_search_without_query_images_names_what_it_looked_for(
    small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A query folder holding no image (notes, a .npy) said only "no query images given" (an audit of search),
    where embed names the suffixes it searched for."""
    from dtop_export.corpus.index import build_corpus_index

    build_corpus_index(_synthetic(tmp_path / "syn", n=12, shard_size=4), tmp_path / "s.faiss")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("x")
    err = _refused(capsys, "search", str(tmp_path / "s.faiss"), str(small_onnx), str(tmp_path / "q"),
                   match=f"no query images in {tmp_path / 'q'} (folders are searched for .jpg, ")  # fmt: skip
    assert err.count("\n") == 1


def test_flat_search_of_a_batch_takes_matrix_products_and_equals_brute_force(tmp_path: Path) -> None:
    """faiss-cpu 1.15 scores every batch of queries one query at a time (its BLAS threshold is 128000 queries), and
    in 1024-row blocks past it: 100 queries against 1M x 256 took 11.8 s where 64k-row matrix products take 1.5 s (an
    audit of search at scale). A batch now goes through the products, across a block boundary, as brute force."""
    import faiss

    from dtop_export.corpus.index import CorpusIndex, build_corpus_index

    folder = _synthetic(tmp_path / "syn", n=70_000, dim=16, shard_size=35_000)
    build_corpus_index(folder, tmp_path / "f.faiss")
    x = np.concatenate(_descriptors(folder))
    q = x[::1750][:40] + 0.1  # 40 queries near corpus rows
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = CorpusIndex(tmp_path / "f.faiss")  # opening an index sets faiss's process-wide search settings
    assert faiss.cvar.distance_compute_blas_threshold <= 3  # a batch of 3 already reads the corpus once, not 3 times
    assert faiss.cvar.distance_compute_blas_database_bs >= 65536
    assert faiss.cvar.distance_compute_blas_query_bs <= 1024  # a block of scores <= 256 MiB, not faiss's 1 GiB
    hits = index.search(q, 5) + index.search(q[:3], 5)  # both through the products
    scores = q @ x.T
    for row, got in zip(np.concatenate([scores, scores[:3]]), hits):
        top = np.argsort(-row, kind="stable")[:5]
        assert [h.key for h in got] == top.tolist()
        np.testing.assert_allclose([h.score for h in got], row[top], atol=1e-5)


def test_a_flat_index_holds_its_vectors_once_while_it_is_built() -> None:
    """Shard by shard, faiss's vector of a flat index doubled as it grew, holding the old and the new copy at once:
    1M x 256 peaked at 1.56 GB for 1.02 GB of descriptors (an audit of index at scale; up to 2x just past a
    doubling). The storage is allocated once: adding every shard never moves it."""
    import faiss

    from dtop_export.corpus.index import flat_index

    index = flat_index(16, 9 * 1000)
    flat = faiss.downcast_index(index.index)
    where = flat.codes.data()
    x = np.random.default_rng(0).standard_normal((9000, 16)).astype(np.float32)
    for k in range(9):
        index.add_with_ids(x[k * 1000 : (k + 1) * 1000], np.arange(k * 1000, (k + 1) * 1000))
        assert flat.codes.data() == where
    np.testing.assert_array_equal(index.reconstruct(8999), x[8999])


def _descriptors(folder: Path) -> list[np.ndarray]:
    from dtop_export.corpus.shards import iter_shards

    return [s["descriptor"] for s in iter_shards(folder)]


def test_index_and_its_sidecars_must_belong_together(
    small_onnx: Path, run: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    idx, other = tmp_path / "a.faiss", tmp_path / "b.faiss"
    assert cli("index", str(run), "-o", str(idx), "--no-progress") == 0
    b = tmp_path / "b"  # the same 10 images at another size: same keys, same count, another index
    embed_corpus(CorpusJob(str(small_onnx), str(imgs), b, image_size=96, shard_size=4, progress=False))
    assert cli("index", str(b), "-o", str(other), "--no-progress") == 0
    capsys.readouterr()
    ids = tmp_path / "a.faiss.ids.parquet"
    kept = ids.read_bytes()
    query = ["search", str(idx), str(small_onnx), str(imgs / "img_03.jpg")]
    for content, message in ((b"", "is damaged or not an ids sidecar"), (b"garbage", "is damaged or not an ids")):
        ids.write_bytes(content)
        _refused(capsys, *query, match=message)
    shutil.copy(tmp_path / "b.faiss.ids.parquet", ids)  # -k 40 raised IndexError; -k 5 printed wrong paths
    for k in ("40", "5"):
        _refused(capsys, *query, "-k", k, match="belongs to another index")
    ids.write_bytes(kept)
    shutil.copy(tmp_path / "b.faiss.json", tmp_path / "a.faiss.json")
    _refused(capsys, *query, match="is not the index its .json sidecar describes")


# 5. bench --recommend: see tests/test_recommend.py -----------------------------------------------------------------
# 6. no silent overwrites ---------------------------------------------------------------------------------------------


def test_no_file_is_overwritten_without_force(
    small_onnx: Path, run: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = [str(imgs / "img_00.jpg"), "--image-size", SIZE, "--no-progress"]
    (tmp_path / "j.json").write_text("an unrelated file\n")
    _refused(capsys, "embed", str(small_onnx), *one, "-o", str(tmp_path / "j.npy"), match="j.json exists: pass --force")
    assert (tmp_path / "j.json").read_text() == "an unrelated file\n"
    assert cli("embed", str(small_onnx), *one, "-o", str(tmp_path / "j.npy"), "--force") == 0
    _refused(capsys, "embed", str(small_onnx), *one, "-o", str(tmp_path / "j.npy"), match="pass --force")
    (tmp_path / "vic.bin").write_bytes(b"someone's weights")
    _refused(capsys, "openvino", str(small_onnx), "-o", str(tmp_path / "vic.xml"), match="vic.bin exists")
    assert (tmp_path / "vic.bin").read_bytes() == b"someone's weights" and not (tmp_path / "vic.xml").exists()
    (tmp_path / "st.faiss.ids.parquet").write_bytes(b"stale")
    _refused(capsys, "index", str(run), "-o", str(tmp_path / "st.faiss"), match="st.faiss.ids.parquet exists")
    assert cli("index", str(run), "-o", str(tmp_path / "st.faiss"), "--force", "--no-progress") == 0
    for option, name in (("--json", "h.json"), ("--picture", "h.png")):
        (tmp_path / name).write_text("mine\n")
        query = ["search", str(tmp_path / "st.faiss"), str(small_onnx), one[0], option, str(tmp_path / name)]
        _refused(capsys, *query, match=f"{name} exists: pass --force")
        assert (tmp_path / name).read_text() == "mine\n"
    assert cli(*query, "--force") == 0 and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    _refused(capsys, "index", str(run), "-o", str(tmp_path), match="is a folder: give the name of a file to write")


# 7. paths as typed ------------------------------------------------------------------------------------------------


def test_stored_paths_open_from_anywhere_and_resume_by_resolved_path(
    small_onnx: Path, imgs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(imgs.parent)
    args = ["embed", str(small_onnx), "--image-size", SIZE, "--shard-size", "4", "--no-progress"]
    assert cli(*args, "imgs", "-o", str(tmp_path / "c")) == 0
    assert cli("index", str(tmp_path / "c"), "-o", str(tmp_path / "c.faiss"), "--no-progress") == 0
    summary = tmp_path / "s.json"
    assert cli(*args, str(imgs), "-o", str(tmp_path / "c"), "--json", str(summary)) == 0  # /abs/imgs: the same listing
    assert json.loads(summary.read_text())["shards_reused"] == 3
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hits = tmp_path / "h.json"
    query = ["search", str(tmp_path / "c.faiss"), str(small_onnx), str(imgs / "img_03.jpg"), "-k", "3"]
    assert cli(*query, "--json", str(hits), "--picture", "p.png") == 0, capsys.readouterr().err
    paths = [h["path"] for h in json.loads(hits.read_text())["queries"][0]["results"]]
    assert paths[0] == str(imgs / "img_03.jpg") and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


# 8. cpp parity --binary ----------------------------------------------------------------------------------------------


def test_cpp_parity_runs_the_binary_it_is_given(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy("/bin/true", tmp_path / "dtop-embed-copy")  # './' kept: this file runs, not a PATH lookup
    parity = ["cpp", "parity", str(small_onnx), "--binary"]
    _refused(capsys, *parity, "./dtop-embed-copy", match="dtop-embed-copy is not dtop-embed")  # not "No such file"
    _refused(capsys, *parity, "/bin/true", match="/bin/true is not dtop-embed")
    (tmp_path / "plain").write_bytes(b"\x7fELF")
    _refused(capsys, *parity, "plain", match="plain is not executable: `chmod +x plain`")
    fake = tmp_path / "fake-embed"  # answers --help like dtop-embed, then writes nothing
    fake.write_text("#!/bin/sh\n[ \"$1\" = --help ] && echo 'usage: dtop-embed MODEL IMAGE...'\nexit 0\n")
    fake.chmod(0o755)
    _refused(capsys, *parity, str(fake), match="exited 0 without writing cpp.npy")


# 9. index parameters --------------------------------------------------------------------------------------------------


def test_descriptor_checks_read_a_mapped_file_in_small_chunks(tmp_path: Path) -> None:
    """The finite/unit-norm check of distractors and shards made float64 copies of 65,536-row chunks: ~1.7 GB at a
    time for R1M's 1536-d descriptors (a review of retrieval at scale). Now float32 chunks of 32 MiB: a 70,000 x 256
    file (72 MB) is checked with a few MiB of numpy memory (old code: ~270 MB), and still finds the bad row."""
    import tracemalloc

    from dtop_export.corpus.integrity import check_descriptors
    from dtop_export.errors import DToPError

    rng = np.random.default_rng(0)
    x = rng.standard_normal((70_000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "d.npy", x)
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    rows: list[int] = []
    tracemalloc.start()
    try:
        assert check_descriptors(mapped, "d.npy", 256, advance=rows.append) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"{peak / 2**20:.0f} MiB"
    assert sum(rows) == 70_000
    x[66_000, 3] = np.nan
    x[67_000] *= 1.01
    with pytest.raises(DToPError, match="non-finite values .* first in row 66000"):
        check_descriptors(x, "d.npy", 256)
    x[66_000, 3] = 0.0
    x[66_000] /= np.linalg.norm(x[66_000])
    with pytest.raises(DToPError, match=r"not L2-normalised \(\|norm - 1\| up to 0.01\)"):
        check_descriptors(x, "d.npy", 256)
    assert check_descriptors(x, "d.npy", 256, force=True) == ["d.npy holds descriptors that are not L2-normalised "
                                                              "(|norm - 1| up to 0.01)"]  # fmt: skip


def test_an_opened_index_holds_no_python_object_per_row(tmp_path: Path) -> None:
    """CorpusIndex kept every id and path as a Python string (1M GLDv2-like rows: ~200 MB, and ~175 MB more of the
    parquet decode's freed buffers kept by Arrow's pool: 640 MB resident for a 172 MB index; now 350 MB). Ids and
    paths stay Arrow arrays: opening 200k rows allocates almost nothing on the Python heap, hits still resolve."""
    import tracemalloc

    from dtop_export.corpus.index import CorpusIndex, build_corpus_index

    folder = _synthetic(tmp_path / "syn", n=200_000, dim=4, shard_size=100_000)
    build_corpus_index(folder, tmp_path / "f.faiss")
    tracemalloc.start()
    try:
        index = CorpusIndex(tmp_path / "f.faiss")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 4 << 20, f"{held / 2**20:.1f} MiB on the Python heap"  # old code: ~26 MiB (2 strings per row)
    x = np.concatenate(_descriptors(folder))
    hit = index.search(x[123_456:123_457], 1)[0][0]
    assert (hit.key, hit.id, hit.path) == (123_456, "i123456", "p123456")


def test_concurrent_searches_with_their_own_nprobe_and_refine_do_not_mix(tmp_path: Path) -> None:
    """serve runs searches on threads: `search(nprobe=...)` set nprobe (and k_factor) on the shared index, so a
    request could run with another request's values (a review of the service). Each search now passes its own
    faiss parameters; the index keeps the stored ones."""
    import faiss

    from dtop_export.corpus.index import CorpusIndex, build_corpus_index

    folder = _synthetic(tmp_path / "syn", n=3000, dim=16, shard_size=1500)
    build_corpus_index(folder, tmp_path / "pq.faiss", "ivfpq", nlist=32, m=4, nbits=6, nprobe=4, refine=2)
    index = CorpusIndex(tmp_path / "pq.faiss")
    q = np.concatenate(_descriptors(folder))[::25] + 0.05  # 120 queries near corpus rows
    settings = [(None, None), (1, 1), (32, 8)]  # (nprobe, refine); None: the stored 4 and 2
    want = {s: [[h.key for h in hits] for hits in index.search(q, 10, *s)] for s in settings}
    assert len({str(w) for w in want.values()}) == 3  # the values change the results: the test can see a mix-up
    ivf, refine = faiss.extract_index_ivf(index.index), faiss.downcast_index(index.index.index)
    assert (ivf.nprobe, refine.k_factor) == (4, 2.0)  # searches left the index's own values alone

    def search(s: tuple[int | None, int | None]) -> tuple[tuple[int | None, int | None], list[list[int]]]:
        return s, [[h.key for h in hits] for hits in index.search(q, 10, *s)]

    with ThreadPoolExecutor(6) as pool:
        for s, got in pool.map(search, settings * 12):
            assert got == want[s], s
    assert [[h.key for h in hits] for hits in CorpusIndex(tmp_path / "pq.faiss").search(q, 10)] == want[(None, None)]


def test_index_parameters_are_checked_at_build_time_and_faiss_is_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """faiss writes its warnings to the process's stderr (C++): captured at the file descriptor."""
    folder = _synthetic(tmp_path / "syn")
    out = str(tmp_path / "i.faiss")
    for option, value in (("--nprobe", "0"), ("--nprobe", "-3"), ("--nlist", "0"), ("--m", "0"),
                          ("--train-size", "0"), ("--train-size", "-5"), ("--nbits", "0")):  # fmt: skip
        _refused(capfd, "index", str(folder), "-o", out, "--type", "ivfpq", option, value, match=f"{option} must be")
    assert cli("index", str(folder), "-o", out, "--refine", "4", "--no-progress") == 0
    assert "--refine (IVF-PQ options, --type ivfpq) ignored" in capfd.readouterr().out
    capfd.readouterr()
    assert cli("index", str(folder), "-o", out, "--type", "ivfpq", "--force", "--no-progress") == 0
    printed = capfd.readouterr()
    assert "WARNING clustering" not in printed.err + printed.out  # faiss printed one per PQ sub-quantiser
    assert printed.out.count("note: training on 600 vectors") == 1
    params = json.loads((tmp_path / "i.faiss.json").read_text())["params"]
    assert params["nprobe"] == 15 and params["nlist"] == 15  # the default 16, bounded by nlist
    assert cli("index", str(folder), "-o", out, "--type", "ivfpq", "--force") == 0  # with bars
    bars = capfd.readouterr().out  # IVF-PQ's sampling and k-means (minutes at 1M) showed "indexing 0/600" meanwhile
    assert any(line.startswith("training (sample, k-means)") and "1/1" in line for line in bars.splitlines()), bars
    assert any(line.startswith("indexing (ivfpq)") and "600/600" in line for line in bars.splitlines()), bars


# 11. sources ----------------------------------------------------------------------------------------------------------


def test_sources_name_null_rows_and_strip_a_bom(
    small_onnx: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    embed = ["embed", str(small_onnx), "--image-size", SIZE, "--no-progress", "-o"]
    pq.write_table(pa.table({"path": [str(imgs / "img_00.jpg"), None, None]}), tmp_path / "t.parquet")
    _refused(capsys, *embed, str(tmp_path / "a"), str(tmp_path / "t.parquet"), match="row 2 has no 'path'")
    (tmp_path / "t.csv").write_text(f"path,id\n{imgs / 'img_00.jpg'},a\n{imgs / 'img_01.jpg'},\n")
    _refused(capsys, *embed, str(tmp_path / "b"), str(tmp_path / "t.csv"), match="line 3 has an empty 'id'")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfimgs/img_00.jpg\nimgs/img_01.jpg\n")
    (tmp_path / "imgs").symlink_to(imgs)
    assert cli(*embed, str(tmp_path / "c"), str(tmp_path / "bom.txt")) == 0
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["counts"] == {"images": 2, "embedded": 2, "skipped": 0}


# 12. smaller ----------------------------------------------------------------------------------------------------------


def test_smaller_ones(
    small_onnx: Path, run: Path, imgs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _refused(capsys, "cpp", "build", "-j", "-1", "--build-dir", str(tmp_path / "b"), match="--jobs must be >= 1")
    _refused(capsys, "cpp", "build", "--build-dir", str(a_file), match=f"--build-dir {a_file} is a file")
    _refused(capsys, "cpp", "build", "--build-dir", str(tmp_path / "b"), "--prefix", str(a_file), match="is a file")
    assert not (tmp_path / "b").exists()  # refused before configuring
    # info describes a shard folder, an index (or its sidecar) and an .npy of descriptors
    assert cli("index", str(run), "-o", str(tmp_path / "x.faiss"), "--no-progress") == 0
    np.save(tmp_path / "d.npy", np.concatenate(_descriptors(run)))
    capsys.readouterr()
    described = {run: "shard folder", tmp_path / "x.faiss.json": "faiss index", tmp_path / "d.npy": "descriptor"}
    for path, kind in described.items():
        assert cli("info", str(path)) == 0
        printed = capsys.readouterr().out
        assert kind in printed and "check: ok" in printed, printed
    # a failed check exits 1, as parity does on a failed contract (the report still printed, JSON included)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / shard_name(1)).write_bytes(b"PAR1 damaged")
    nan = np.load(tmp_path / "d.npy")
    nan[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "x.faiss.ids.parquet").write_bytes(b"garbage")
    for path in (damaged, tmp_path / "nan.npy", tmp_path / "x.faiss"):
        assert cli("info", str(path)) == 1
        assert "check: FAIL" in capsys.readouterr().out
        assert cli("info", str(path), "--json") == 1
        assert json.loads(capsys.readouterr().out)["check"].startswith("FAIL: ")
    # a folder named like corpus.v2 is a folder; a file suffix is refused
    v2 = ["embed", str(small_onnx), str(imgs), "--image-size", SIZE, "--no-progress", "-o"]
    assert cli(*v2, str(tmp_path / "corpus.v2")) == 0 and (tmp_path / "corpus.v2" / MANIFEST).is_file()
    _refused(capsys, *v2, str(tmp_path / "corpus.parquet"), match="should end in .npy (one matrix) or name a folder")
    # the changed-settings refusal names the old and the new value
    _refused(capsys, *v2[:3], "--image-size", "96", "--shard-size", "4", "-o", str(run),
             match="another image size (was 64, now 96)")  # fmt: skip
    # INT8 calibration on fewer images than asked, below the floor: refused, before converting anything
    one = tmp_path / "calib"
    one.mkdir()
    shutil.copy(imgs / "img_00.jpg", one)
    out = tmp_path / "q.xml"
    _refused(capsys, "openvino", str(small_onnx), "--int8", "--calib", str(one), "--calib-count", "16", "-o", str(out),
             match="1 calibration image(s) for the 16 asked")  # fmt: skip
    assert not out.exists()
