"""Parity, the FP16 audit, optimize and info on files and data sets they did not handle: a setup without positives,
fixed-shape exports, NaN outputs, derived (INT8, optimised) ONNX files, a --no-whiten export, an empty file. Tiny
synthetic ONNX graphs stand in for exports wherever the check reads only the graph's shape and metadata."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import cli
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dtop_export.errors import DToPError

DIM = 8


def tiny_onnx(
    path: Path,
    *,
    batch: int | str = "b",
    hw: tuple[int, int] | None = None,
    meta: dict[str, str] | None = None,
    nan: bool = False,
) -> Path:
    """A dtop-export-like ONNX (``images`` [B, 3, H, W] -> L2-normalised ``descriptors`` [B, 8]): channel means
    through a fixed matrix, normalised; ``hw`` fixes H x W as a ``--static`` export does (with its square metadata),
    ``batch`` an int as ``--batch``; ``nan``: every descriptor NaN."""
    h, w = hw or ("h", "w")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])
    y = helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, [batch, DIM])
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=0, name="mean"),
        helper.make_node("MatMul", ["m", "w"], ["z"], name="proj"),
        helper.make_node("LpNormalization", ["z"], ["n"], axis=1, p=2, name="l2"),
    ]
    if nan:
        nodes += [helper.make_node("Sub", ["n", "n"], ["zero"]), helper.make_node("Div", ["zero", "zero"], ["d"])]
    nodes.append(helper.make_node("Identity", ["d" if nan else "n"], ["descriptors"], name="out"))
    graph = helper.make_graph(nodes, "tiny", [x], [y], [weight, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    props = {"dtop.descriptor_dim": str(DIM), "dtop.precision": "fp32", "dtop.stride": "16"}
    if hw is not None:
        props |= {
            "dtop.static_hw": json.dumps(list(hw)),
            "dtop.resize_policy": json.dumps({"policy": "square", "size": hw[0], "interpolation": "bilinear"}),
        }
    for k, v in (props | (meta or {})).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


def tiny_set(folder: Path, image_size: int = 64, hard: bool = True) -> Path:
    """A revisitop-layout set (``gnd_tiny.pkl`` + ``jpg/``): 2 queries, 4 database images of noise; ``hard=False``:
    no query has hard positives (the Hard setup has no mean)."""
    rng = np.random.default_rng(0)
    (folder / "jpg").mkdir(parents=True)
    names = [f"db{i}" for i in range(4)]
    for name in [*names, "q0", "q1"]:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "jpg" / f"{name}.jpg")
    gnd = [{"bbx": None, "easy": [i], "hard": [i + 2] if hard else [], "junk": []} for i in range(2)]
    cfg = {"imlist": names, "qimlist": ["q0", "q1"], "gnd": gnd, "image_size": image_size}
    (folder / "gnd_tiny.pkl").write_bytes(pickle.dumps(cfg))
    return folder


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# 1. a setup without positives --------------------------------------------------------------------------------------


def _no_hard_set() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(0)
    db = rng.standard_normal((12, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:3] + 0.01
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return db, q, [{"easy": [i, i + 3], "hard": [], "junk": []} for i in range(3)]  # no query has hard images


def test_a_setup_without_positives_passes_and_reports_null() -> None:
    """Hard mAP is NaN for both (no query has hard positives): an identical engine failed `map_delta_hard nan > 0.05`
    and the JSON held bare NaN; now the setup passes as "no positives", `—` in the table, null in strict JSON."""
    from dtop_export.parity import ParityReport, compare, contract_for
    from dtop_export.retrieval.metrics import evaluate_descriptors

    db, q, gnd = _no_hard_set()
    metrics = evaluate_descriptors(db, q, gnd)
    assert np.isnan(metrics["map"]["hard"])
    res = compare((db, q), (db.copy(), q.copy()), gnd, contract_for("fp32"), metrics["map"], "same")
    assert res.passed, res.failures()
    hard = next(c for c in res.checks if c.metric == "map_delta_hard")
    assert hard.passed and hard.value == "no positives"
    reference = {"label": "ref", "engine": {}, "map": metrics["map"], "mp": metrics["mp"]}
    report = ParityReport("tiny", 12, 3, (1.0,), 64, False, reference, [res])
    payload = json.dumps(report.to_dict(), allow_nan=False)  # raised ValueError: NaN in map, map_delta, mp
    d = json.loads(payload)
    assert d["reference"]["map"]["hard"] is None and d["engines"][0]["map_delta"]["hard"] is None
    assert d["passed"] is True
    table = report.table()
    assert "nan" not in table.lower() and "/ — |" in table


def test_a_setup_without_positives_on_one_side_only_fails() -> None:
    """A reference mAP that is NaN where the engine's is a number (or the other way) cannot be the same ground
    truth: it fails, named."""
    from dtop_export.parity import compare, contract_for
    from dtop_export.retrieval.metrics import evaluate_descriptors

    db, q, gnd = _no_hard_set()
    gnd = [{**g, "hard": [i + 6]} for i, g in enumerate(gnd)]  # hard positives: the engine's Hard mAP is a number
    ref_map = {**evaluate_descriptors(db, q, gnd)["map"], "hard": float("nan")}
    res = compare((db, q), (db, q), gnd, contract_for("fp32"), ref_map, "same")
    assert not res.passed
    assert res.failures() == ["map_delta_hard reference mAP undefined (expected a mAP as the engine's)"]


def test_cli_writes_strict_json(tmp_path: Path) -> None:
    from dtop_export.cli.common import write_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"v": float("nan")}, strict=True)
    assert not (tmp_path / "x.json").exists()


# 7. a --no-whiten export against its whitened checkpoint -----------------------------------------------------------


@pytest.fixture(scope="module")
def whitened_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtop_export.checkpoint import random_checkpoint

    return random_checkpoint("small", tmp_path_factory.mktemp("wh") / "wh.pt", seed=0, source="test")


def _whitening(applied: bool) -> dict[str, str]:
    return {"dtop.whitening": json.dumps({"applied": applied, "kind": "lw" if applied else None})}


def test_a_no_whiten_export_gets_an_unwhitened_reference(whitened_ckpt: Path, small_ckpt: Path, tmp_path: Path) -> None:
    """Parity of a --no-whiten export against its whitened checkpoint failed with cosine ~0, read as an accuracy
    problem: the reference now runs without its whitening too, and says so; both kinds in one run are refused."""
    from dtop_export.identity import reference_whitening

    plain = tiny_onnx(tmp_path / "plain.onnx", meta=_whitening(False))
    whitened = tiny_onnx(tmp_path / "whitened.onnx", meta=_whitening(True))
    whiten, note = reference_whitening([plain], whitened_ckpt)
    assert whiten is False and note.startswith(f"note: {plain} was exported with --no-whiten") and "(lw)" in note
    assert reference_whitening([whitened], whitened_ckpt) == (True, None)
    assert reference_whitening([plain], small_ckpt) == (
        True,
        None,
    )  # a checkpoint without whitening: the same either way
    for mixed in ([plain, whitened], [plain, whitened_ckpt]):
        with pytest.raises(DToPError, match="exported with --no-whiten, .* applies the checkpoint's whitening"):
            reference_whitening(mixed, whitened_ckpt)


def test_cli_parity_runs_the_reference_unwhitened_for_a_no_whiten_export(
    whitened_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dtop_export.retrieval.datasets as datasets
    from dtop_export.engines.pytorch import TorchEngine

    seen = {}

    def stop(path: Path, **kwargs: object) -> None:
        seen.update(kwargs)
        raise DToPError("stopped")

    monkeypatch.setattr(datasets, "resolve_dataset", lambda *a: None)
    monkeypatch.setattr(TorchEngine, "from_checkpoint", stop)
    plain = tiny_onnx(tmp_path / "plain.onnx", meta=_whitening(False))
    assert cli("parity", str(whitened_ckpt), str(plain), "--no-progress") == 2
    assert seen == {"whiten": False}
    assert "was exported with --no-whiten: the reference runs" in capsys.readouterr().err


# 2, 3. optimize's self-check: fixed shapes, ONNX Runtime errors, NaN ---------------------------------------------


def test_optimize_checks_a_fixed_batch_or_static_export_at_its_shape(tmp_path: Path) -> None:
    """`optimize` of a `--batch 1` or `--static` export fed batch 2 at HxW(3/4 H): an onnxruntime traceback."""
    from dtop_export.optimize import _compare

    checked = {}
    for name, kw in (("b1", {"batch": 1}), ("s64", {"hw": (64, 64)}), ("b1s", {"batch": 1, "hw": (32, 48)})):
        a = tiny_onnx(tmp_path / f"{name}.onnx", **kw)
        worst, checked[name] = _compare(a, a, {}, (256, 384))
        assert worst == 0.0
    assert checked == {"b1": ["1x3x256x192", "1x3x384x288"], "s64": ["2x3x64x64"], "b1s": ["1x3x32x48"]}
    from dtop_export.optimize import check_shapes

    assert check_shapes(["b", 3, "h", "w"], (256, 384), 16) == [(2, 3, 256, 192), (2, 3, 384, 288)]


def test_optimize_turns_onnxruntime_errors_into_one_line(tmp_path: Path) -> None:
    from dtop_export.optimize import _compare

    a = tiny_onnx(tmp_path / "a.onnx")
    b = tiny_onnx(tmp_path / "b.onnx", batch=3)  # another fixed batch than the check's: fails at run time
    with pytest.raises(DToPError, match=r"^the optimised a.onnx fails in ONNX Runtime at 2x3x256x192: "):
        _compare(a, b, {}, (256,))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(DToPError, match="^ONNX Runtime cannot load the optimised a.onnx"):
        _compare(a, tmp_path / "bad.onnx", {}, (256,))


def test_optimize_and_int8_checks_never_pass_nan(tmp_path: Path) -> None:
    """max(0.0, nan) is 0.0 and min([1.0, 1.0, nan]) is 1.0: a NaN-producing optimised model was written, and an
    INT8 artefact with a NaN descriptor (not the first) passed the INT8 check."""
    from dtop_export.int8_check import BelowContract, agreement, refuse_below_contract
    from dtop_export.optimize import _compare

    a, b = tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "nan.onnx", nan=True)
    assert _compare(a, b, {}, (64, 96))[0] == float("inf")
    fp32 = [np.ones((1, 4))] * 3
    int8 = [np.ones((1, 4)), np.ones((1, 4)), np.full((1, 4), np.nan)]
    check = agreement(fp32, int8, "x")
    assert np.isnan(check["cosine_min"])
    with pytest.raises(BelowContract, match="cosine min nan"):
        refuse_below_contract(check, "the INT8 ONNX", "", ["a", "b"])


# 5, 8. the engine contract's fixed-size error, and an ONNX file without a graph --------------------------------------


def test_info_refuses_an_onnx_file_without_a_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """protobuf parses 0 bytes as an empty ModelProto: `info` printed empty tables and exited 0."""
    from dtop_export.contract import load_onnx

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert cli("info", str(empty)) == 2
    assert one_line_error(capsys) == f"error: {empty} is not a readable ONNX file (empty file)"
    no_graph = tmp_path / "nograph.onnx"
    no_graph.write_bytes(onnx.ModelProto(ir_version=9).SerializeToString())
    with pytest.raises(DToPError, match=r"\(no graph\)$"):
        load_onnx(no_graph)


def test_a_static_engine_without_a_file_is_named_by_its_label() -> None:
    from dtop_export.contract import Engine
    from dtop_export.preprocess import PreprocessConfig

    class Static(Engine):
        name, stride, descriptor_dim, preprocess = "static", 16, 4, PreprocessConfig()

        def embed(self, images: np.ndarray) -> np.ndarray:
            return self.embed_exported(images, lambda x: x[:, 0, 0, :4], static_hw=(32, 32))

    with pytest.raises(DToPError, match=r"^the static fp32 cpu model was exported for 32x32 inputs only"):
        Static().embed(np.zeros((1, 3, 64, 64), np.float32))


# 4. FP16 of a derived file -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "kind"),
    [
        ({"dtop.precision": "int8"}, "INT8"),
        ({"dtop.optimized": "{}"}, "optimised for ONNX Runtime"),
    ],
)
def test_fp16_refuses_an_int8_or_optimised_onnx(
    tmp_path: Path, meta: dict[str, str], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check --fp16-audit` and `trt --fp16` of an optimised or INT8 ONNX: an onnx InferenceError traceback."""
    from dtop_export.fp16.convert import convert_to_fp16, fp16_onnx_model

    path = tiny_onnx(tmp_path / "derived.onnx", meta={**meta, "dtop.derived_from": "model.onnx"})
    expected = f"derived.onnx is {kind}.*: give the fp32 export it came from \\(model.onnx\\)"
    with pytest.raises(DToPError, match=expected):
        fp16_onnx_model(path)
    with pytest.raises(DToPError, match="give the fp32 export it came from"):
        convert_to_fp16(onnx.load(str(path)))
    assert cli("check", str(path), "--fp16-audit", "--images", str(tmp_path), "--no-progress") == 2
    assert "give the fp32 export it came from (model.onnx) to audit" in one_line_error(capsys)


def test_fp16_conversion_checker_errors_are_one_line() -> None:
    """The ONNX checker raises InferenceError (not ValidationError) for a graph the converter breaks (QDQ nodes)."""
    from dtop_export.fp16.convert import convert_to_fp16

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, [1, 4])
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.int8), "q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["wt"], name="dq"),
        helper.make_node("MatMul", ["images", "wt"], ["descriptors"], name="mm"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "qdq", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    with pytest.raises(DToPError, match="^the FP16 model fails the ONNX checker"):
        convert_to_fp16(model)


# 5, 6, 9. the FP16 audit: a square --static export's size, option ranges, no ΔmAP without queries ---------------


def test_fp16_audit_runs_a_square_static_export_at_its_size(tmp_path: Path) -> None:
    """The audit took the data set's size (64) over a `--static 32x32` export's own, and its error named `None`."""
    from dtop_export.fp16.audit import fp16_audit

    model = tiny_onnx(tmp_path / "s32.onnx", hw=(32, 32))
    data = tiny_set(tmp_path / "tiny", image_size=64)
    result = fp16_audit(model, data, crop_queries=False)
    assert result.image_size == 32 and result.shapes == ["32x32"] and result.passed
    with pytest.raises(DToPError) as refused:  # an in-memory variant of the file: it named `None`
        fp16_audit(model, data, image_size=64, crop_queries=False)
    assert str(refused.value).startswith(f"{model} was exported for 32x32 inputs only, got 64x64")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--limit", "-3", "--limit must be >= 1, got -3"),
        ("--limit", "0", "--limit must be >= 1, got 0"),
        ("--underflow", "-1", "--underflow must be >= 0, got -1"),
        ("--underflow", "5", "--underflow must be < 1"),
    ],
)
def test_fp16_audit_options_are_range_checked(
    tmp_path: Path, option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    args = ["check", str(model), "--fp16-audit", "--images", str(tmp_path), "--no-progress"]
    assert cli(*args, option, value) == 2
    assert message in one_line_error(capsys)


def test_fp16_audit_of_plain_images_claims_no_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plain image folder has no queries: the verdict named |ΔmAP| <= 0.2 all the same."""
    model = tiny_onnx(tmp_path / "m.onnx")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(images / f"{i}.jpg")
    out = tmp_path / "audit.json"
    args = ["--fp16-audit", "--images", str(images), "--image-size", "64", "--no-progress", "--json", str(out)]
    assert cli("check", str(model), *args) == 0
    text = capsys.readouterr().out
    assert "FP16 contract met (cosine >= 0.999)" in text and "mAP" not in text
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
