"""ONNX export: folding, graph invariants, metadata, atomic writes, and ORT-vs-PyTorch parity."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from dtop_export.checkpoint import Whitening, load_checkpoint, new_provenance, save_checkpoint
from dtop_export.contract import read_onnx_metadata
from dtop_export.engines import load_engine
from dtop_export.errors import DToPError
from dtop_export.export import export_onnx, graph_problems, parse_hw
from dtop_export.fold import fold_for_deployment
from dtop_export.model import DToP, build_model, get_preset
from dtop_export.preprocess import default_preprocess

PARITY_SHAPES = [(224, 224), (384, 384), (384, 512), (512, 384), (640, 384), (768, 1024), (1024, 1024)]


def _randomise_batchnorm(model: DToP) -> None:
    """Non-trivial BN statistics so that folding is really exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


def _whitening(n: int, out: int) -> Whitening:
    g = torch.Generator().manual_seed(1)
    proj = torch.linalg.qr(torch.randn(n, n, generator=g))[0][:out] * 3.0
    return Whitening(mean=torch.randn(n, generator=g) * 0.05, proj=proj, kind="lw")


def _make_ckpt(path: Path, preset: str = "small", whiten: bool = True, **changes: object) -> Path:
    torch.manual_seed(0)
    model = build_model(get_preset(preset).replace(**changes)).eval()
    _randomise_batchnorm(model)
    wh = _whitening(model.descriptor_dim, model.descriptor_dim // 2) if whiten else None
    save_checkpoint(
        path,
        model,
        default_preprocess(model.cfg.backbone, model.stride),
        whitening=wh,
        provenance=new_provenance("test"),
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("export")
    ckpt = _make_ckpt(d / "small.pt")
    onnx_path = d / "small.onnx"
    export_onnx(ckpt, onnx_path)
    return ckpt, onnx_path


# folding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_bn_at_inference", [False, True])
def test_folded_module_matches_unfolded_pipeline(head_bn_at_inference: bool) -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("small").replace(head_bn_at_inference=head_bn_at_inference)).eval()
    _randomise_batchnorm(model)
    wh = _whitening(256, 128)
    deploy, stats = fold_for_deployment(model, wh)
    assert stats["batchnorm_folded"] == 7 and stats["std_conv_baked"] == 13
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    x = torch.randn(3, 3, 192, 256)
    with torch.no_grad():
        ref = wh.apply(F.normalize(model(x), dim=-1))
        out = deploy(x)
    assert out.shape == (3, 128)
    assert F.cosine_similarity(ref, out).min() >= 0.999999
    # the original model is untouched by folding
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_head_bn_fold_differs_from_drop() -> None:
    """Folding the kept head BN is not the same as dropping it (so the test above checks something)."""
    torch.manual_seed(0)
    model = build_model(get_preset("small").replace(head_bn_at_inference=True)).eval()
    _randomise_batchnorm(model)
    dropped = copy.deepcopy(model)
    dropped.head.bn_at_inference = False
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert F.cosine_similarity(model(x), dropped(x)).min() < 0.9999


# the exported graph ----------------------------------------------------------------------------------


def test_graph_invariants(exported: tuple[Path, Path]) -> None:
    _, onnx_path = exported
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    assert not ops & {"RandomUniformLike", "RandomUniform", "Bernoulli"}  # no WaveBlock
    assert graph_problems(proto) == []
    opset = next(o.version for o in proto.opset_import if o.domain == "")
    assert opset >= 17
    assert "LayerNormalization" in ops
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 128


def test_dpe_resize_is_dynamic_and_not_antialiased(exported: tuple[Path, Path]) -> None:
    proto = onnx.load(str(exported[1]))
    consts = {i.name for i in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1
    r = resizes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in r.attribute}
    assert attrs.get("antialias", 0) == 0
    assert attrs["mode"] == b"cubic" and attrs.get("coordinate_transformation_mode") == b"half_pixel"
    assert attrs.get("cubic_coeff_a") == pytest.approx(-0.75)
    sizes = r.input[3]
    assert sizes and sizes not in consts  # computed from the input's Shape at run time


def test_metadata(exported: tuple[Path, Path]) -> None:
    ckpt_path, onnx_path = exported
    info = read_onnx_metadata(onnx_path)
    meta = info["metadata"]
    assert meta["descriptor_dim"] == 128 and meta["whitening"]["applied"] is True
    assert meta["input_layout"] == "NCHW" and meta["color_order"] == "RGB"
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["stride"] == 16
    assert meta["checkpoint_sha256"] == load_checkpoint(ckpt_path).sha256
    assert info["config"]["num_layers"] == 4
    assert info["inputs"]["images"] == "float32 [batch, 3, height, width]"


@pytest.mark.parametrize(("h", "w"), PARITY_SHAPES)
@pytest.mark.parametrize("batch", [1, 4])
def test_ort_matches_pytorch(exported: tuple[Path, Path], h: int, w: int, batch: int) -> None:
    ckpt_path, onnx_path = exported
    ref, ort = _engines(ckpt_path, onnx_path)
    x = np.random.default_rng(h * w + batch).standard_normal((batch, 3, h, w)).astype(np.float32)
    a, b = ref.embed(x), ort.embed(x)
    assert a.shape == b.shape == (batch, 128)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999
    assert np.abs(a - b).max() <= 1e-4


_ENGINES: dict = {}


def _engines(ckpt_path: Path, onnx_path: Path):  # noqa: ANN202
    key = (ckpt_path, onnx_path)
    if key not in _ENGINES:
        _ENGINES[key] = (load_engine(ckpt_path), load_engine(onnx_path))
    return _ENGINES[key]


def test_no_whiten_and_static_and_fixed_batch(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    ckpt_path, _ = exported
    out = tmp_path / "static.onnx"
    export_onnx(ckpt_path, out, static_hw=(128, 192), batch=2, whiten=False, opset=20)
    proto = onnx.load(str(out))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 128, 192]
    assert next(o.version for o in proto.opset_import if o.domain == "") == 20
    eng = load_engine(out)
    assert eng.descriptor_dim == 256 and eng.fixed_batch == 2
    ref = load_engine(ckpt_path, whiten=False)
    x = np.random.default_rng(0).standard_normal((3, 3, 128, 192)).astype(np.float32)  # 3 = 2 + padded 1
    a, b = ref.embed(x), eng.embed(x)
    assert b.shape == (3, 256)
    assert ((a * b).sum(1)).min() >= 0.99999
    with pytest.raises(DToPError, match="exported for 128x192 inputs only") as e:
        eng.embed(x[:2, :, :96, :96].copy())
    assert "embed with the dynamic export" in str(e.value) and "--static 192x192" in str(e.value)  # not "resize"


def test_a_square_static_export_embeds_photos(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    """`onnx --static SxS` kept the checkpoint's longer-side resize: `embed` of any non-square photo failed with "was
    exported for SxS inputs only" (a longer-side resize cannot give SxS). It now records the square policy at S, as
    a .pte of that size does: photos of any aspect embed, equal to the checkpoint on the same square inputs."""
    from cli_helpers import cli
    from PIL import Image

    from dtop_export.contract import read_metadata
    from dtop_export.preprocess import load_image, prepare

    out = tmp_path / "sq.onnx"
    export_onnx(exported[0], out, static_hw=(64, 64))
    policy = json.loads(read_metadata(out)["dtop.resize_policy"])
    assert (policy["policy"], policy["size"]) == ("square", 64)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(120, 80), (70, 150), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    assert cli("embed", str(out), str(photos), "-o", str(tmp_path / "d.npy"), "--no-progress") == 0
    got = np.load(tmp_path / "d.npy")
    eng, ref = load_engine(out), load_engine(exported[0])
    x = np.stack([prepare(load_image(photos / f"{i}.png"), eng.preprocess, 64) for i in range(3)])
    assert x.shape == (3, 3, 64, 64) and ((got * ref.embed(x)).sum(1)).min() >= 0.99999


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(static_hw=(250, 256)), "not a multiple of the model stride 16"),
        (dict(opset=17), "opset 17 is not supported"),
        (dict(batch=0), "--batch must be >= 1"),
    ],
)
def test_refuses_what_it_cannot_honour(tmp_path: Path, exported: tuple[Path, Path], kwargs: dict, message: str) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(DToPError, match=message):
        export_onnx(exported[0], out, **kwargs)
    assert not out.exists()


def test_failed_export_leaves_nothing(
    tmp_path: Path, exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.onnx"

    def boom(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[:100])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="no space"):
        export_onnx(exported[0], out, static_hw=(64, 64), batch=1)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_nothing(
    tmp_path: Path, exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is written while the checker runs: a failed check still leaves no file and no temporary."""

    def reject(model: bytes) -> None:
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(onnx.checker.ValidationError, match="bad graph"):
        export_onnx(exported[0], tmp_path / "m.onnx", static_hw=(64, 64), batch=1)
    assert list(tmp_path.iterdir()) == []


def test_export_stages_are_reported(tmp_path: Path) -> None:
    result = export_onnx(_make_ckpt(tmp_path / "c.pt", whiten=False), tmp_path / "c.onnx")
    assert list(result.stage_seconds) == ["fold", "trace", "slim", "shapes", "check", "write"]
    assert all(v >= 0 for v in result.stage_seconds.values())
    assert sum(result.stage_seconds.values()) <= result.seconds + 0.01


def test_fast_export_pipeline_matches_the_libraries_defaults(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    """What the export does to be fast gives the same model as the plain library calls: (1) tracing once with
    height/width declared as multiples of the stride = ``torch.onnx.export`` of the module with free dims
    (which fails, refines and re-traces): same descriptors, bit for bit, and the same weights; (2) onnxslim
    without its own shape inference = onnxslim's defaults (same nodes, same initializers); (3) the strict
    shape inference on a weight-free view = on the whole model (same bytes), input left as it was; (4)
    onnxscript's optimiser less its SlicesSplit rule = the optimiser torch.onnx runs (same graph and weights)."""
    import onnx_ir as ir
    import onnxruntime as ort
    import onnxslim

    from dtop_export.export import _optimize, _trace, infer_shapes_weightless

    ckpt_path, onnx_path = exported
    ckpt = load_checkpoint(ckpt_path)
    deploy, _ = fold_for_deployment(ckpt.build_model(), ckpt.whitening)
    stride = ckpt.preprocess.stride
    free = {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=stride, max=16384 // stride * stride),
        3: torch.export.Dim("width", min=stride, max=16384 // stride * stride),
    }
    plain = torch.onnx.export(
        deploy,
        (torch.zeros(2, 3, 128, 128),),
        dynamo=True,
        input_names=["images"],
        output_names=["descriptors"],
        dynamic_shapes={"images": free},
        opset_version=18,
        optimize=True,
        verbose=False,
    ).model_proto
    plain_path = tmp_path / "plain.onnx"
    onnx.save_model(onnxslim.slim(plain), str(plain_path))
    ours = onnx.load(str(onnx_path))

    def weights(m: onnx.ModelProto) -> list[bytes]:
        return sorted(t.raw_data for t in m.graph.initializer if len(t.raw_data) >= 4096)

    assert weights(ours) == weights(onnx.load(str(plain_path)))
    rng = np.random.default_rng(0)
    a, b = ort.InferenceSession(str(onnx_path)), ort.InferenceSession(str(plain_path))
    for shape in [(1, 3, 64, 96), (3, 3, 128, 80)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert np.array_equal(a.run(None, {"images": x})[0], b.run(None, {"images": x})[0]), shape

    program = _trace(deploy, (128, 128), batch=None, dynamic_hw=True, stride=stride, opset=18)
    unoptimized = program.model_proto
    _optimize(program.model)
    raw = program.model_proto
    fast, full = onnxslim.slim(copy.deepcopy(raw), no_shape_infer=True), onnxslim.slim(copy.deepcopy(raw))
    assert _structure(fast) == _structure(full)
    assert list(fast.graph.initializer) == list(full.graph.initializer)

    before = fast.SerializeToString()
    strict = onnx.shape_inference.infer_shapes(fast, check_type=True, strict_mode=True, data_prop=True)
    assert infer_shapes_weightless(fast).SerializeToString() == strict.SerializeToString()
    assert fast.SerializeToString() == before

    # (4) onnxscript's optimiser without its SlicesSplit rule = torch.onnx's optimize=True, dynamic and static
    static = _trace(deploy, (64, 96), batch=1, dynamic_hw=False, stride=stride, opset=18).model_proto
    for traced, label in [(unoptimized, "dynamic"), (static, "static")]:
        ours, theirs = ir.serde.deserialize_model(traced), ir.serde.deserialize_model(traced)
        _optimize(ours)
        reference = torch.onnx.ONNXProgram(theirs, None)
        reference.optimize()
        a, b = onnxslim.slim(ir.serde.serialize_model(ours)), onnxslim.slim(reference.model_proto)
        assert _structure(a) == _structure(b), label
        assert list(a.graph.initializer) == list(b.graph.initializer), label


def _structure(m: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, list(n.input), list(n.output), list(n.attribute)) for n in m.graph.node]


def test_parse_hw() -> None:
    assert parse_hw("512x384") == (512, 384) and parse_hw("256") == (256, 256)
    with pytest.raises(DToPError):
        parse_hw("big")


def test_cli_onnx_and_info(tmp_path: Path) -> None:
    ckpt = _make_ckpt(tmp_path / "c.pt", whiten=False)
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "onnx", str(ckpt), "--static", "64x96"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "c.onnx"
    assert out.exists() and "wrote" in r.stdout and "not whitened" in r.stdout
    assert "note: a 64x96 export takes 64x96 tensors only" in " ".join(r.stdout.split()), r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "info", str(out), "--json"], capture_output=True, text=True
    )
    report = json.loads(r.stdout)
    assert report["metadata"]["static_hw"] == [64, 96] and report["metadata"]["whitening"]["applied"] is False
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "onnx", str(ckpt), "--static", "64x96"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--force" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "onnx", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--static", "60x96"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_full_preset_ort_matches_pytorch(full_export: tuple[Path, Path], batch: int) -> None:
    """The paper's R50+ViT-B/16 model: ORT parity in batch 1 at every shape but 1024x1024 (768x1024 already takes
    the 24x24 native grid to 64 along one axis; the small model, the same stride-16 hybrid, checks 1024x1024 in
    batch 1 and 4; here it would cost ~55 s of CI on 2 cores); batch 4 (the dynamic batch axis against reshapes
    that could mix images) at a landscape and a portrait shape (where a transposed reshape shows; batch 1 has the
    squares)."""
    ckpt, onnx_path = full_export
    ref, ort = _engines(ckpt, onnx_path)
    shapes = [s for s in PARITY_SHAPES if s != (1024, 1024)]
    for h, w in shapes if batch == 1 else [(384, 512), (640, 384)]:
        x = np.random.default_rng(h + w).standard_normal((batch, 3, h, w)).astype(np.float32)
        a, b = ref.embed(x), ort.embed(x)
        cos = (a * b).sum(1)
        assert cos.min() >= 0.99999, (h, w)
        assert np.abs(a - b).max() <= 1e-4, (h, w)
