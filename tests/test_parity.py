"""Parity: identical engines pass, a perturbed weight fails, contracts follow the precision, ONNX end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import NoisyEngine, TinyImageEngine, TruncatedEngine

from dtop_export.checkpoint import Whitening, load_checkpoint, new_provenance, save_checkpoint
from dtop_export.engines.pytorch import TorchEngine
from dtop_export.errors import DToPError
from dtop_export.model import build_model, get_preset
from dtop_export.parity import CONTRACTS, compare, contract_for, cosine_per_row, parity
from dtop_export.preprocess import PreprocessConfig, default_preprocess
from dtop_export.retrieval.datasets import RevisitopDataset, load_revisitop
from dtop_export.retrieval.sample_data import build_sample_dataset

# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity_data")
    build_sample_dataset(root)
    return root


@pytest.fixture(scope="module")
def sample(data_root: Path) -> RevisitopDataset:
    return load_revisitop(data_root, "sample")


@pytest.fixture(scope="module")
def ref_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small preset with non-trivial batchnorm statistics and whitening, so export folding is exercised."""
    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    n = model.descriptor_dim
    proj = torch.linalg.qr(torch.randn(n, n, generator=g))[0][: n // 2] * 3.0
    wh = Whitening(mean=torch.randn(n, generator=g) * 0.05, proj=proj, kind="lw")
    path = tmp_path_factory.mktemp("parity_ckpt") / "ref.pt"
    save_checkpoint(path, model, default_preprocess(model.cfg.backbone, model.stride), wh, new_provenance("test"))
    return path


def _perturbed_engine(ckpt_path: Path) -> TorchEngine:
    """The reference model with one weight tensor (the head's FC) perturbed by 10% of its scale."""
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.build_model()
    with torch.no_grad():
        w = model.head.fc.weight
        w.add_(0.1 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    return TorchEngine(model, ckpt.preprocess, ckpt.whitening)


# PyTorch vs PyTorch ----------------------------------------------------------------------------------


def test_identical_engines_pass(ref_ckpt: Path, sample: RevisitopDataset) -> None:
    ref, other = TorchEngine.from_checkpoint(ref_ckpt), TorchEngine.from_checkpoint(ref_ckpt)
    report = parity(ref, [other], sample, progress=False, image_size=128)
    e = report.engines[0]
    assert report.passed and e.passed and not e.failures()
    assert e.cosine_min >= 1 - 1e-6 and e.max_abs <= 1e-6 and e.topk_agreement == 1.0
    assert e.map == pytest.approx(report.reference["map"]) and all(abs(d) < 1e-9 for d in e.map_delta.values())
    assert {c.metric for c in e.checks} >= {"preprocess", "cosine_min", "max_abs", "map_delta_easy", "map_delta_hard"}
    table = report.table()
    assert "(reference)" in table and "PASS" in table and "FAIL" not in table
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["engines"][0]["contract"]["cosine_min"] == 0.99999


def test_perturbed_weight_fails(ref_ckpt: Path, sample: RevisitopDataset) -> None:
    ref = TorchEngine.from_checkpoint(ref_ckpt)
    report = parity(ref, [_perturbed_engine(ref_ckpt)], sample, progress=False, image_size=128)
    e = report.engines[0]
    assert not report.passed and not e.passed
    failing = {c.metric for c in e.checks if not c.passed}
    assert {"cosine_min", "max_abs"} <= failing and "preprocess" not in failing
    assert e.cosine_min < CONTRACTS["fp32"].cosine_min
    assert any(line.startswith("cosine_min ") and " < 0.99999" in line for line in e.failures())
    assert "FAIL" in report.table() and report.failures()[0].startswith(e.label)


# contracts (no model needed) -------------------------------------------------------------------------


def _synthetic(noise: float, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple, list[dict]]:
    """Reference descriptors with clear answers, and a copy with relative noise ``noise``."""
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db = unit(rng.normal(size=(50, 64)))
    q = unit(db[:5] + 0.05 * rng.normal(size=(5, 64)))
    gnd = [{"easy": [i], "hard": [i + 5], "junk": []} for i in range(5)]
    db[5:10] = unit(db[:5] + 0.5 * rng.normal(size=(5, 64)) / 8)  # hard views: further away, still nearest
    noisy = [unit(x + noise * rng.normal(size=x.shape) / 8) for x in (db, q)]
    return (db, q), (noisy[0], noisy[1]), gnd


@pytest.mark.parametrize(
    ("noise", "precision", "passes"),
    [
        (0.0, "fp32", True),
        (0.014, "fp32", False),  # cosine ~0.9999: too far for fp32 ...
        (0.014, "fp16", True),  # ... within fp16's 0.999
        (0.08, "fp16", False),  # cosine ~0.997
        (0.08, "int8", True),  # within int8's 0.99
    ],
)
def test_contract_depends_on_precision(noise: float, precision: str, passes: bool) -> None:
    ref, cand, gnd = _synthetic(noise)
    from dtop_export.retrieval.metrics import evaluate_descriptors

    ref_map = evaluate_descriptors(ref[0], ref[1], gnd)["map"]
    res = compare(ref, cand, gnd, contract_for(precision), ref_map, "candidate")
    assert all(abs(d) < 1e-9 for d in res.map_delta.values())  # rankings unchanged by the noise
    assert res.passed is passes, res.failures()
    assert ("max_abs" in {c.metric for c in res.checks}) is (precision == "fp32")
    if not passes:
        failing = {f.split()[0] for f in res.failures()}
        assert "cosine_min" in failing and failing <= {"cosine_min", "max_abs"}


def test_map_delta_is_checked() -> None:
    ref, _, gnd = _synthetic(0.0)
    from dtop_export.retrieval.metrics import evaluate_descriptors

    ref_map = evaluate_descriptors(ref[0], ref[1], gnd)["map"]
    swapped = (ref[0][[1, 0, *range(2, 50)]], ref[1])  # rows 0 and 1 exchanged: query 0 and 1 lose their match
    res = compare(ref, swapped, gnd, contract_for("int8"), ref_map, "swapped")
    assert not res.passed and "map_delta_easy" in {c.metric for c in res.checks if not c.passed}
    assert res.map_delta["easy"] < -1.0
    # the failure says where it comes from: two queries reordered by far more than the (zero) similarity error
    easy = res.rank_swaps["easy"]
    assert easy.queries == 2 and easy.pairs >= 2 and easy.largest_gap > 0.1
    failure = next(f for f in res.failures() if f.startswith("map_delta_easy"))
    assert "2 queries reordered" in failure and "near-ties" not in failure


def _images(similarities: list[float]) -> np.ndarray:
    """Unit vectors with the given similarity to the query e0, each off-axis part in its own direction."""
    db = np.zeros((len(similarities), len(similarities) + 1))
    for i, sim in enumerate(similarities):
        db[i, 0], db[i, i + 1] = sim, np.sqrt(1 - sim**2)
    return db


def _near_tie_pair() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[dict]]:
    """A negative the reference ranks 1e-4 above a positive, and an engine that moves one similarity by 2e-4."""
    q = np.eye(7)[:1]
    gnd = [{"easy": [0, 1], "hard": [3], "junk": []}]  # image 2 is a negative
    ref = (_images([0.9, 0.5, 0.5001, 0.1, 0.0, -0.2]), q)
    cand = (_images([0.9, 0.5002, 0.5001, 0.1, 0.0, -0.2]), q)
    return ref, cand, gnd


def test_map_delta_from_a_near_tie_is_explained() -> None:
    """The near-tie flip under a contract without the near-tie rule (INT8): the ΔmAP failure counts the flip,
    gives the gap and the engine's error, and calls it a near-tie."""
    from dtop_export.retrieval.metrics import evaluate_descriptors

    ref, cand, gnd = _near_tie_pair()
    ref_map = evaluate_descriptors(*ref, gnd)["map"]
    res = compare(ref, cand, gnd, contract_for("int8"), ref_map, "int8")
    swaps = res.rank_swaps["easy"]
    assert (swaps.queries, swaps.pairs) == (1, 1)
    assert swaps.largest_gap == pytest.approx(1e-4, rel=1e-6)
    assert res.similarity_error_rms == pytest.approx(2e-4 / np.sqrt(6), rel=1e-6)
    failure = next(f for f in res.failures() if f.startswith("map_delta_easy"))
    assert "1 query reordered, 1 positive/negative pair flipped, at most 1.0e-04 apart" in failure
    assert "near-ties" in failure
    assert res.to_dict()["rank_swaps"]["easy"]["pairs"] == 1
    assert res.rank_swaps["hard"].pairs == 0  # the hard positive's order is unchanged
    assert res.verdict().startswith("FAIL: ")


def test_fp16_contract_passes_a_near_tie_flip_with_the_label() -> None:
    """The same flip (ΔmAP -16.7 on this one query, far over 0.2) under the FP16 contract: every flip was closer
    in the reference than 3x the engine's similarity error, so it passes, labelled, with the flip named."""
    from dtop_export.retrieval.metrics import evaluate_descriptors

    ref, cand, gnd = _near_tie_pair()
    ref_map = evaluate_descriptors(*ref, gnd)["map"]
    for precision in ("fp16", "bf16"):
        res = compare(ref, cand, gnd, contract_for(precision), ref_map, precision)
        assert abs(res.map_delta["easy"]) > 10
        assert res.passed, res.failures()
        verdict = res.verdict()
        assert verdict.startswith("PASS, near-ties: E: 1 pair in 1 query, gap <= 1.0e-04 < 3 x 8.2e-05 rms"), verdict
        assert "; M: 1 pair in 1 query" in verdict  # Medium counts the same positive: the same flip
        assert res.to_dict()["near_ties"] == res.near_ties() and len(res.near_ties()) == 2
        assert res.to_dict()["verdict"] == verdict


def test_fp16_contract_fails_a_real_swap() -> None:
    """A flip the reference separated by more than 3 rms of the engine's error is a real swap: FAIL as before."""
    from dtop_export.retrieval.metrics import evaluate_descriptors

    q = np.eye(41)[:1]
    gnd = [{"easy": [0, 1], "hard": [], "junk": []}]
    sims = [0.9, 0.5, 0.45] + [0.1] * 37  # the negative (image 2) 0.05 below positive 1 in the reference
    ref = (_images(sims), q)
    moved = list(sims)
    moved[1] = 0.4  # the engine moves one similarity by 0.1: rms 0.1/sqrt(40) = 0.016, 3 rms 0.047 < gap 0.05
    cand = (_images(moved), q)
    ref_map = evaluate_descriptors(*ref, gnd)["map"]
    res = compare(ref, cand, gnd, contract_for("fp16"), ref_map, "fp16")
    assert res.rank_swaps["easy"].pairs == 1
    assert not res.passed and not res.near_ties()
    failure = next(f for f in res.failures() if f.startswith("map_delta_easy"))
    assert "near-ties" not in failure and res.verdict().startswith("FAIL: ")


def test_non_finite_descriptors_fail() -> None:
    ref, cand, gnd = _synthetic(0.0)
    cand[0][3, 0] = np.nan
    res = compare(ref, cand, gnd, contract_for("fp32"), {"easy": 0, "medium": 0, "hard": 0}, "nan")
    assert not res.passed and "finite" in {c.metric for c in res.checks if not c.passed}
    assert np.isnan(cosine_per_row(ref[0], cand[0])[3])


def test_unknown_precision_and_bad_reference() -> None:
    with pytest.raises(DToPError, match="no parity contract for precision 'fp8'"):
        contract_for("fp8")
    with pytest.raises(DToPError, match="must run in fp32"):
        parity(TinyImageEngine(precision="fp16"), [TinyImageEngine()], None)  # type: ignore[arg-type]


def test_wrong_dimension_and_preprocessing_fail(sample: RevisitopDataset) -> None:
    ref = TinyImageEngine()
    other_mean = TinyImageEngine(PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    report = parity(
        ref, [TinyImageEngine(), TruncatedEngine(TinyImageEngine(), 20), other_mean], sample, progress=False,
        image_size=64,
    )  # fmt: skip
    same, short, mean = report.engines
    assert same.passed
    assert not short.passed and [c.metric for c in short.checks if not c.passed] == ["descriptor_dim"]
    assert not mean.passed and [c.metric for c in mean.checks if not c.passed] == ["preprocess"]
    assert "mean" in mean.failures()[0]


def test_noisy_engine_is_judged_by_its_precision(sample: RevisitopDataset) -> None:
    ref = TinyImageEngine()
    report = parity(
        ref, [NoisyEngine(TinyImageEngine(), 0.01), NoisyEngine(TinyImageEngine(), 0.01, precision="int8")],
        sample, progress=False, image_size=64,
    )  # fmt: skip
    fp32, int8 = report.engines
    assert fp32.cosine_min < 0.99999 and not fp32.passed
    assert int8.cosine_min > 0.99
    assert {c.metric for c in int8.checks if not c.passed} <= {"map_delta_easy", "map_delta_medium", "map_delta_hard"}


# ONNX end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_pair(ref_ckpt: Path) -> tuple[Path, Path]:
    """The reference exported to ONNX, and a copy with one initializer corrupted."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from dtop_export.export import export_onnx

    good = ref_ckpt.with_name("ref.onnx")
    export_onnx(ref_ckpt, good)
    proto = onnx.load(str(good))
    inits = sorted(proto.graph.initializer, key=lambda t: -int(np.prod(t.dims)) if t.dims else 0)
    target = next(t for t in inits if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
    w = numpy_helper.to_array(target).copy()
    w += 0.5 * w.std() * np.random.default_rng(0).normal(size=w.shape).astype(w.dtype)
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    bad = ref_ckpt.with_name("corrupted.onnx")
    onnx.save(proto, str(bad))
    return good, bad


def test_onnx_passes_on_the_sample_set(ref_ckpt: Path, onnx_pair: tuple[Path, Path], sample: RevisitopDataset) -> None:
    from dtop_export.engines.ort import OnnxRuntimeEngine

    ref = TorchEngine.from_checkpoint(ref_ckpt)
    report = parity(ref, [OnnxRuntimeEngine(onnx_pair[0])], sample, progress=False)  # the set's 256 px
    e = report.engines[0]
    assert report.image_size == 256
    assert report.passed, e.failures()
    assert e.cosine_min >= 0.99999 and e.max_abs <= 1e-4
    assert all(abs(d) <= 0.05 for d in e.map_delta.values()) and e.topk_agreement == 1.0


def test_cli_parity_gates_a_corrupted_onnx(
    ref_ckpt: Path, onnx_pair: tuple[Path, Path], data_root: Path, tmp_path: Path
) -> None:
    good, bad = onnx_pair
    out = tmp_path / "parity.json"
    args = [str(ref_ckpt), str(good), str(bad), "--dataset", "sample", "--data-root", str(data_root)]
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "parity", *args, "--image-size", "128", "--json", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [line for line in r.stderr.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "corrupted.onnx" in fails[0]
    assert "cosine_min" in fails[0] or "max_abs" in fails[0]  # the failing metric is named
    assert "| engine |" in r.stdout and "(reference)" in r.stdout
    report = json.loads(out.read_text())
    assert [e["passed"] for e in report["engines"]] == [True, False] and report["passed"] is False
    assert report["engines"][1]["cosine_min"] < 0.99999


def test_cli_parity_refuses_an_onnx_of_another_checkpoint(
    ref_ckpt: Path, small_onnx: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ONNX exported from another checkpoint is named as such, up front (exit 2, one line, nothing computed):
    it failed after the whole run with its flips explained as near-ties."""
    from cli_helpers import cli

    from dtop_export.identity import checkpoint_of

    args = ["--dataset", "sample", "--data-root", str(data_root), "--image-size", "64", "--no-progress"]
    assert cli("parity", str(ref_ckpt), str(small_onnx), *args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith(f"error: {small_onnx} was exported from another checkpoint")
    assert checkpoint_of(small_onnx)[:12] in captured.err and checkpoint_of(ref_ckpt)[:12] in captured.err


@pytest.mark.slow
def test_full_preset_onnx_passes_on_the_sample_set(full_export: tuple[Path, Path], sample: RevisitopDataset) -> None:
    from dtop_export.engines.ort import OnnxRuntimeEngine

    ckpt, onnx_path = full_export
    onnx_engine = OnnxRuntimeEngine(onnx_path)
    report = parity(TorchEngine.from_checkpoint(ckpt), [onnx_engine], sample, progress=False, image_size=128)
    assert report.passed, report.failures()
    assert report.engines[0].cosine_min >= 0.99999 and report.engines[0].max_abs <= 1e-4


# the bf16 deployment path ----------------------------------------------------------------------------


def test_bf16_deployment_engine_meets_its_contract(ref_ckpt: Path, sample: RevisitopDataset) -> None:
    """Folded batchnorm, bf16 weights, channels-last: per-image cosine within the bf16 contract on the sample
    set, while the perturbed model (10% noise on one FC) is not, so the check can tell them apart. (mAP on a
    random-init model is too fragile for the 0.2-point bf16 contract: descriptors of different images are
    nearly parallel, and bf16 reorders them; the full preset measures |ΔmAP| <= 0.03, benchmarks/README.md.)"""
    ref = TorchEngine.from_checkpoint(ref_ckpt)
    fast = TorchEngine.from_checkpoint(ref_ckpt, precision="bf16")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    from dtop_export.engines.torch_deploy import Fp32Layer

    layers = [m for m in fast.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    edges = [m for m in layers if isinstance(m, Fp32Layer)]  # the first conv and the 3 FCs to descriptor space
    assert len(edges) == 4 and {m.weight.dtype for m in edges} == {torch.float32}
    assert len(layers) > 20 and {m.weight.dtype for m in layers if m not in edges} == {torch.bfloat16}
    res = parity(ref, [fast], sample, progress=False).engines[0]
    assert res.contract.precision == "bf16"
    cos = next(c for c in res.checks if c.metric == "cosine_min")
    assert cos.passed and 0.999 <= res.cosine_min < 1.0  # really computed in bf16, not a copy of the reference
    assert res.topk_agreement >= 0.8
    wrong = _perturbed_engine(ref_ckpt)
    wrong.precision = "bf16"
    bad = parity(ref, [wrong], sample, progress=False).engines[0]
    assert not next(c for c in bad.checks if c.metric == "cosine_min").passed


def test_fp16_products_round_like_the_fp16_kernels() -> None:
    """Inside ``fp16_cpu_products`` a float16 conv/linear is the float32 result on the same float16 operands,
    rounded once to float16 (not a float32 result passed through), and it agrees with PyTorch's own (slow)
    CPU float16 kernel to within one float16 step; float32 calls are left alone."""
    from torch.nn import functional as F

    from dtop_export.engines.pytorch import fp16_cpu_products

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 12, generator=g).half()
    w, b = (0.1 * torch.randn(8, 16, 3, 3, generator=g)).half(), torch.randn(8, generator=g).half()
    lw, lb = (0.1 * torch.randn(24, 16, generator=g)).half(), torch.randn(24, generator=g).half()
    xl = torch.randn(5, 16, generator=g).half()
    native_conv, native_lin = F.conv2d(x, w, b, padding=2, dilation=2), F.linear(xl, lw, lb)
    xa, wa = torch.randn(64, 768, generator=g).half(), (0.1 * torch.randn(768, 24, generator=g)).half()
    native_at = xa @ wa  # PyTorch's own kernel: not the once-rounded float32 product at this inner size
    with fp16_cpu_products():
        conv, lin = F.conv2d(x, w, b, padding=2, dilation=2), F.linear(xl, lw, lb)
        f32 = F.linear(xl.float(), lw.float(), lb.float())
        at, addmm = xa @ wa, torch.addmm(lb, xl, lw.T)  # `a @ b` is a Tensor method, not torch.matmul
    exact_conv = F.conv2d(x.float(), w.float(), b.float(), padding=2, dilation=2)
    exact_lin = F.linear(xl.float(), lw.float(), lb.float())
    assert conv.dtype == lin.dtype == torch.float16 and f32.dtype == torch.float32
    assert torch.equal(conv, exact_conv.half()) and torch.equal(lin, exact_lin.half())
    assert torch.equal(f32, exact_lin)
    assert torch.equal(at, (xa.float() @ wa.float()).half()) and torch.equal(addmm, exact_lin.half())
    assert not torch.equal(conv.float(), exact_conv)  # really rounded to float16
    for got, native in ((conv, native_conv), (lin, native_lin), (at, native_at)):
        step = torch.finfo(torch.float16).eps * native.float().abs().clamp_min(1e-3)
        assert torch.all((got.float() - native.float()).abs() <= step)


def test_fp16_engine_matches_pytorch_fp16_kernels() -> None:
    """``TorchEngine(precision="fp16")`` on the CPU gives the descriptors of ``model.half()`` run by PyTorch's
    own float16 kernels (cosine >= 0.99999), and differs from fp32 by FP16 rounding (not zero, within the
    fp16 contract)."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    pp = default_preprocess(model.cfg.backbone, model.stride)
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 128)).astype(np.float32)
    ref = TorchEngine(model, pp).embed(x)
    engine = TorchEngine(copy.deepcopy(model), pp, precision="fp16")
    out = engine.embed(x)
    with torch.inference_mode():
        native = F.normalize(engine.model(torch.from_numpy(x).half()).float(), dim=-1).numpy()
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.all(cosine_per_row(out, native) >= 0.99999)
    assert np.all(cosine_per_row(out, ref) >= 0.999) and np.abs(out - ref).max() > 1e-5


def test_compiled_bf16_engine_matches_eager() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    pp = default_preprocess(model.cfg.backbone, model.stride)
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 160)).astype(np.float32)
    ref = TorchEngine(model, pp).embed(x)
    compiled = TorchEngine(model, pp, precision="bf16", compile=True, dynamic=False)
    out = compiled.embed(x)
    assert compiled.describe()["compile"] == "default"
    assert out.shape == ref.shape and np.all(cosine_per_row(out, ref) >= 0.999)
    eager = TorchEngine(model, pp, precision="bf16").embed(x)
    assert np.all(cosine_per_row(out, eager) >= 0.9995)
    with pytest.raises(DToPError, match="compile must be"):
        TorchEngine(model, pp, compile="fastest")
