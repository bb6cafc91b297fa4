"""FP16 ONNX with FP32 islands: island planning, cast clean-up, the DToP graph in ONNX Runtime on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_helpers import descriptor_model, dtop_ckpt, dtop_onnx, sample_images

from dtop_export.errors import DToPError
from dtop_export.fp16.convert import (
    convert_file,
    convert_to_fp16,
    fp32_nodes_of,
    plan_fp32_islands,
    remove_cast_round_trips,
    tensor_types,
    topological_sort,
)
from dtop_export.parity import cosine_per_row
from dtop_export.preprocess import PreprocessConfig, load_image, prepare


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _types_by_node(model: onnx.ModelProto) -> dict[str, tuple[list[int], list[int]]]:
    types = tensor_types(model)
    return {
        n.name: ([types.get(i, 0) for i in n.input if i], [types.get(o, 0) for o in n.output]) for n in model.graph.node
    }


# island planning -----------------------------------------------------------------------------------------


def test_islands_of_the_dtop_graph() -> None:
    model = onnx.load(str(dtop_onnx()))
    plan = plan_fp32_islands(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    for name, op in ops.items():
        if op in ("LayerNormalization", "Softmax", "ReduceL2", "InstanceNormalization"):
            assert name in plan.islands, f"{op} {name} not kept FP32"
    reasons = plan.reasons()
    # two L2 normalisations (before and after whitening): Clip, Expand, Div each; one whitening Gemm
    assert reasons["L2 normalisation"] == 6 and reasons["whitening"] == 1
    (whiten,) = [n for n, r in plan.islands.items() if r == "whitening"]
    assert ops[whiten] == "Gemm"
    # the head Gemm before the first L2 norm and the transformer MatMuls are FP16
    assert all(ops[n] != "MatMul" for n in plan.islands)
    assert sum(ops[n] == "Gemm" for n in plan.islands) == 1


def test_unknown_keep_node_is_an_error() -> None:
    with pytest.raises(DToPError, match="no node named nope"):
        plan_fp32_islands(descriptor_model(), keep_fp32_nodes=["nope"])


# graph clean-up ------------------------------------------------------------------------------------------


def _round_trip_graph() -> onnx.ModelProto:
    """x -> Relu(fp32) -> Cast16 -> Cast32 -> Sqrt -> y, and Cast16 also feeds a float16 Neg -> z."""
    nodes = [
        helper.make_node("Cast", ["h16"], ["back"], to=TensorProto.FLOAT, name="c32"),  # out of order on purpose
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["h16"], to=TensorProto.FLOAT16, name="c16"),
        helper.make_node("Sqrt", ["back"], ["y"], name="sqrt"),
        helper.make_node("Neg", ["h16"], ["z"], name="neg"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT16, [4]),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_topological_sort_and_round_trip_removal() -> None:
    m = _round_trip_graph()
    topological_sort(m)
    order = [n.name for n in m.graph.node]
    assert order.index("c16") < order.index("c32") < order.index("sqrt")
    removed = remove_cast_round_trips(m, tensor_types(m))
    assert removed == 1  # c32 goes; c16 stays because the float16 Neg still reads it
    names = [n.name for n in m.graph.node]
    assert "c32" not in names and "c16" in names
    sqrt = next(n for n in m.graph.node if n.name == "sqrt")
    assert list(sqrt.input) == ["r"]  # reads the FP32 value directly
    onnx.checker.check_model(m, full_check=True)
    x = np.array([1.0001, 4.0, 9.0, 2.0], np.float32)
    y, z = _session(m).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.sqrt(x))  # no FP16 rounding on the FP32 path
    np.testing.assert_array_equal(z, -x.astype(np.float16))


# the DToP graph ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_model() -> onnx.ModelProto:
    return convert_to_fp16(onnx.load(str(dtop_onnx())))


def test_fp16_graph_types(fp16_model: onnx.ModelProto) -> None:
    onnx.checker.check_model(fp16_model, full_check=True)
    assert [i.type.tensor_type.elem_type for i in fp16_model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in fp16_model.graph.output] == [TensorProto.FLOAT]
    meta = {p.key: p.value for p in fp16_model.metadata_props}
    assert meta["dtop.precision"] == "fp16"
    islands = set(fp32_nodes_of(fp16_model))
    assert islands and json.loads(meta["dtop.fp16"])["fp32_reasons"]["whitening"] == 1
    by_node = _types_by_node(fp16_model)
    ops = {n.name: n.op_type for n in fp16_model.graph.node}
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16}
    for name, (ins, outs) in by_node.items():
        floats = [t for t in ins + outs if t in float_types]
        if name in islands:
            assert all(t == TensorProto.FLOAT for t in floats), f"island {name} ({ops[name]}) touches FP16"
        elif ops[name] in ("MatMul", "Conv", "Gemm", "Add", "Erf"):
            assert all(t == TensorProto.FLOAT16 for t in floats), f"{name} ({ops[name]}) is not FP16"
    # weights: the large ones are FP16 (only island weights stay FP32)
    sizes = {t.data_type: 0 for t in fp16_model.graph.initializer}
    for t in fp16_model.graph.initializer:
        sizes[t.data_type] += int(np.prod(t.dims))
    assert sizes[TensorProto.FLOAT16] > 10 * sizes.get(TensorProto.FLOAT, 0)
    # no FP32 -> FP16 -> FP32 round trip is left between two FP32 nodes
    producer = {o: n for n in fp16_model.graph.node for o in n.output}
    types = tensor_types(fp16_model)
    for n in fp16_model.graph.node:
        if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT:
            first = producer.get(n.input[0])
            assert not (
                first is not None
                and first.op_type == "Cast"
                and first.attribute[0].i == TensorProto.FLOAT16
                and types.get(first.input[0]) == TensorProto.FLOAT
            ), f"round trip {first.name} -> {n.name}"


def test_fp16_onnx_matches_fp32_on_cpu(fp16_model: onnx.ModelProto) -> None:
    """ONNX Runtime (CPU) runs the FP16 file; per-image cosine to the float32 export >= 0.999 on real photos."""
    fp32 = ort.InferenceSession(str(dtop_onnx()), providers=["CPUExecutionProvider"])
    fp16 = _session(fp16_model)
    assert fp16.get_inputs()[0].type == "tensor(float)"
    pp = PreprocessConfig(stride=16)
    cos: list[float] = []
    max_abs = 0.0
    for size in (224, 320):
        batch = [prepare(load_image(p), pp, size) for p in sample_images(6)]
        shapes = {b.shape for b in batch}
        groups = [np.stack([b for b in batch if b.shape == s]) for s in shapes]
        for x in groups:
            a = fp32.run(None, {"images": x})[0]
            b = fp16.run(None, {"images": x})[0]
            assert b.dtype == np.float32 and np.isfinite(b).all()
            np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
            cos += list(cosine_per_row(a, b))
            max_abs = max(max_abs, float(np.abs(a - b).max()))
    assert len(cos) == 12
    assert min(cos) >= 0.999, min(cos)
    assert max_abs > 1e-6  # really computed in reduced precision (an FP32 file would match to ~1e-7)


def test_convert_file_and_refuse_fp16_twice(tmp_path) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(descriptor_model(), str(src))
    dst = tmp_path / "tiny.fp16.onnx"
    out = convert_file(src, dst, keep_fp32_nodes=["head_fc"])
    assert dst.is_file() and not list(tmp_path.glob(".*.tmp"))
    assert "head_fc" in fp32_nodes_of(out)
    types = _types_by_node(out)
    assert all(t == TensorProto.FLOAT for t in types["head_fc"][1])
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "conv.w")).dtype == np.float16
    with pytest.raises(DToPError, match="already FP16"):
        convert_file(dst, tmp_path / "again.onnx")


def test_onnx_fp16_keeps_the_old_file_when_the_conversion_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`onnx --fp16 --force` renamed the float32 export onto the output, then converted it in place: a conversion
    that failed removed the file, the old good one already gone; a kill left a float32 model under the .fp16.onnx
    name (a review). The float32 export now goes to a hidden folder, and only the FP16 file is put in place."""
    from cli_helpers import cli

    import dtop_export.fp16.convert as convert

    out = tmp_path / "m.fp16.onnx"
    out.write_bytes(b"the old good FP16 model")

    def fails(*args: object, **kwargs: object) -> None:
        raise DToPError("conversion failed")

    monkeypatch.setattr(convert, "convert_to_fp16", fails)
    assert cli("onnx", str(dtop_ckpt()), "--fp16", "-o", str(out), "--force") != 0
    assert "conversion failed" in capsys.readouterr().err
    assert out.read_bytes() == b"the old good FP16 model" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_onnx_cli_fp16(tmp_path) -> None:
    """`dtop-export onnx --fp16` writes the FP16 artefact; the ONNX Runtime engine reports it as fp16."""
    from dtop_export.engines import load_engine

    out = tmp_path / "m.fp16.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "onnx", str(dtop_ckpt()), "--fp16", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "converted to FP16" in r.stdout
    model = onnx.load(str(out))
    assert fp32_nodes_of(model) and any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    engine = load_engine(out)
    assert engine.precision == "fp16"
    x = np.zeros((1, 3, 64, 96), np.float32)
    ref = load_engine(dtop_onnx()).embed(x)
    assert cosine_per_row(ref, engine.embed(x))[0] >= 0.999
