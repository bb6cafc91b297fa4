"""The OpenVINO engine (an .onnx or an IR on the CPU) and `dtop-export openvino` (IR, NNCF INT8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import cli

from dtop_export.bench.spec import parse_spec
from dtop_export.contract import preprocess_from_metadata, read_metadata
from dtop_export.engines import load_engine
from dtop_export.engines.openvino import OpenVinoEngine, model_metadata, read_model
from dtop_export.engines.pytorch import TorchEngine
from dtop_export.errors import DToPError
from dtop_export.parity import parity
from dtop_export.retrieval.datasets import RevisitopDataset, load_revisitop
from dtop_export.retrieval.sample_data import build_sample_dataset


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> RevisitopDataset:
    root = tmp_path_factory.mktemp("ov-data")
    build_sample_dataset(root)
    return load_revisitop(root, "sample")


@pytest.fixture(scope="module")
def ir(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ov-ir") / "small.xml"
    assert cli("openvino", str(small_onnx), "-o", str(out)) == 0
    return out


def test_info_describes_an_ir(ir: Path, small_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`info model.xml`: the IR's own I/O and the contract it carries, the same as its ONNX's but for what the
    conversion records."""
    assert cli("info", str(small_onnx), "--json") == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert cli("info", str(ir), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    dim = from_onnx["metadata"]["descriptor_dim"]
    assert report["inputs"] == {"images": "f32 [?,3,?,?]"} and report["outputs"] == {"descriptors": f"f32 [?,{dim}]"}
    assert report["config"] == from_onnx["config"] and report["provenance"] == from_onnx["provenance"]
    assert report["metadata"]["precision"] == "fp32" and report["metadata"]["derived_from"] == small_onnx.name
    assert report["metadata"]["descriptor_dim"] == dim
    assert report["operations"] > 100 and report["size_mb"] > 0


def _x(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


def test_fp32_meets_the_onnx_runtime_contract(
    small_ckpt: Path, small_onnx: Path, ir: Path, sample: RevisitopDataset
) -> None:
    """cos >= 0.99999, max-abs <= 1e-4, ΔmAP 0.00 on the embedded set, for the .onnx and the IR."""
    engines = [load_engine(small_onnx, runtime="openvino", threads=2), load_engine(ir)]
    assert [type(e) for e in engines] == [OpenVinoEngine, OpenVinoEngine] and engines[1].precision == "fp32"
    report = parity(TorchEngine.from_checkpoint(small_ckpt), engines, sample, progress=False)
    assert report.passed, report.failures()
    for e in report.engines:
        assert e.cosine_min >= 0.99999 and e.max_abs <= 1e-4
        assert all(abs(d) < 1e-9 for d in e.map_delta.values())


def test_ir_keeps_metadata_and_dynamic_axes(small_onnx: Path, ir: Path) -> None:
    onnx_meta = read_metadata(small_onnx)
    ir_meta = model_metadata(read_model(ir))
    changed = {
        "dtop.precision",
        "dtop.derived_from",
        "dtop.ir_build_seconds",
        "dtop.fp32_islands",
        "dtop.weights_sha256",
    }
    assert {k: v for k, v in ir_meta.items() if k not in changed} == {
        k: v for k, v in onnx_meta.items() if k not in changed
    }
    assert ir_meta["dtop.precision"] == "fp32" and ir_meta["dtop.derived_from"] == small_onnx.name
    shape = read_model(ir).inputs[0].get_partial_shape()
    assert shape.rank.get_length() == 4 and [shape[i].is_dynamic for i in range(4)] == [True, False, True, True]
    ov, ort = load_engine(ir), load_engine(small_onnx)
    for b, h, w in ((1, 64, 96), (3, 128, 80)):
        a, r = ov.embed(_x(b, h, w)), ort.embed(_x(b, h, w))
        assert a.shape == (b, ort.descriptor_dim) and float((a * r).sum(1).min()) >= 0.99999
    assert ov.embed(np.zeros((0, 3, 64, 64), np.float32)).shape == (0, ov.descriptor_dim)


def test_ir_metadata_is_read_from_the_xml_without_openvino(
    ir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus job's contract and an IR's provenance come from the ``.xml`` (the contract compiled the IR, 0.8 s for
    the full model; the provenance read it, 0.3 s): the same entries as OpenVINO's reading, OpenVINO not imported;
    an IR that keeps none there is read by OpenVINO, a damaged one is one line."""
    import re
    import subprocess
    import sys

    import dtop_export.engines.openvino as ov_engine

    meta = model_metadata(read_model(ir))
    assert ov_engine.ir_metadata(ir) == meta and "dtop.descriptor_dim" in meta
    code = (
        "import sys; from dtop_export.corpus.runtime import model_contract; from dtop_export.identity import "
        f"checkpoint_of; c = model_contract({str(ir)!r}); print(c.descriptor_dim, c.preprocess.size, "
        f"checkpoint_of({str(ir)!r}), 'openvino' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    engine = load_engine(ir)
    want = [engine.descriptor_dim, engine.preprocess.size, meta["dtop.checkpoint_sha256"], False]
    assert out == [str(v) for v in want]
    bare = tmp_path / "bare.xml"  # written by another tool: no dtop entries in the <net>'s rt_info
    bare.write_text(re.sub(r"<dtop\.[^>]*/>", "", ir.read_text()))
    bare.with_suffix(".bin").write_bytes(ir.with_suffix(".bin").read_bytes())
    read = []
    monkeypatch.setattr(ov_engine, "read_model", lambda path: read.append(path) or read_model(path))
    assert ov_engine.ir_metadata(bare) == {} and read == [bare]
    with pytest.raises(DToPError, match=r"^model file .*missing.xml not found$"):  # no OpenVINO call was involved
        ov_engine.ir_metadata(tmp_path / "missing.xml")
    broken = tmp_path / "broken.xml"
    broken.write_text(ir.read_text()[:500])
    with pytest.raises(DToPError, match=r"^OpenVINO cannot read .*broken.xml: .*line \d+"):
        ov_engine.ir_metadata(broken)


def test_an_ir_refuses_a_bin_it_was_not_written_with(ir: Path, tmp_path: Path) -> None:
    """OpenVINO reads an IR's weights by offset: a .bin left from another export of the same architecture (a
    retrained checkpoint, only the new .xml copied over) ran with the old weights under the new metadata. The .xml
    names its .bin by sha256; every reader (engine, info, embed) refuses another .bin in one line."""
    import shutil

    xml = tmp_path / "deploy.xml"
    shutil.copy(ir, xml)
    shutil.copy(ir.with_suffix(".bin"), xml.with_suffix(".bin"))
    assert load_engine(xml).precision == "fp32"  # the pair as written
    stale = bytearray(ir.with_suffix(".bin").read_bytes())
    stale[len(stale) // 2 : len(stale) // 2 + 64] = bytes(64)  # other weights, same size and layout
    xml.with_suffix(".bin").write_bytes(bytes(stale))
    with pytest.raises(DToPError, match=r"deploy.bin is not the .bin deploy.xml was written with.*together"):
        load_engine(xml)
    assert cli("info", str(xml)) == 2
    xml.with_suffix(".bin").unlink()
    with pytest.raises(DToPError, match=r"weights deploy.bin not found: copy the .xml and its .bin together"):
        read_model(xml)


def _quantized_inputs(op: Any) -> bool:
    """Whether an input of ``op`` is INT8: a FakeQuantize (NNCF) or an 8-bit constant or cast (a converted QDQ
    file), reached through the dequantisation chain (Convert, Subtract, Multiply, Reshape, Transpose)."""
    chain = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}
    todo = [(v.get_source_output().get_node(), 0) for v in op.inputs()]
    while todo:
        node, depth = todo.pop()
        kind = node.get_type_name()
        if kind == "FakeQuantize" or node.get_output_element_type(0).get_type_name() in ("i8", "u8"):
            return True
        if kind in chain and depth < 6:
            todo += [(v.get_source_output().get_node(), depth + 1) for v in node.inputs()]
    return False


@pytest.mark.parametrize("recipe", ["qdq", "nncf"])
def test_int8_ir_meets_its_contract(
    small_ckpt: Path,
    small_onnx: Path,
    sample: RevisitopDataset,
    tmp_path: Path,
    recipe: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both recipes: an INT8 IR (really quantised, the float roles left float) within the INT8 cosine contract.
    The whole contract (|ΔmAP| <= 1.0 too) is what `--recipe qdq` promises; `nncf` is documented as the faster
    recipe with the larger ΔmAP, and on an AMX Xeon its 3.3e-3 similarity error flips 31 near-tie pairs of the
    20-query set (Hard mAP +2.4), and since it is no longer calibrated on the images parity grades it on, its cosine
    there fell to 0.988 (an Intel Xeon with AMX here), so for it the parity verdict is only required to be reported and
    explained.
    Since the maker checks on images held out of calibration, `openvino --int8 --recipe nncf` refuses this model's
    IR on the Intel Xeon with AMX here (cos min 0.98982 at 512 px): nncf is made by the library, checked on its
    calibration inputs (held_out false), to test what NNCF quantised."""
    from dtop_export.openvino_ir import ignored_names, write_ir
    from dtop_export.quantize import DEFAULT_FLOAT_ROLES, calibration_tensors, default_calibration_images

    out = tmp_path / "small.int8.xml"
    if recipe == "qdq":
        assert cli("openvino", str(small_onnx), "--int8", "--calib-count", "16", "-o", str(out)) == 0
    else:
        paths, source = default_calibration_images()
        calib = calibration_tensors(paths, preprocess_from_metadata(read_metadata(small_onnx)), [320, 512], 16)
        write_ir(small_onnx, out, int8=True, recipe="nncf", calib=calib, calibration_source=source)
        assert capsys.readouterr().out == ""  # NNCF's progress bars kept off stdout (they were drawn there)
    model = read_model(out)
    meta = model_metadata(model)
    assert meta["dtop.precision"] == "int8" and json.loads(meta["dtop.quantization"])["recipe"].startswith(recipe)
    assert meta["dtop.descriptor_dim"] == read_metadata(small_onnx)["dtop.descriptor_dim"]
    check = json.loads(meta["dtop.quantization"])["check"]  # checked where it is written
    assert check["inputs"] == 32 and 0.99 <= check["cosine_min"] < 0.99999
    assert check["held_out"] is (recipe == "qdq")  # the command's check: not on the calibration images themselves
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    float_ops = ignored_names(small_onnx, DEFAULT_FLOAT_ROLES, read_model(small_onnx))
    assert float_ops and not [n for n in float_ops if n in ops and _quantized_inputs(ops[n])]
    products = [op for op in ops.values() if op.get_type_name() in ("MatMul", "Convolution")]
    assert sum(map(_quantized_inputs, products)) >= 10
    engine = load_engine(out)
    assert engine.precision == "int8"
    report = parity(TorchEngine.from_checkpoint(small_ckpt), [engine], sample, progress=False)
    result = report.engines[0]
    assert 0.98 <= result.cosine_min < 0.99999  # really INT8 (not a copy of the fp32 model), near the contract
    if recipe == "qdq":
        assert report.passed, report.failures()  # cos >= 0.99, |ΔmAP| <= 1.0
    elif not report.passed:  # graded on images it was not calibrated on, nncf's cosine may fall under 0.99 too
        for c in (c for c in result.checks if not c.passed):  # and every ΔmAP it fails comes from flipped pairs
            assert c.metric == "cosine_min" or "positive/negative pairs flipped" in c.why, c.describe()


def test_an_int8_ir_below_the_contract_is_not_written(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The INT8 contract is asserted where the IR is produced: an INT8 model whose cosine to the fp32 one on the
    calibration inputs is below 0.99 (the check stubbed: the small model's INT8 stays above it) is refused in one
    line naming what to try, and nothing is written."""
    import dtop_export.openvino_ir as openvino_ir

    seen: list[int] = []

    def below(fp32: Any, int8: Any, calib: list[np.ndarray]) -> dict[str, Any]:
        seen.append(len(calib))
        return {"inputs": len(calib), "cosine_min": 0.95, "cosine_mean": 0.97}

    monkeypatch.setattr(openvino_ir, "check_int8", below, raising=False)
    calib = [_x(1, 64, 64, seed=i) for i in range(2)]
    with pytest.raises(DToPError, match=r"breaks the INT8 contract on its 2 calibration inputs \(mine\): cosine min "):
        openvino_ir.write_ir(small_onnx, tmp_path / "bad.int8.xml", int8=True, calib=calib, calibration_source="mine")
    assert seen == [2] and sorted(p.name for p in tmp_path.iterdir()) == []


def test_runtime_options_and_errors(small_onnx: Path, small_ckpt: Path, ir: Path, tmp_path: Path) -> None:
    spec = parse_spec(f"{small_onnx}:openvino,threads=1,label=ov")
    assert spec.options == {"runtime": "openvino", "threads": 1} and spec.label == "ov"
    with pytest.raises(DToPError, match="cannot run in openvino|OpenVINO runs an .onnx"):
        load_engine(small_ckpt, runtime="openvino")
    with pytest.raises(DToPError, match="unknown runtime"):
        load_engine(small_onnx, runtime="ncnn")
    with pytest.raises(DToPError, match=r"is not an INT8 model \(fp32\): make one"):
        OpenVinoEngine(ir, precision="int8")
    with pytest.raises(DToPError, match="unknown OpenVINO precision"):
        OpenVinoEngine(ir, precision="fp8")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"garbage")
    with pytest.raises(DToPError, match="OpenVINO cannot read"):
        OpenVinoEngine(junk)


def test_an_ir_recording_an_unknown_hint_is_refused_unless_a_precision_is_given(ir: Path, tmp_path: Path) -> None:
    """An IR whose dtop.inference_precision is none of OpenVINO's hints (an edited file): the C++ client refuses it
    in one line unless given --precision, the Python engine ran it at fp32 without a word (and its sidecars said so).
    It refuses too, unless given a precision."""
    from dtop_export.openvino_ir import _save_atomic, _set_metadata

    model = read_model(ir)
    _set_metadata(model, {"dtop.inference_precision": "f8"})
    odd = tmp_path / "odd.xml"
    _save_atomic(model, odd)
    with pytest.raises(DToPError, match=r"records dtop.inference_precision 'f8'.*odd.xml:fp32"):
        OpenVinoEngine(odd)
    assert OpenVinoEngine(odd, precision="fp32").precision == "fp32"


def test_a_hint_the_cpu_lacks_is_reported_as_what_runs(
    ir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenVINO's CPU plugin ignores an inference precision hint the CPU cannot do (bf16 without AVX512-BF16/AMX,
    f16 without AVX512-FP16) and runs f32: the engine said bf16 all the same, and so did the sidecars and bench rows
    that read it. It reports what the compiled model runs, with a warning."""
    import logging

    from dtop_export.engines import openvino as ov_engine

    real = ov_engine.core()
    if "BF16" in real.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert OpenVinoEngine(ir, precision="bf16").precision == "bf16"  # this CPU has it: the hint holds

    class CpuWithoutBf16:  # compiles as the CPU plugin does on such a CPU: the hint dropped, f32
        def compile_model(self, model: Any, device: str, config: dict[Any, Any]) -> Any:
            return real.compile_model(model, device, {"INFERENCE_PRECISION_HINT": "f32"})

    monkeypatch.setattr(ov_engine, "core", CpuWithoutBf16)
    with caplog.at_level(logging.WARNING, logger="dtop_export.engines.openvino"):
        engine = OpenVinoEngine(ir, precision="bf16")
    assert engine.precision == "fp32" and engine.describe()["precision"] == "fp32"
    assert "has no bf16 inference" in caplog.text and "runs fp32" in caplog.text


def test_a_corpus_job_names_the_precision_an_ir_runs_at(ir: Path, tmp_path: Path) -> None:
    """An IR recording a hint runs at it unless told (since it did, it ran fp32): a corpus job's engine key said
    neither, so a job begun when such an IR ran fp32 would have been continued at bf16, shards of both mixed under one
    manifest. The job's options now name the precision the IR runs at; one asked for wins; an IR without one is
    unchanged."""
    from dtop_export.corpus.runtime import engine_options
    from dtop_export.openvino_ir import _save_atomic, _set_metadata

    model = read_model(ir)
    _set_metadata(model, {"dtop.inference_precision": "bf16"})
    hinted = tmp_path / "hinted.xml"
    _save_atomic(model, hinted)
    assert engine_options(str(hinted))[1] == {"precision": "bf16"}
    assert engine_options(str(hinted), precision="fp32")[1] == {"precision": "fp32"}
    assert engine_options(f"{hinted}:precision=fp16")[1] == {"precision": "fp16"}
    assert "precision" not in engine_options(str(ir))[1]


def test_cli_refuses_bad_input(small_onnx: Path, ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("openvino", str(small_onnx), "-o", str(ir)) == 2  # exists: needs --force
    assert "pass --force" in capsys.readouterr().err
    assert cli("openvino", str(small_onnx), "-o", str(tmp_path / "m.onnx")) == 2
    assert "should end in .xml" in capsys.readouterr().err
    assert cli("openvino", str(tmp_path / "missing.onnx")) == 2
    assert cli("openvino", str(small_onnx), "--int8", "--recipe", "pot", "-o", str(tmp_path / "x.xml")) == 2
    assert "unknown --recipe 'pot'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_the_nncf_recipe_without_nncf_names_its_extra_before_any_work(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """NNCF is the [nncf] extra (only `--recipe nncf` uses it): without it, one line naming the extra, before the
    calibration images are read or anything is written; the default recipe does not ask for it."""
    import importlib.util

    import dtop_export.quantize as quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    monkeypatch.setattr(quantize, "calibration_tensors", lambda *a, **k: pytest.fail("calibration started"))
    out = tmp_path / "x.xml"
    assert cli("openvino", str(small_onnx), "--int8", "--recipe", "nncf", "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err == "error: --recipe nncf needs NNCF: pip install 'dtop-export[nncf]' (or use the default recipe, qdq)\n"
    assert cli("openvino", str(small_onnx), "-o", str(out)) == 0  # no --int8: NNCF not asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.xml"]
    # an option the command refuses anyway is said first (installing NNCF would only lead to "drop --int8")
    assert cli("openvino", str(small_onnx), "--precision", "auto", "--int8", "--recipe", "nncf") == 2
    assert "drop --int8" in capsys.readouterr().err
    # the library's write_ir: one line too, not a ModuleNotFoundError from its own `import nncf`
    import sys

    from dtop_export.openvino_ir import write_ir

    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` fails, as where NNCF is not installed
    calib = [np.zeros((1, 3, 64, 64), np.float32)]
    with pytest.raises(DToPError, match=r"--recipe nncf needs NNCF: pip install 'dtop-export\[nncf\]'"):
        write_ir(small_onnx, tmp_path / "y.xml", int8=True, recipe="nncf", calib=calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.xml"]


def test_embed_runs_an_onnx_in_openvino(small_onnx: Path, tmp_path: Path) -> None:
    import skimage

    photos = [str(Path(skimage.data.__file__).parent / n) for n in ("astronaut.png", "coffee.png")]
    args = ["-o", str(tmp_path / "ov.npy"), "--image-size", "256", "--no-progress", "--threads", "1"]
    assert cli("embed", f"{small_onnx}:openvino", *photos, *args) == 0
    assert cli("embed", str(small_onnx), *photos, "-o", str(tmp_path / "ort.npy"), *args[2:]) == 0
    side = json.loads((tmp_path / "ov.json").read_text())
    assert side["engine"]["name"] == "openvino" and side["engine"]["threads"] == 1
    ov, ort = np.load(tmp_path / "ov.npy"), np.load(tmp_path / "ort.npy")
    assert ov.shape == ort.shape == (2, side["descriptor_dim"]) and float((ov * ort).sum(1).min()) >= 0.99999


def test_fixed_batch_and_static_exports(small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --batch 2 --static export: any batch runs in padded chunks of 2 (as ONNX Runtime does), another
    height/width is refused with the shape it was exported for; `openvino --int8` and `quantize` refuse it in one line
    (ONNX Runtime's calibration failed with a traceback)."""
    from dtop_export.errors import ShapeError
    from dtop_export.export import export_onnx

    path = tmp_path / "fixed.onnx"
    export_onnx(small_ckpt, path, static_hw=(64, 96), batch=2)
    ov, ort = load_engine(path, runtime="openvino"), load_engine(path)
    assert ov.fixed_batch == 2 and ov.static_hw == (64, 96)
    x = _x(3, 64, 96, seed=3)
    a, r = ov.embed(x), ort.embed(x)
    assert a.shape == (3, ov.descriptor_dim) and float((a * r).sum(1).min()) >= 0.99999
    with pytest.raises(ShapeError, match="exported for 64x96 inputs only, got 96x96"):
        ov.embed(_x(1, 96, 96))
    # INT8 calibrates one image at a time at several sizes: such an export is refused in one line, before any work
    for command, out in (("openvino", "fixed.int8.xml"), ("quantize", "fixed.int8.onnx")):
        assert cli(command, str(path), *(["--int8"] if command == "openvino" else []), "-o", str(tmp_path / out)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("fixed.onnx is a --static 64x96 --batch 2 export: " in e for e in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


def _native_fp16() -> bool:
    import openvino as ov

    return "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _runtime_precisions(engine: OpenVinoEngine) -> dict[str, set[str]]:
    """originalLayersNames -> the precisions its runtime operations run in, from the compiled model."""
    out: dict[str, set[str]] = {}
    for op in engine.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Const", "Input", "Output", "Reorder"):
            continue
        for name in info["originalLayersNames"].astype(str).split(","):
            out.setdefault(name, set()).add(info["runtimePrecision"].astype(str))
    return out


def test_mark_fp32_islands_matches_nodes_their_pieces_and_output_tensors(tmp_path: Path) -> None:
    from dtop_export.engines.openvino import KEEP_FP32, mark_fp32_islands

    layers = [  # (name, type, output tensor names)
        ("node_div", "Divide", ""), ("node_linear/WithoutBiases", "MatMul", ""), ("node_linear", "Add", "lin"),
        ("node_linear_2", "Add", ""), ("/blocks.0/Softmax", "Softmax", ""), ("/blocks.0/Softmax/sub", "Exp", ""),
        ("/blocks.0", "Add", ""), ("descriptors", "Divide", "descriptors"), ("node_div", "Const", ""),
    ]  # fmt: skip
    body = "".join(
        f'<layer id="{i}" name="{n}" type="{t}" version="opset1"><output><port id="0" names="{o}"/></output></layer>'
        for i, (n, t, o) in enumerate(layers)
    )
    xml = tmp_path / "m.xml"
    xml.write_text(f'<?xml version="1.0"?><net name="m" version="11"><layers>{body}</layers></net>')
    assert mark_fp32_islands(xml, {"node_div", "node_linear", "/blocks.0/Softmax"}, {"descriptors"}) == 6
    import xml.etree.ElementTree as ET

    marked = [
        layer.get("name")
        for layer in ET.parse(xml).getroot().iter("layer")
        if any(a.attrib == KEEP_FP32 for a in layer.iterfind("rt_info/attribute"))
    ]
    assert marked == [
        "node_div", "node_linear/WithoutBiases", "node_linear", "/blocks.0/Softmax", "/blocks.0/Softmax/sub",
        "descriptors",
    ]  # fmt: skip
    assert mark_fp32_islands(xml, {"node_div"}, set()) == 1  # marking again adds no second attribute
    assert sum(1 for _ in ET.parse(xml).getroot().iter("attribute")) == 6


def test_fp32_islands_are_marked_in_the_ir_and_the_onnx_path(tmp_path: Path) -> None:
    """The nodes the FP16 ONNX of a TensorRT build keeps FP32 (whitening, L2 norms, LayerNorm, Softmax) carry
    OpenVINO's keep-precision mark in an IR from `dtop-export openvino`, and in an .onnx loaded with fp16."""
    import onnx
    import openvino as ov
    from trt_helpers import dtop_onnx

    from dtop_export.engines.openvino import KEEP_FP32_KEY, count_fp32_islands
    from dtop_export.fp16.convert import plan_fp32_islands

    src = dtop_onnx()  # with a whitening
    graph = onnx.load(str(src))
    islands = plan_fp32_islands(graph).islands
    assert {"whitening", "L2 normalisation", "op Softmax"} <= set(islands.values())
    out = tmp_path / "m.xml"
    assert cli("openvino", str(src), "-o", str(out)) == 0
    model = read_model(out)
    marked = {op.get_friendly_name() for op in model.get_ops() if KEEP_FP32_KEY in op.get_rt_info()}
    assert len(marked) == count_fp32_islands(model) == int(model_metadata(model)["dtop.fp32_islands"])
    # marked: island nodes (by name; OpenVINO's pieces of one are "node/part") and the graph output, which
    # OpenVINO names after its tensor; every island OpenVINO kept as a layer is marked
    outputs = {o.name for o in graph.graph.output}
    assert {m.split("/")[0] for m in marked} <= set(islands) | outputs
    present = {op.get_friendly_name().split("/")[0] for op in model.get_ops()}
    producers = {n.name for n in graph.graph.node if set(n.output) & outputs}
    assert set(islands) - {m.split("/")[0] for m in marked} <= (set(islands) - present) | producers
    assert [n for n, why in islands.items() if why == "whitening"][0] in {m.split("/")[0] for m in marked}
    assert count_fp32_islands(ov.Core().read_model(str(src))) == 0  # a plain read of the ONNX has none
    engine = OpenVinoEngine(src, precision="fp16", threads=1)
    assert engine.fp32_islands == len(marked) and engine.describe()["fp32_islands"] == len(marked)
    assert OpenVinoEngine(src, threads=1).fp32_islands == 0  # fp32: nothing to keep


@pytest.mark.skipif(not _native_fp16(), reason="this CPU has no native FP16 (AVX512-FP16 / AMX-FP16): OpenVINO "
                    "runs an f16 hint in f32, nothing to keep")  # fmt: skip
def test_fp32_islands_run_fp32_under_an_f16_hint() -> None:
    """On a CPU with native FP16, OpenVINO runs the marked islands in f32 and the rest in f16 (it ran the whitening
    and L2 norms in f16 before: cos min 0.99884 -> 0.99945 on a trained exact-Lw checkpoint, benchmarks/README)."""
    import onnx
    from trt_helpers import dtop_onnx

    from dtop_export.fp16.convert import plan_fp32_islands

    src = dtop_onnx()
    islands = plan_fp32_islands(onnx.load(str(src))).islands
    runs = _runtime_precisions(OpenVinoEngine(src, precision="fp16", threads=1))
    in_islands = {n: p for n, p in runs.items() if n.split("/")[0] in islands or n == "descriptors"}
    whitening = [n for n, why in islands.items() if why == "whitening"]
    assert set(whitening) <= set(in_islands) and "descriptors" in in_islands
    assert all(p == {"f32"} for p in in_islands.values()), in_islands
    assert "f16" in set().union(*(p for n, p in runs.items() if n not in in_islands))  # the rest runs f16
    x = _x(2, 64, 96)
    got, ref = OpenVinoEngine(src, precision="fp16", threads=1).embed(x), load_engine(src).embed(x)
    assert float((got * ref).sum(1).min()) >= 0.999


def _copy_ir(ir: Path, dest: Path, precision: str | None = None) -> Path:
    """A copy of ``ir`` at ``dest`` (its .bin too), its recorded ``dtop.precision`` set to ``precision``."""
    import shutil

    shutil.copy(ir.with_suffix(".bin"), dest.with_suffix(".bin"))
    text = ir.read_text()
    if precision is not None:
        text = text.replace('<dtop.precision value="fp32" />', f'<dtop.precision value="{precision}" />')
    dest.write_text(text)
    return dest


def test_a_float_hint_on_an_int8_ir_names_the_hint_to_drop(ir: Path, tmp_path: Path) -> None:
    """`embed s.int8.xml:bf16` said "is a int8 model, not bf16: drop :int8", an option the user never wrote: now
    "an int8 model, not bf16: drop :bf16" and why (its float parts run in f32)."""
    int8 = _copy_ir(ir, tmp_path / "s.int8.xml", "int8")
    for hint in ("bf16", "fp16"):
        with pytest.raises(DToPError) as e:
            OpenVinoEngine(int8, precision=hint)
        assert f"s.int8.xml is an int8 model, not {hint}: drop :{hint} (an INT8 model runs its float parts" in str(
            e.value
        )
        assert ":int8" not in str(e.value)


@pytest.mark.parametrize("extra", [[], ["--precision", "auto"]], ids=["fp32", "auto"])
def test_int8_options_without_int8_are_refused(
    small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """`openvino --recipe nncf --calib cal --calib-count 3 --keep-float elm` without --int8 wrote an fp32 IR, exit
    0, every option ignored (with --precision auto too): each is refused in one line, as `executorch` does, nothing
    written."""
    out = tmp_path / "r.xml"
    for option in (["--recipe", "nncf"], ["--calib", str(tmp_path)], ["--calib-count", "3"], ["--calib-sizes", "64"],
                   ["--keep-float", "elm"]):  # fmt: skip
        assert cli("openvino", str(small_onnx), "-o", str(out), *option, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option[0]} applies to --int8 only: ") and err.count("\n") == 1, err
        assert ("add --int8" in err) is not bool(extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_int8_onnx_is_refused_before_calibration(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`openvino p.int8.onnx --int8` (and `quantize p.int8.onnx`) read and preprocessed the calibration images before
    refusing the INT8 input: now its metadata refuses it first."""
    import onnx

    import dtop_export.quantize as quantize
    from dtop_export.contract import metadata_of, set_metadata

    model = onnx.load(str(small_onnx))
    set_metadata(model, {**metadata_of(model), "dtop.precision": "int8"})
    q = tmp_path / "p.int8.onnx"
    onnx.save_model(model, str(q))
    monkeypatch.setattr(quantize, "default_calibration_images", lambda *a: pytest.fail("calibration images read"))
    for argv in (["openvino", str(q), "--int8", "-o", str(tmp_path / "o.xml")],
                 ["quantize", str(q), "-o", str(tmp_path / "o.onnx")]):  # fmt: skip
        assert cli(*argv) == 2
        assert capsys.readouterr().err == f"error: {q} is already int8: quantise the fp32 export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.int8.onnx"]


def test_an_ir_replaced_is_put_back_whole_when_its_second_file_cannot_be_renamed(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IR's two files were renamed over the old ones one after the other, with nothing in between: a Ctrl-C
    between the two renames, or a second rename that failed, left one file new and the other old. Now the pair is
    put in place as atomic_paths does (the .bin first, signals held, the old pair put back when a rename fails), no
    temporary file left."""
    import errno
    import os

    from dtop_export.openvino_ir import write_ir

    out = tmp_path / "r.xml"
    out.write_bytes(b"old xml")
    out.with_suffix(".bin").write_bytes(b"old bin")
    replace, renamed = os.replace, []

    def second_fails(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) in (out, out.with_suffix(".bin")) and not Path(src).name.endswith(".old"):
            renamed.append(Path(dst).suffix)
            if len(renamed) == 2:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="cross-device"):
        write_ir(small_onnx, out)
    assert out.read_bytes() == b"old xml" and out.with_suffix(".bin").read_bytes() == b"old bin"
    assert renamed == [".bin", ".xml"]  # the entry point last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin", "r.xml"]
    monkeypatch.setattr(os, "replace", replace)
    write_ir(small_onnx, out)  # and without the failure, the new pair, which reads
    assert read_model(out) is not None and out.with_suffix(".bin").stat().st_size > 1000
