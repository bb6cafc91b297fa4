"""CPU checks: the TensorRT ONNX-parser lint and the FP16 audit (emulation, range finding, CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from trt_helpers import descriptor_model, dtop_onnx, sample_images, sample_root

from dtop_export.contract import preprocess_from_metadata
from dtop_export.engines.ort import OnnxRuntimeEngine
from dtop_export.engines.tensorrt.lint import lint_tensorrt
from dtop_export.errors import DToPError
from dtop_export.fp16.audit import fp16_audit
from dtop_export.fp16.convert import convert_to_fp16
from dtop_export.fp16.emulate import FP16_MAX, emulate_fp16, instrument_ranges

EXE = [sys.executable, "-m", "dtop_export"]


def _model(nodes: list, inputs: list, outputs: list, inits: tuple = (), opset: int = 18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _vi(name: str, dims: list, t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, dims)


def _resize(**attrs: object) -> onnx.ModelProto:
    sizes = numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "sizes")
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="dpe_resize", **attrs)
    return _model([node], [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 3, 8, 8])], [sizes])


# lint ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dtop_graph_passes_the_lint(precision: str) -> None:
    model = onnx.load(str(dtop_onnx()))
    if precision == "fp16":
        model = convert_to_fp16(model)
    issues = lint_tensorrt(model)
    assert issues == [], [i.line() for i in issues]


@pytest.mark.parametrize(
    ("model", "node", "needle"),
    [
        (_resize(mode="cubic", antialias=1), "dpe_resize", "antialias"),
        (_resize(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), "dpe_resize", "half_pixel_sym"),
        (_resize(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), "dpe_resize", "tf_crop_and_res"),
        (_resize(mode="nearest", keep_aspect_ratio_policy="not_larger"), "dpe_resize", "keep_aspect_ratio"),
    ],
)
def test_resize_rules(model: onnx.ModelProto, node: str, needle: str) -> None:
    errors = [i for i in lint_tensorrt(model) if i.severity == "error"]
    assert len(errors) == 1
    assert errors[0].node == node and errors[0].op == "Resize" and needle in errors[0].problem and errors[0].fix


def test_cubic_resize_without_antialias_is_fine() -> None:
    assert lint_tensorrt(_resize(mode="cubic", cubic_coeff_a=-0.75)) == []


def test_training_batchnorm_non_constant_axes_unsupported_ops_and_types() -> None:
    c = 4
    bn_inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], name="ws_bn", training_mode=1),
        helper.make_node("Shape", ["bn"], ["shp"], name="shape"),
        helper.make_node("Slice", ["shp", "st", "en"], ["axes"], name="axes_from_shape"),
        helper.make_node("ReduceMean", ["bn", "axes"], ["mean"], name="gap", keepdims=0),
        helper.make_node("Unique", ["mean"], ["u"], name="uniq"),
        helper.make_node("FusedMatMul", ["mean", "mean"], ["f"], name="ms_op", domain="com.microsoft"),
        helper.make_node("Cast", ["mean"], ["d"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["mean"], ["s8"], name="to_string", to=TensorProto.STRING),
    ]
    inits = [*bn_inits, numpy_helper.from_array(np.array([2], np.int64), "st")]
    inits.append(numpy_helper.from_array(np.array([4], np.int64), "en"))
    m = _model(
        nodes,
        [_vi("x", [1, c, 2, 2])],
        [_vi("u", None), _vi("f", None), _vi("d", None, TensorProto.DOUBLE), _vi("s8", None, TensorProto.STRING)],
        inits,
    )
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    by_node: dict[str, list] = {}
    for i in lint_tensorrt(m):
        by_node.setdefault(i.node, []).append(i)
    assert by_node["ws_bn"][0].severity == "error" and "training" in by_node["ws_bn"][0].problem
    assert "fold" in by_node["ws_bn"][0].fix
    assert by_node["gap"][0].severity == "error" and "constant axes" in by_node["gap"][0].problem
    assert by_node["uniq"][0].severity == "error" and by_node["uniq"][0].op == "Unique"
    assert by_node["ms_op"][0].severity == "error" and "com.microsoft" in by_node["ms_op"][0].problem
    assert [i.severity for i in by_node["to_double"]] == ["warning"]
    assert [i.severity for i in by_node["to_string"]] == ["error"]
    assert "shape" not in by_node and "axes_from_shape" not in by_node
    assert all(i.fix for issues in by_node.values() for i in issues)


@pytest.mark.parametrize(("opset", "severity"), [(7, "error"), (22, "warning"), (18, None)])
def test_opset_range(opset: int, severity: str | None) -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [2])], [_vi("y", [2])], opset=opset)
    issues = lint_tensorrt(m)
    assert [i.severity for i in issues] == ([severity] if severity else [])


# FP16 emulation -----------------------------------------------------------------------------------------


def test_emulation_rounds_storage_and_accumulates_in_fp32() -> None:
    """ones(1, 4096) @ ones(4096, 1): FP32 accumulation gives 4096 (pure FP16 accumulation stalls at 2048);
    an input of 1 + 2^-12 is stored as 1 in FP16, so the emulated sum is 4096, not 4097."""
    w = numpy_helper.from_array(np.ones((4096, 1), np.float32), "w")
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", [1, 4096])], [_vi("y", [1, 1])], [w]
    )
    m16 = convert_to_fp16(m, keep_fp32_ops=())
    emu = emulate_fp16(m16)
    assert all(t.data_type == TensorProto.FLOAT for t in emu.graph.initializer)
    import onnxruntime as ort

    s = ort.InferenceSession(emu.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.full((1, 4096), 1 + 2**-12, np.float32)
    assert float(s.run(None, {"x": x})[0][0, 0]) == 4096.0
    # and the result itself is stored in FP16: 4097 is not representable, 5000 rounds to 5000
    x = np.full((1, 4096), 1.25, np.float32)  # 5120 exactly representable
    assert float(s.run(None, {"x": x})[0][0, 0]) == 5120.0
    x = np.full((1, 4096), 20.0, np.float32)  # 81920 > 65504: overflow
    assert np.isinf(s.run(None, {"x": x})[0]).all()


def test_instrumented_ranges_find_an_overflowing_layer() -> None:
    model = descriptor_model(overflow=True)
    stats, watched = instrument_ranges(model)
    names = [t for t, _, _ in watched]
    assert "conv" in names and "descriptors" in names
    import onnxruntime as ort

    s = ort.InferenceSession(stats.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": x})))
    assert out["conv__amax"] > FP16_MAX and out["descriptors__amax"] <= 1.0 + 1e-6
    assert out["scaled__amax"] < FP16_MAX


def test_instrumented_ranges_count_what_fp16_flushes() -> None:
    """``__nz`` counts the non-zero values of a tensor and ``__flush`` those FP16 would round to 0
    (0 < |x| < 2**-25), exactly as numpy counts them."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    x = np.array([[0.0, 1e-9, -2e-8, 2.0**-26, 3e-8, -0.5, 7.0, 0.0, 6e-5, -1e-12]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "one"], ["y"], name="mul")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, x.shape[1]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, x.shape[1]])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    stats, watched = instrument_ranges(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [t for t, _, _ in watched] == ["y"]
    s = ort.InferenceSession(stats.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))
    a = np.abs(x)
    assert out["y__nz"] == np.count_nonzero(a) == 8
    assert out["y__flush"] == np.count_nonzero((a > 0) & (a < 2.0**-25)) == 4
    assert out["y__amax"] == 7.0


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i, p in enumerate(sample_images(6)):
        Image.open(p).convert("RGB").save(d / f"{i}.png")
    return d


def test_fp16_audit_finds_the_overflowing_layer(tmp_path: Path, photo_dir: Path) -> None:
    path = tmp_path / "overflow.onnx"
    onnx.save(descriptor_model(overflow=True), str(path))
    r = fp16_audit(path, photo_dir, image_size=64)
    found = {f.node for f in r.findings}
    assert {"stem_conv", "stem_relu", "gap"} <= found
    assert all(f.reason.startswith("overflow") for f in r.findings if f.node in ("stem_conv", "gap"))
    assert {"stem_conv", "stem_relu", "gap", "rescale_mul"} <= set(r.keep_fp32_nodes)
    base, audited = r.runs
    assert not base.finite  # FP16 everywhere but the default islands: inf -> NaN descriptors
    assert audited.finite and audited.cosine_min >= 0.999
    assert r.passed and r.images == 6 and r.queries == 0
    # the same graph at a sane scale: nothing to report, one variant
    sane = tmp_path / "sane.onnx"
    onnx.save(descriptor_model(), str(sane))
    r2 = fp16_audit(sane, photo_dir, image_size=64)
    assert r2.findings == [] and len(r2.runs) == 1 and r2.final.cosine_min >= 0.999 and r2.passed


def test_fp16_audit_of_the_dtop_graph_on_the_sample_set() -> None:
    r = fp16_audit(dtop_onnx(), sample_root(), image_size=128)
    assert r.queries == 20 and r.images == 110
    assert set(r.map_fp32) == {"easy", "medium", "hard"}
    run = r.final
    assert run.finite and run.cosine_min >= 0.999
    assert all(abs(d) <= 0.2 for d in run.map_delta.values()), run.map_delta
    # the padding of the stem's max-pool (-FLT_MAX by design) is not reported as an overflow
    assert not any(f.op == "Pad" for f in r.findings)
    assert "| variant |" in r.table()


def test_in_memory_engine_and_preprocess_from_metadata() -> None:
    meta = {"dtop.stride": "32", "dtop.mean": "[0.1, 0.2, 0.3]", "dtop.std": "[1, 2, 3]"}
    meta["dtop.resize_policy"] = json.dumps({"policy": "longest_side", "size": 640, "interpolation": "bicubic"})
    pp = preprocess_from_metadata(meta)
    assert pp.stride == 32 and pp.mean == (0.1, 0.2, 0.3) and pp.size == 640 and pp.interpolation == "bicubic"
    seen: list[tuple[tuple[int, ...], list[str]]] = []
    eng = OnnxRuntimeEngine(descriptor_model(), on_run=lambda x, res: seen.append((x.shape, sorted(res))))
    assert eng.source is None and eng.stride == 16 and eng.descriptor_dim == 16
    out = eng.embed(np.zeros((1, 3, 32, 48), np.float32))
    assert out.shape == (1, 16) and seen == [((1, 3, 32, 48), ["descriptors"])]


def test_onnx_without_a_fixed_descriptor_size_is_one_line(tmp_path: Path) -> None:
    # a foreign model whose descriptor size depends on the input (Flatten of a conv map) and no dtop metadata:
    # 'embed' was a ValueError traceback (int('d')) while the engine opened
    w = numpy_helper.from_array(np.full((2, 3, 16, 16), 0.01, np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["conv"], strides=[16, 16]),
        helper.make_node("Flatten", ["conv"], ["descriptors"], axis=1),
    ]
    model = _model(nodes, [_vi("images", ["batch", 3, "h", "w"])], [_vi("descriptors", ["batch", "d"])], [w])
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DToPError, match=r"output 'descriptors' \['batch', 'd'\] has no fixed descriptor size"):
        OnnxRuntimeEngine(model)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(images / "a.jpg")
    r = subprocess.run([*EXE, "embed", str(path), str(images), "-o", str(tmp_path / "d.npy")], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no dtop.descriptor_dim metadata" in r.stderr and not list(tmp_path.glob("d.*"))
    # a scalar output (rank 0) was an IndexError (a review)
    scalar = _model([helper.make_node("ReduceSum", ["images"], ["descriptors"], keepdims=0)],
                    [_vi("images", ["batch", 3, "h", "w"])], [_vi("descriptors", [])], [])  # fmt: skip
    with pytest.raises(DToPError, match=r"output 'descriptors' \[\] has no fixed descriptor size"):
        OnnxRuntimeEngine(scalar)
    # the metadata names the size: the engine opens
    e = model.metadata_props.add()
    e.key, e.value = "dtop.descriptor_dim", "2"
    assert OnnxRuntimeEngine(model).descriptor_dim == 2


# CLI ----------------------------------------------------------------------------------------------------


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    onnx.save(_resize(mode="cubic", antialias=1), str(bad))
    r = subprocess.run([*EXE, "check", str(bad), "--target", "tensorrt"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dpe_resize" in r.stdout and "antialias" in r.stdout
    good = tmp_path / "good.onnx"
    onnx.save(_resize(mode="cubic"), str(good))
    out = tmp_path / "report.json"
    r = subprocess.run([*EXE, "check", str(good), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "should parse" in r.stdout and json.loads(out.read_text())["tensorrt"] == []
    r = subprocess.run([*EXE, "check", str(good), "--target", "openvino"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "only tensorrt" in r.stderr


def test_check_cli_fp16_audit_json(tmp_path: Path, photo_dir: Path) -> None:
    path = tmp_path / "overflow.onnx"
    onnx.save(descriptor_model(overflow=True), str(path))
    out = tmp_path / "audit.json"
    r = subprocess.run(
        [
            *EXE,
            "check",
            str(path),
            "--fp16-audit",
            "--images",
            str(photo_dir),
            "--image-size",
            "64",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert "stem_conv" in report["fp16_audit"]["keep_fp32_nodes"] and report["fp16_audit"]["passed"]
    assert "keep in FP32" in r.stdout
