"""Benchmark harness, ORT CPU optimisation and INT8 quantisation on the small preset (fast; no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# INT8 (weights per channel, activations per tensor) of the small random-init preset vs fp32 ONNX Runtime,
# per image, on real photos at two sizes. Measured ~0.996-0.999; the bound leaves room for BLAS variation.
INT8_MIN_COSINE = 0.98


@pytest.fixture(scope="module")
def small_opt(small_onnx: Path) -> Path:
    from dtop_export.optimize import optimize_onnx

    out = small_onnx.with_name("small.opt.onnx")
    r = optimize_onnx(small_onnx, out, check_sizes=(64, 96))
    assert r.rewrites["multi_head_attention"] == 6  # one per transformer block of the small preset
    assert r.rewrites["dpe_resize_as_matmul"] == 1
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-5
    return out


def test_bench_cli_writes_json_plot_markdown(small_ckpt: Path, small_onnx: Path, tmp_path: Path, capsys) -> None:
    js, png, md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    code = cli(
        "bench",
        str(small_ckpt),
        f"{small_ckpt}:bf16",
        str(small_onnx),
        *("--sizes", "64,96", "--batch", "1,2", "--runs", "2", "--warmup", "0", "--threads", "1"),
        *("--json", str(js), "--plot", str(png), "--markdown", str(md)),
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| engine | size | batch | p50 ms |" in out and "accuracy audit" not in out
    data = json.loads(js.read_text())
    assert data["format"] == "dtop-export/bench"
    assert data["reference"].startswith("pytorch fp32")
    assert [e["precision"] for e in data["engines"]] == ["fp32", "bf16", "fp32"]
    for e in data["engines"]:
        assert {(t["size"], t["batch"]) for t in e["timings"]} == {(64, 1), (96, 1), (64, 2), (96, 2)}
        assert e["peak_rss_mb"] >= 0 and e["first_call_s"] >= e["load_s"] > 0 and e["file_mb"] > 0
        for t in e["timings"]:
            assert len(t["times_s"]) == 2 and t["p50_s"] > 0 and t["images_per_s"] > 0
            assert t["speedup"] > 0 and t["gflops_per_s"] > 0
            assert t["cosine_min"] > 0.999  # the same model in three engines
    ref = data["engines"][0]
    assert all(t["speedup"] == pytest.approx(1.0) for t in ref["timings"])
    # % of the matmul ceiling measured in the same run, per device and precision (the GFLOP/s column read against it)
    assert set(data["matmul_peaks"]) == {"cpu fp32", "cpu bf16"} and min(data["matmul_peaks"].values()) > 1
    for e in data["engines"]:
        peak = data["matmul_peaks"][f"cpu {e['precision']}"]
        assert all(t["peak_pct"] == pytest.approx(100 * t["gflops_per_s"] / peak) for t in e["timings"])
    assert "| % of peak |" in out and "Matmul ceilings measured in this run" in out
    assert set(data["gflops_per_image"]) == {"64", "96"}
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert md.read_text().startswith(out.strip().splitlines()[0][:20])


def test_bench_says_cpu_fp16_is_an_audit(small_ckpt: Path, capsys) -> None:
    """PyTorch fp16 on the CPU computes float32 on float16 values (``fp16_cpu_products``): its timing is
    labelled as an accuracy audit, not a deployment path."""
    code = cli("bench", str(small_ckpt), f"{small_ckpt}:fp16", *("--sizes", "64", "--runs", "1", "--warmup", "0"),
               "--no-flops", "--no-progress")  # fmt: skip
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pytorch fp16 · small.pt is an accuracy audit on the CPU" in out


def test_bench_rejects_bad_input(small_ckpt: Path, tmp_path: Path, capsys) -> None:
    for argv, needle in [
        (["bench", str(tmp_path / "missing.pt")], "not found"),
        (["bench", str(small_ckpt), "--sizes", "a,b"], "--sizes"),
        (["bench", f"{small_ckpt}:turbo"], "engine option"),
        (["bench", str(small_ckpt), "--sizes", "72"], "multiple of the model stride"),
    ]:
        assert cli(*argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1


def test_optimized_model_matches_and_benches(small_onnx: Path, small_opt: Path) -> None:
    from dtop_export.engines import load_engine

    x = np.random.default_rng(0).standard_normal((2, 3, 128, 80), dtype=np.float32)
    a = load_engine(small_onnx).embed(x)
    b = load_engine(small_opt).embed(x)
    assert np.abs(a - b).max() < 1e-5


def test_int8_quantization_runs_at_two_sizes(small_opt: Path, small_onnx: Path, tmp_path: Path, capsys) -> None:
    import onnx

    from dtop_export.engines import load_engine
    from dtop_export.preprocess import load_image, prepare
    from dtop_export.retrieval.sample_data import skimage_data_dir

    out = tmp_path / "small.int8.onnx"
    assert cli("quantize", str(small_opt), "-o", str(out), "--calib-count", "6", "--calib-sizes", "128,192") == 0
    printed = capsys.readouterr().out
    assert "Conv/MatMul int8" in printed and "calibrated on 6 image(s) x 2 size(s) = 12 inputs" in printed
    proto = onnx.load(str(out), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization"} <= ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["dtop.precision"] == "int8" and json.loads(meta["dtop.quantization"])["per_channel"]
    check = json.loads(meta["dtop.quantization"])["check"]  # the INT8 contract, checked where the file is written
    assert check["inputs"] == 12 and 0.99 <= check["cosine_min"] < 0.99999  # really INT8, not a copy of fp32
    assert check["held_out"] is True and check["images"] == 6  # on 6 images calibration did not see, at both sizes
    line = "on 12 held-out inputs (6 images not used for calibration): cosine min"
    assert f"{line} {check['cosine_min']:.5f}" in " ".join(printed.split())
    fp32, int8 = load_engine(small_onnx), load_engine(out)
    assert int8.precision == "int8"
    # original photos, not the sample set's calibration views
    photos = [skimage_data_dir() / n for n in ("camera.png", "coins.png", "moon.png", "brick.png")]
    for size in (160, 256):  # neither is a calibration size: dynamic H/W survive quantisation
        for p in photos:
            x = prepare(load_image(p), fp32.preprocess, size)[None]
            cos = float((fp32.embed(x) * int8.embed(x)).sum())
            assert cos > INT8_MIN_COSINE, (p.name, size, cos)


def test_default_calibration_set_is_not_the_evaluation_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize / openvino --int8 / executorch --int8 / bench --recommend without --calib calibrated on the embedded
    sample set's 90 database images, the set parity, evaluate and bench --recommend grade INT8 models on (16 of 16
    calibration images evaluated, the "held-out" check drawn from it too). Now: the embedded calibration set (the
    training set's recipe, views of its own), none of whose images is in the evaluation set, built next to it in the
    user's cache ($XDG_CACHE_HOME/dtop-export/data), not in a folder every user of /tmp shares."""
    pytest.importorskip("skimage", reason="the embedded sets are made from scikit-image's photos")
    import hashlib

    from dtop_export.quantize import default_calibration_images, split_calibration
    from dtop_export.retrieval.datasets import resolve_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DTOP_EXPORT_DATA", raising=False)
    paths, source = default_calibration_images()
    data = tmp_path / "cache" / "dtop-export" / "data"
    assert len(paths) == 60 and all(p.is_file() and p.is_relative_to(data / "calib-sample") for p in paths)
    assert source == f"embedded calibration set, no image of the evaluation set ({data / 'calib-sample'})"
    ds = resolve_dataset("sample")
    assert ds.folder == data / "sample"
    evaluated = [*ds.images, *ds.queries]

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert not {p.resolve() for p in paths} & {p.resolve() for p in evaluated}
    assert not {digest(p) for p in paths} & {digest(p) for p in evaluated}  # no copy of one either
    # checked on as many images as calibration, held out of it, from the same set
    calib, held = split_calibration(paths, 16)
    assert len(calib) == len(held) == 16 and not set(calib) & set(held) and set(held) <= set(paths)
    assert len({p.parent.name for p in calib}) >= 12  # spread over the photos (one folder each)
    assert default_calibration_images()[0] == paths  # built once
    monkeypatch.setenv("DTOP_EXPORT_DATA", str(tmp_path / "data"))
    assert default_calibration_images()[0][0].is_relative_to(tmp_path / "data" / "calib-sample")


def test_a_source_too_small_to_hold_images_out_is_checked_on_its_calibration_inputs(tmp_path: Path) -> None:
    """A --calib folder with too few images beyond calibration's: the check falls back to the calibration inputs
    and the record and the printed line say so; with enough, it runs on the others, at the same sizes."""
    from PIL import Image

    from dtop_export.int8_check import describe_check
    from dtop_export.preprocess import PreprocessConfig
    from dtop_export.quantize import calibration_and_check, image_tensors, split_calibration

    paths = []
    for i in range(14):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.new("RGB", (40 + i, 30), (10 * i, 20, 30)).save(paths[-1])
    pp = PreprocessConfig(stride=16)
    calib, on = calibration_and_check(paths[:8], pp, [32, 48], 6)
    assert len(calib) == 12 and on.tensors is calib and on.record() == {"held_out": False, "images": 6}
    assert describe_check({"inputs": 12, **on.record()}).startswith("the 12 calibration inputs (too few images")
    calib, on = calibration_and_check(paths, pp, [32, 48], 6)
    picked, held = split_calibration(paths, 6)
    assert on.record() == {"held_out": True, "images": 6} and not set(picked) & set(held)
    assert all(np.array_equal(a, b) for a, b in zip(on.tensors, image_tensors(held, pp, [32, 48]), strict=True))
    assert describe_check({"inputs": 12, **on.record()}) == "12 held-out inputs (6 images not used for calibration)"


def test_calibration_and_check_pick_the_same_images_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which images of a source calibrate and which are held out to check (pinned: calibration_and_check picked the
    calibration images twice, in calibration_tensors and in split_calibration; now once). Images are not read."""
    from dtop_export import quantize
    from dtop_export.errors import DToPError
    from dtop_export.preprocess import PreprocessConfig

    monkeypatch.setattr(quantize, "image_tensors", lambda paths, pp, sizes, square=False: [
        f"{p.stem}@{s}" for p in paths for s in sizes])  # fmt: skip
    paths = [Path(f"{i:02d}.png") for i in range(14)]
    pp = PreprocessConfig(stride=16)
    calib, on = quantize.calibration_and_check(paths, pp, [32, 48], 6)
    assert [x for x in calib if x.endswith("@32")] == ["00@32", "03@32", "05@32", "08@32", "10@32", "13@32"]
    assert on.tensors == [f"{i:02d}@{s}" for i in (1, 2, 6, 7, 11, 12) for s in (32, 48)] and on.held_out
    calib, on = quantize.calibration_and_check(paths[:8], pp, [32], 6)  # 2 left over: checked on calibration's
    assert calib == ["00@32", "01@32", "03@32", "04@32", "06@32", "07@32"] and on.tensors is calib
    assert not on.held_out and on.images == 6
    assert quantize.calibration_tensors(paths, pp, [32], 3) == ["00@32", "06@32", "13@32"]  # its own pick
    with pytest.raises(DToPError, match="3 calibration image"):
        quantize.calibration_and_check(paths[:3], pp, [32], 6)


def test_quantize_rejects_bad_input(small_onnx: Path, tmp_path: Path, capsys) -> None:
    img_dir = tmp_path / "empty"
    img_dir.mkdir()
    for argv, needle in [
        (["quantize", str(tmp_path / "nope.onnx")], "not found"),
        (["quantize", str(small_onnx), "-o", str(tmp_path / "q.onnx"), "--calib", str(img_dir)], "no images"),
        (["quantize", str(small_onnx), "-o", str(tmp_path / "q.onnx"), "--keep-float", "heads"], "unknown node role"),
    ]:
        assert cli(*argv) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_an_int8_model_below_the_contract_is_not_written(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`quantize` wrote its INT8 model whatever its accuracy (`executorch --int8` and `openvino --int8` refuse): an
    INT8 model below the contract's cosine on the held-out inputs (the check stubbed at 0.95: with every Conv/MatMul
    quantised, `--keep-float ""`, the small model falls to 0.87 at the default 320/512 px, a minute's work here) is
    refused in one line naming the default float roles, nothing written."""
    from dtop_export import quantize

    def below(fp32: Path, int8: Path, calib: list, on_item: object = None) -> dict:
        return {"inputs": len(calib), "cosine_min": 0.95, "cosine_mean": 0.97, "reference": "stub"}

    monkeypatch.setattr(quantize, "check_int8", below)
    out = tmp_path / "out" / "q.int8.onnx"
    out.parent.mkdir()
    argv = ["quantize", str(small_onnx), "-o", str(out), "--keep-float", "", "--calib-count", "6"]
    assert cli(*argv, "--calib-sizes", "128,192") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the INT8 model breaks the INT8 contract on its 12 held-out inputs" in err, err
    assert "cosine min 0.95000 < 0.99 to the fp32 model, so nothing was written" in err
    assert "--keep-float first_conv,stem,attention,dpe" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_a_plan_is_opened_without_cpu_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench passed threads= to every engine; a TensorRT plan takes none (a TypeError, then the option check's
    "tensorrt takes no option 'threads'", an option the user never gave)."""
    import dtop_export.engines as engines
    from dtop_export.bench.harness import run_bench
    from dtop_export.bench.spec import EngineSpec

    seen: list[tuple[str, dict]] = []

    class Opened(Exception):
        pass

    def fake_load(path: Path, **options: object) -> None:
        seen.append((Path(path).suffix, options))
        engines.check_engine_options(path, options)  # what load_engine checks first
        raise Opened

    monkeypatch.setattr(engines, "load_engine", fake_load)
    plan, onnx_file = tmp_path / "m.plan", tmp_path / "m.onnx"
    plan.write_bytes(b"plan")
    onnx_file.write_bytes(b"onnx")
    for path in (plan, onnx_file):
        with pytest.raises(Opened):
            run_bench([EngineSpec(path=path, options={}, label=None)], [64], [1], threads=1)
    assert seen == [(".plan", {}), (".onnx", {"threads": 1})]


def test_each_pytorch_engine_runs_on_its_own_threads(small_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch has one thread count per process and the PyTorch engine set it only when it opened: the harness opens
    every engine before timing, so the last PyTorch engine's count ran them all (`a.pt a.pt:threads=1` timed both on
    1 thread under a header saying "same thread count"), and the matmul ceiling was read at that count too; then
    at --threads for both (the threads=1 row's % of peak read against a two-thread ceiling)."""
    import torch

    from dtop_export.bench import peak
    from dtop_export.bench.harness import run_bench
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.engines.pytorch import TorchEngine

    seen: dict[int, set[int]] = {}
    descriptors = TorchEngine._descriptors

    def recording(self: TorchEngine, x: object) -> object:
        seen.setdefault(id(self), set()).add(torch.get_num_threads())
        return descriptors(self, x)

    peaks: list[int] = []

    def fake_peak(device: str, precision: str, threads: int | None = None, **_: object) -> float:
        peaks.append(threads or torch.get_num_threads())
        return 100.0

    monkeypatch.setattr(TorchEngine, "_descriptors", recording)
    monkeypatch.setattr(peak, "matmul_peak", fake_peak)
    before = torch.get_num_threads()
    try:
        specs = [EngineSpec(small_ckpt, label="two"), EngineSpec(small_ckpt, {"threads": 1}, label="one")]
        report = run_bench(specs, [64], [1], runs=2, warmup=1, threads=2)
    finally:
        torch.set_num_threads(before)
    assert [r.label for r in report.engines] == ["two", "one"]
    assert list(seen.values()) == [{2}, {1}]  # in load order: "two" on 2 threads in every pass, "one" on 1
    # a ceiling per thread count: "one"'s % of peak was read against the ceiling at --threads (2)
    assert peaks == [2, 1] and set(report.matmul_peaks) == {"cpu fp32", "cpu fp32 threads=1"}
    assert all(t.peak_pct == pytest.approx(t.gflops_per_s) for r in report.engines for t in r.timings)  # 100 GFLOP/s


def test_a_tf32_plan_is_read_against_the_tf32_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT plan builds with TF32 allowed (TensorRT's default; `trt --no-tf32` turns it off) and its runner
    said fp32: its GFLOP/s was read against the strict fp32 GEMM ceiling (TF32 off), several times lower than what its
    matmuls ran at. Its sidecar's tf32 record now picks a TF32 ceiling, measured with TF32 on, under a key of its own.
    (No GPU here: the GEMMs themselves are not run.)"""
    import torch

    from dtop_export.bench import peak
    from dtop_export.bench.harness import ceiling_key

    class Plan:
        name, precision, device = "tensorrt", "fp32", "cuda:0"

        def __init__(self, tf32: bool | None) -> None:
            self.tf32 = tf32

        def describe(self) -> dict[str, object]:
            return {"name": self.name, "precision": self.precision, "device": self.device, "tf32": self.tf32}

    assert ceiling_key(Plan(True)) == "cuda:0 tf32"
    assert ceiling_key(Plan(False)) == ceiling_key(Plan(None)) == "cuda:0 fp32"
    seen: list[bool] = []
    monkeypatch.setattr(peak, "_gemm_gflops", lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32) or 1.0)
    before = torch.backends.cuda.matmul.allow_tf32
    assert peak.matmul_peak("cuda:0", "tf32") == peak.matmul_peak("cuda:0", "fp32") == 1.0
    assert seen == [True, False] and torch.backends.cuda.matmul.allow_tf32 == before


def test_gflops_only_for_the_rows_of_the_counted_model(
    small_ckpt: Path, small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLOPs are counted on the first checkpoint's model, and every row got GFLOP/s from them: `bench a.pt other.pt`
    (or another model's .onnx) reported GFLOP/s and % of peak for a model whose FLOPs nobody counted. Only the
    checkpoint and the files exported from it (their dtop.checkpoint_sha256) have them now; the others '—'."""
    from dtop_export.bench import peak
    from dtop_export.bench.harness import run_bench
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.checkpoint import random_checkpoint

    monkeypatch.setattr(peak, "matmul_peak", lambda *a, **k: 100.0)
    other = random_checkpoint("small", tmp_path / "other.pt", seed=1)
    specs = [EngineSpec(small_ckpt), EngineSpec(other, label="other"), EngineSpec(small_onnx)]
    report = run_bench(specs, [64], [1], runs=1, warmup=0, threads=1)
    rates = {r.label: r.timings[0].gflops_per_s for r in report.engines}
    assert [rates[r.label] is None for r in report.engines] == [False, True, False], rates
    assert report.engines[1].timings[0].peak_pct is None and report.flops_model == "small.pt"
    text = report.to_markdown()
    assert "Forward GFLOP per image of small.pt" in text and "No GFLOP/s for other: another model" in text


def test_grading_an_int8_model_on_its_calibration_images_is_noted(
    small_ckpt: Path, small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A model calibrated on images of the set that grades it (`quantize --calib` on the evaluation set's images;
    before, every default INT8 model) is graded optimistically, and parity/evaluate said nothing: now they print one
    line naming how many of its images calibrated it. The record lists them (name and size): `files`."""
    pytest.importorskip("skimage", reason="the embedded sets are made from scikit-image's photos")
    from types import SimpleNamespace

    from dtop_export.contract import read_metadata
    from dtop_export.retrieval.datasets import resolve_dataset

    ds = resolve_dataset("sample")
    q = tmp_path / "q.onnx"
    assert cli("quantize", str(small_onnx), "-o", str(q), "--calib", str(ds.folder / "jpg"), "--calib-count", "8",
               "--calib-sizes", "128", "--no-progress") == 0  # fmt: skip
    files = json.loads(read_metadata(q)["dtop.quantization"])["files"]
    assert len(files) == 8 and all(name.endswith(".jpg") and size > 0 for name, size in files)
    capsys.readouterr()
    note = "note: q.onnx was calibrated on 8 image(s) of this set: its {} is optimistic (calibrate on other images"
    assert cli("evaluate", str(q), "--image-size", "64", "--no-progress") == 0
    assert note.format("mAP") in capsys.readouterr().out
    import dtop_export.parity

    report = SimpleNamespace(table=lambda: "", n_queries=0, n_images=0, image_size=64, seconds=0.0, passed=True)
    monkeypatch.setattr(dtop_export.parity, "parity", lambda *a, **k: report)  # its run is parity's own tests'
    assert cli("parity", str(small_ckpt), str(q), "--no-progress") == 0
    assert note.format("ΔmAP") in capsys.readouterr().out
    # the default calibration set: nothing to say
    d = tmp_path / "d.onnx"
    assert cli("quantize", str(small_onnx), "-o", str(d), "--calib-count", "8", "--calib-sizes", "128",
               "--no-progress") == 0  # fmt: skip
    capsys.readouterr()
    assert cli("evaluate", str(d), "--image-size", "64", "--no-progress") == 0
    assert "note:" not in capsys.readouterr().out


def test_a_model_recorded_before_its_calibration_files_is_noted_by_its_source_folder(tmp_path: Path) -> None:
    """An INT8 model written before `files` was recorded (the default then: the sample set's database images) is
    told by the folder its `source` names; dynamic INT8 (ExecuTorch) calibrates nothing, and says nothing."""
    from types import SimpleNamespace

    from dtop_export.int8_check import calibration_overlap_note

    folder = tmp_path / "sample"
    (folder / "jpg").mkdir(parents=True)
    images = [folder / "jpg" / f"{i}.jpg" for i in range(3)]
    for p in images:
        p.write_bytes(b"x")
    old = {"method": "minmax", "source": f"embedded sample set, database images ({folder})"}

    def engine(record: dict) -> SimpleNamespace:
        return SimpleNamespace(metadata={"dtop.quantization": json.dumps(record)}, source=Path("old.onnx"), label="")

    note = calibration_overlap_note(engine(old), images, "ΔmAP")
    assert note == (f"note: old.onnx was calibrated on images from {folder.resolve()}, which holds 3 image(s) of "
                    "this set: its ΔmAP is optimistic (calibrate on other images: --calib DIR)")  # fmt: skip
    assert calibration_overlap_note(engine({**old, "source": str(folder / "jpg")}), images, "mAP") is not None
    assert calibration_overlap_note(engine({**old, "source": str(tmp_path / "else")}), images, "mAP") is None
    assert calibration_overlap_note(engine({**old, "recipe": "dynamic"}), images, "mAP") is None
    assert calibration_overlap_note(engine({**old, "files": [["9.jpg", 1]]}), images, "mAP") is None
    assert calibration_overlap_note(engine({**old, "files": [["1.jpg", 1]]}), images, "mAP").startswith(
        "note: old.onnx was calibrated on 1 image(s) of this set"
    )
    assert calibration_overlap_note(SimpleNamespace(metadata={}, source=None, label="x"), images, "mAP") is None


def test_histogram_calibration_says_what_it_ran_and_keeps_stdout(
    small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantize --method percentile --calib-count 8 --calib-sizes 128,256` printed "4 image(s) x 2 size(s)" while 8
    images ran at 256 only (the histogram methods take one size): several sizes are now refused with them, one size
    is printed as run. ONNX Runtime's calibrators printed 3-5 lines of their own on stdout: logged instead."""
    out = tmp_path / "p.onnx"
    args = ["quantize", str(small_onnx), "-o", str(out), "--method", "percentile", "--calib-count", "6"]
    assert cli(*args, "--calib-sizes", "128,192") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method percentile calibrates at one size") and err.count("\n") == 1
    assert not out.exists()
    assert cli(*args, "--calib-sizes", "128", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "calibrated on 6 image(s) x 1 size(s) = 6 inputs (128x128)" in " ".join(printed.split())
    assert [line.split()[0] for line in printed.splitlines()] == ["wrote", "INT8"], printed  # our two lines only


def test_quantize_and_optimize_write_onnx_names_only(small_onnx: Path, tmp_path: Path, capsys) -> None:
    """`quantize s.onnx -o q.xml` wrote an ONNX file named q.xml (optimize too): -o must end in .onnx, as `onnx`'s,
    refused while the command line is read."""
    for command in ("quantize", "optimize"):
        assert cli(command, str(small_onnx), "-o", str(tmp_path / "q.xml")) == 2
        assert f"--output {tmp_path / 'q.xml'} should end in .onnx" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_calibration_image_names_calib(small_onnx: Path, tmp_path: Path, capsys) -> None:
    """One file that is not an image in `--calib DIR` stopped calibration with Pillow's complaint about that file,
    not saying it came from --calib: now the line says to remove it from the --calib images."""
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        Image.new("RGB", (40 + i, 30), (10 * i, 20, 30)).save(calib / f"{i}.png")
    (calib / "9.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "q.onnx"
    assert cli("quantize", str(small_onnx), "-o", str(out), "--calib", str(calib), "--calib-count", "9") == 2
    err = capsys.readouterr().err
    assert "9.jpg" in err and "remove it from the --calib images" in err and err.count("\n") == 1
    assert not out.exists()
