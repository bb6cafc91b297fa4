"""Shared inputs of the TensorRT / FP16 / checks tests: one small DToP export per test process, small
synthetic ONNX graphs, and the GPU skip condition."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def have_gpu_tensorrt() -> tuple[bool, str]:
    """(available, reason) for the ``gpu`` tests: CUDA and an importable TensorRT with its libraries."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch missing"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import tensorrt as trt

        trt.Builder  # noqa: B018 - the stub package has no Builder
    except Exception as e:  # noqa: BLE001
        return False, f"needs TensorRT (pip install 'dtop-export[cuda12]'): {e.__class__.__name__}"
    return True, ""


_ok, _why = have_gpu_tensorrt()
needs_gpu = pytest.mark.skipif(not _ok, reason=_why or "needs CUDA and TensorRT")

_TMP = Path(tempfile.mkdtemp(prefix="dtop-trt-tests-"))
atexit.register(shutil.rmtree, _TMP, True)


@functools.cache
def dtop_onnx(whiten: bool = True) -> Path:
    """The small preset (random weights, non-trivial BN statistics, whitening) exported by
    ``dtop_export.export.export_onnx``; built once per test process."""
    import torch

    from dtop_export.checkpoint import Whitening, new_provenance, save_checkpoint
    from dtop_export.export import export_onnx
    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    wh = None
    if whiten:
        n = model.descriptor_dim
        proj = torch.linalg.qr(torch.randn(n, n, generator=g))[0][: n // 2] * 3.0
        wh = Whitening(mean=torch.randn(n, generator=g) * 0.05, proj=proj, kind="lw")
    ckpt = _TMP / f"small_{int(whiten)}.pt"
    save_checkpoint(
        ckpt, model, default_preprocess(model.cfg.backbone, model.stride), whitening=wh, provenance=new_provenance("t")
    )
    out = _TMP / f"small_{int(whiten)}.onnx"
    export_onnx(ckpt, out, whiten=whiten)
    return out


def dtop_ckpt(whiten: bool = True) -> Path:
    """The checkpoint :func:`dtop_onnx` exported."""
    dtop_onnx(whiten)
    return _TMP / f"small_{int(whiten)}.pt"


@functools.cache
def sample_root() -> Path:
    """The embedded sample set (revisitop layout), built once per test process."""
    from dtop_export.retrieval.sample_data import build_sample_dataset

    return build_sample_dataset(_TMP / "data")


def sample_images(n: int) -> list[Path]:
    """``n`` photos of the sample set spread over its database."""
    paths = sorted((sample_root() / "jpg").glob("*.jpg"))
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


DTOP_META = {
    "dtop.stride": "16",
    "dtop.descriptor_dim": "16",
    "dtop.mean": "[0.5, 0.5, 0.5]",
    "dtop.std": "[0.5, 0.5, 0.5]",
}


def descriptor_model(overflow: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A tiny dtop-export-shaped graph: images [N,3,H,W] -> Conv 16x16/16 -> Relu -> ReduceMean(HW) -> Mul ->
    Gemm -> ReduceL2/Clip/Expand/Div -> descriptors [N,16]. ``overflow``: the conv activations sit around
    2e5 (> 65504, the FP16 maximum) and the Mul scales them back by 1e-5."""
    rng = np.random.default_rng(seed)
    scale, bias = (1000.0, 2e5) if overflow else (1.0, 0.0)
    w = (rng.standard_normal((8, 3, 16, 16)) * 0.05 * scale).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "conv.w"),
        numpy_helper.from_array(np.full(8, bias, np.float32), "conv.b"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "hw_axes"),
        numpy_helper.from_array(np.array(1e-5 if overflow else 1.0, np.float32), "rescale"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "fc.b"),
        numpy_helper.from_array(np.array([1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "conv.w", "conv.b"], ["conv"], name="stem_conv", strides=[16, 16]),
        helper.make_node("Relu", ["conv"], ["relu"], name="stem_relu"),
        helper.make_node("ReduceMean", ["relu", "hw_axes"], ["pooled"], name="gap", keepdims=0),
        helper.make_node("Mul", ["pooled", "rescale"], ["scaled"], name="rescale_mul"),
        helper.make_node("Gemm", ["scaled", "fc.w", "fc.b"], ["fc"], name="head_fc", transB=1),
        helper.make_node("ReduceL2", ["fc", "last_axis"], ["norm"], name="l2", keepdims=1),
        helper.make_node("Clip", ["norm", "eps"], ["clamped"], name="l2_clip"),
        helper.make_node("Shape", ["fc"], ["fc_shape"], name="fc_shape"),
        helper.make_node("Expand", ["clamped", "fc_shape"], ["den"], name="l2_expand"),
        helper.make_node("Div", ["fc", "den"], ["descriptors"], name="l2_div"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["batch", 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    for k, v in DTOP_META.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model, full_check=True)
    return model
