"""TensorRT engine: profiles, batch splitting, sidecar, compatibility messages, trtexec line, the missing-
TensorRT error, and (``gpu``) a real build + run. The pure-logic tests fake the ``tensorrt`` module where they
need it; none of them claims a TensorRT result."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from trt_helpers import descriptor_model, dtop_onnx, needs_gpu, sample_images

import dtop_export.engines.tensorrt.install as trtmod
from dtop_export.engines import load_engine
from dtop_export.engines.tensorrt.install import GpuInfo
from dtop_export.engines.tensorrt.network import layer_owner, parser_error_lines, pin_layers_fp32
from dtop_export.engines.tensorrt.profiles import Profile, make_profiles, parse_shape, select_profile, split_batches
from dtop_export.engines.tensorrt.sidecar import PlanInfo, compatibility, read_sidecar, sidecar_path, write_sidecar
from dtop_export.engines.tensorrt.trtexec import trtexec_command
from dtop_export.errors import DToPError, ShapeError

EXE = [sys.executable, "-m", "dtop_export"]
# Runs the CLI with `import tensorrt` failing, whatever is installed on the machine.
# neither flavour importable (TensorRT-RTX is installed by the dev extra)
NO_TRT = (
    "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None; "
    "from dtop_export.cli import main; main(sys.argv[1:])"
)


# profiles -----------------------------------------------------------------------------------------------


def test_parse_shape() -> None:
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    assert parse_shape("images:8x3x1024x768") == (8, 3, 1024, 768)
    for bad in ("1x3x224", "0x3x224x224", "ax3x2x2", ""):
        with pytest.raises(DToPError, match="BxCxHxW"):
            parse_shape(bad)


def test_make_profiles_defaults_and_partial() -> None:
    (p,) = make_profiles()
    assert p == Profile((1, 3, 224, 224), (1, 3, 512, 512), (8, 3, 1024, 1024))
    (q,) = make_profiles(maxs=["4x3x768x768"])
    assert q.max == (4, 3, 768, 768) and q.min == (1, 3, 224, 224)
    two = make_profiles(
        ["1x3x224x224", "1x3x512x512"], ["1x3x384x384", "2x3x768x768"], ["4x3x512x512", "4x3x1024x1024"]
    )
    assert [x.opt for x in two] == [(1, 3, 384, 384), (2, 3, 768, 768)]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mins": ["1x3x224x224", "1x3x512x512"], "opts": ["1x3x384x384"], "maxs": ["4x3x512x512"]}, "2 times each"),
        ({"mins": ["2x3x224x224"], "opts": ["1x3x512x512"]}, "min <= opt <= max"),
        ({"opts": ["1x3x500x512"]}, "multiples of the model stride 16"),
        ({"mins": ["1x1x224x224"]}, "3 channels"),
    ],
)
def test_make_profiles_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(DToPError, match=needle):
        make_profiles(**kwargs)


def test_select_profile() -> None:
    small = Profile((1, 3, 224, 224), (1, 3, 384, 384), (8, 3, 512, 512))
    large = Profile((1, 3, 512, 512), (1, 3, 1024, 1024), (2, 3, 1024, 1024))
    assert select_profile([small, large], (3, 320, 256)) == 0
    assert select_profile([small, large], (3, 1024, 768)) == 1
    assert select_profile([small, large], (3, 512, 512)) == 0  # both hold it: opt 384² is closer than 1024²
    with pytest.raises(ShapeError, match=r"1280x512 is outside .*H 224\.\.512, W 224\.\.512; H 512\.\.1024"):
        select_profile([small, large], (3, 1280, 512))


def test_split_batches() -> None:
    assert split_batches(10, 1, 4) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert split_batches(5, 2, 4) == [(0, 4, 0), (4, 5, 1)]  # last chunk padded up to the profile's min batch
    assert split_batches(3, 1, 8) == [(0, 3, 0)]
    assert split_batches(0, 1, 8) == []
    covered = [i for a, b, _ in split_batches(37, 1, 8) for i in range(a, b)]
    assert covered == list(range(37))


# sidecar ------------------------------------------------------------------------------------------------


def _info(version: str = "10.3.0.26", gpu: str = "NVIDIA A100-SXM4-80GB", cc: str = "8.0") -> PlanInfo:
    return PlanInfo(
        tensorrt_version=version,
        gpu={"name": gpu, "compute_capability": cc, "index": 0},
        profiles=[make_profiles()[0].to_dict()],
        precision={"mode": "fp16", "typing": "strong", "tf32": True, "fp32_nodes": ["l2_div"]},
        onnx={"path": "model.onnx", "sha256": "ab" * 32},
        build={"seconds": 12.5, "built_at": "2025-01-01T00:00:00+00:00"},
        metadata={"dtop.stride": "16", "dtop.descriptor_dim": "16"},
    )


def test_sidecar_round_trip(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    info = _info()
    side = write_sidecar(plan, info)
    assert side == sidecar_path(plan) == tmp_path / "m.plan.json"
    back = read_sidecar(plan)
    assert back == info and back.profile_objects() == make_profiles()
    assert json.loads(side.read_text())["format"] == "dtop-export/tensorrt-plan"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_sidecar_onnx_paths_follow_linked_folders(tmp_path: Path) -> None:
    """The ONNX path was recorded and resolved lexically against the plan's folder, so a plan built through a linked
    folder, or read through a link to it, named the wrong ONNX (a review): real folders both ways now."""
    from dtop_export.engines.tensorrt.sidecar import onnx_record

    tmp_path = tmp_path.resolve()
    real = tmp_path / "data" / "x"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    onnx_file = tmp_path / "m.onnx"  # built as link/m.plan from m.onnx beside the link
    info = _info()
    info.onnx = onnx_record(tmp_path / "link" / "m.plan", onnx_file, onnx_file, "ab" * 32)
    for plan in (tmp_path / "link" / "m.plan", real / "m.plan"):  # read through the link or from the real folder
        assert info.onnx_file(plan) == str(onnx_file) and info.onnx_file(plan, "built_from") == str(onnx_file)
    release = tmp_path / "releases" / "v3"  # current.plan -> releases/v3/m.plan, its sidecar linked beside it
    release.mkdir(parents=True)
    info.onnx = onnx_record(release / "m.plan", release / "m.onnx", release / "m.onnx", "ab" * 32)
    write_sidecar(release / "m.plan", info)
    (tmp_path / "current.plan").symlink_to(release / "m.plan")
    (tmp_path / "current.plan.json").symlink_to(release / "m.plan.json")
    assert read_sidecar(tmp_path / "current.plan").onnx_file(tmp_path / "current.plan") == str(release / "m.onnx")


def test_info_describes_a_plan_from_its_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`info model.plan` needs neither TensorRT nor a GPU: it reads the sidecar."""
    from cli_helpers import cli

    plan = tmp_path / "m.plan"
    assert cli("info", str(plan)) == 2 and "engine file" in capsys.readouterr().err
    plan.write_bytes(b"\0" * 2048)
    assert cli("info", str(plan)) == 2 and "m.plan.json not found" in capsys.readouterr().err
    write_sidecar(plan, _info())
    assert cli("info", str(plan), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensorrt"] == "10.3.0.26" and report["gpu"]["name"] == "NVIDIA A100-SXM4-80GB"
    assert report["precision"]["fp32_nodes"] == ["l2_div"] and report["profiles"] == [make_profiles()[0].to_dict()]
    assert report["metadata"] == {"stride": 16, "descriptor_dim": 16}


def test_sidecar_errors(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    with pytest.raises(DToPError, match="m.plan.json not found.*dtop-export trt"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DToPError, match="not a dtop-export TensorRT sidecar"):
        read_sidecar(plan)
    d = _info().to_dict()
    d["format_version"] = 99
    sidecar_path(plan).write_text(json.dumps(d))
    with pytest.raises(DToPError, match="newer dtop-export"):
        read_sidecar(plan)


def test_compatibility_messages() -> None:
    info = _info()
    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
    assert compatibility(info, "10.3.0.26", a100) == (None, None)
    err, _ = compatibility(info, "10.8.0.43", a100)
    assert err and "built with TensorRT 10.3.0.26" in err and "TensorRT 10.8.0.43" in err and "rebuild" in err
    err, _ = compatibility(info, "10.3.0.26", GpuInfo("NVIDIA GeForce RTX 4090", "8.9"))
    assert err and "compute capability 8.0" in err and "RTX 4090" in err
    err, warn = compatibility(info, "10.3.0.26", GpuInfo("NVIDIA A100-PCIE-40GB", "8.0"))
    assert err is None and warn and "A100-PCIE" in warn


def _fake_trt(version: str) -> types.ModuleType:
    """Just enough of ``tensorrt`` for the runner to reach its compatibility check; deserialising fails loudly."""

    class Runtime:
        def __init__(self, logger: object) -> None:
            raise AssertionError("the runner must not deserialise a plan from another TensorRT")

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    return types.SimpleNamespace(__version__=version, Builder=object, Runtime=Runtime, ILogger=ILogger)


def test_runner_refuses_a_plan_from_another_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a real plan")
    write_sidecar(plan, _info(version="10.3.0.26"))
    monkeypatch.setattr(trtmod, "import_tensorrt", lambda flavour=None: _fake_trt("11.1.0.7"))
    monkeypatch.setattr(trtmod, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    with pytest.raises(DToPError, match=r"built with TensorRT 10\.3\.0\.26.*this machine has TensorRT 11\.1\.0\.7"):
        load_engine(plan)
    monkeypatch.setattr(trtmod, "import_tensorrt", lambda flavour=None: _fake_trt("10.3.0.26"))
    monkeypatch.setattr(trtmod, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(DToPError, match=r"built with TensorRT 10\.3\.0\.26 on NVIDIA A100.*8\.0.*H100.*9\.0"):
        load_engine(plan)


def test_missing_tensorrt_and_gpu_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    write_sidecar(plan, _info())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setattr(trtmod, "cuda_gpu", lambda index=0: None)
    with pytest.raises(DToPError, match=r"TensorRT is not installed and no CUDA GPU is visible.*\[cuda12\]"):
        load_engine(plan)
    monkeypatch.setattr(trtmod, "cuda_gpu", lambda index=0: GpuInfo("g", "8.0"))
    with pytest.raises(DToPError, match=r"m.plan was built with TensorRT 10.*: TensorRT is not installed: .*cuda12"):
        load_engine(plan)
    monkeypatch.setattr(trtmod, "import_tensorrt", lambda flavour=None: _fake_trt("10.3.0.26"))
    monkeypatch.setattr(trtmod, "cuda_gpu", lambda index=0: None)
    with pytest.raises(DToPError, match=r"no CUDA GPU is visible.*\[cuda12\]"):
        trtmod.require_tensorrt_and_gpu()


def test_trt_cli_without_tensorrt_is_one_line_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(descriptor_model(), str(model))
    r = subprocess.run([sys.executable, "-c", NO_TRT, "trt", str(model), "--fp16"], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: neither TensorRT nor TensorRT-RTX is installed")
    assert "pip install 'dtop-export[cuda12]'" in lines[0] and "'dtop-export[rtx-cuda12]'" in lines[0]
    assert not (tmp_path / "tiny.plan").exists() and not (tmp_path / "tiny.plan.json").exists()
    # option errors come first, as one line too
    r = subprocess.run(
        [sys.executable, "-c", NO_TRT, "trt", str(model), "--opt", "1x3x100x100"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "multiples of the model stride 16" in r.stderr and r.stderr.count("\n") == 1


# trtexec ------------------------------------------------------------------------------------------------


def test_trtexec_command_strong_and_weak() -> None:
    profiles = make_profiles(
        ["1x3x224x224", "1x3x512x512"], ["1x3x384x384", "2x3x768x768"], ["4x3x512x512", "4x3x1024x1024"]
    )
    cmd = trtexec_command(
        "m fp16.onnx", "m.plan", profiles, workspace_gb=2, timing_cache="tc.bin", tf32=False, trt_major=10
    )
    args = shlex.split(cmd)
    assert args[:3] == ["trtexec", "--onnx=m fp16.onnx", "--saveEngine=m.plan"]
    assert args.count("--minShapes=images:1x3x224x224") == 1 and "--maxShapes=images:4x3x1024x1024" in args
    assert "--memPoolSize=workspace:2048" in args and "--timingCacheFile=tc.bin" in args
    assert "--stronglyTyped" in args and "--noTF32" in args and "--fp16" not in args
    weak = shlex.split(
        trtexec_command("m.onnx", "m.plan", profiles[:1], typing="weak", fp32_layers=["ln_1", "l2"], trt_major=10)
    )
    assert "--fp16" in weak and "--precisionConstraints=obey" in weak and "--stronglyTyped" not in weak
    # exact layer names: a `ln_1*` wildcard would also pin ln_10, ln_11, ...
    assert "--layerPrecisions=ln_1:fp32,l2:fp32" in weak and "--layerOutputTypes=ln_1:fp32,l2:fp32" in weak


def test_print_trtexec_cli_writes_the_fp16_onnx(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(descriptor_model(), str(model))
    r = subprocess.run(
        [sys.executable, "-c", NO_TRT, "trt", str(model), "--fp16", "--print-trtexec", "--max", "4x3x512x512"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    fp16 = tmp_path / "tiny.fp16.onnx"
    args = shlex.split(r.stdout.strip())
    assert args[0] == "trtexec" and f"--onnx={fp16}" in args and "--maxShapes=images:4x3x512x512" in args
    meta = {p.key: p.value for p in onnx.load(str(fp16)).metadata_props}
    assert meta["dtop.precision"] == "fp16"


# weak-typing helpers against a fake network ---------------------------------------------------------------


def test_layer_owner() -> None:
    nodes = ["node_div", "node_div_1", "node_layer_norm", "gap"]
    assert layer_owner("node_div", nodes) == "node_div"
    assert layer_owner("node_div_1", nodes) == "node_div_1"  # the longer name wins
    assert layer_owner("node_div_2", nodes) == "node_div"  # a suffix the parser added
    assert layer_owner("node_layer_norm.reduce", nodes) == "node_layer_norm"
    assert layer_owner("gapx", nodes) is None and layer_owner("ONNXTRT_Broadcast", nodes) is None


def test_pin_layers_fp32_on_a_fake_network() -> None:
    f32, f16, i64 = "f32", "f16", "i64"
    kinds = types.SimpleNamespace(CONSTANT="constant", SHAPE="shape", ELEMENTWISE="elementwise")
    trt = types.SimpleNamespace(float32=f32, float16=f16, LayerType=kinds)

    class Tensor:
        def __init__(self, name: str, dtype: str, shape_tensor: bool = False) -> None:
            self.name, self.dtype, self.is_shape_tensor = name, dtype, shape_tensor

    class Layer:
        def __init__(self, name: str, outs: list[Tensor], kind: str = "elementwise") -> None:
            self.name, self.outs, self.precision, self.types = name, outs, None, {}
            self.num_outputs, self.type = len(outs), kind

        def get_output(self, j: int) -> Tensor:
            return self.outs[j]

        def set_output_type(self, j: int, dt: str) -> None:
            self.types[j] = dt

    layers = [
        Layer("ln", [Tensor("ln_out", f16)]),
        Layer("ln_2", [Tensor("t", f16)]),  # helper layer of node ln
        Layer("matmul", [Tensor("mm", f16)]),
        Layer("shape_of_ln", [Tensor("ln_shape", i64)]),  # an int layer is never pinned
        Layer("anon", [Tensor("l2", f16)]),  # found through its output tensor's name
        Layer("ln_3", [Tensor("ln_w", f16)], kind="constant"),  # Polygraphy's rule: constants stay as they are
        Layer("ln_4", [Tensor("ln_dims", f32, shape_tensor=True)]),  # and so do shape tensors
    ]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    pinned, unmatched = pin_layers_fp32(trt, net, ["ln", "l2", "gone"], ["ln", "matmul", "l2", "shape_of_ln", "gone"])
    assert pinned == ["ln", "ln_2", "anon"] and unmatched == ["gone"]
    assert layers[0].precision == f32 and layers[0].types == {0: f32}
    assert all(layers[i].precision is None for i in (2, 3, 5, 6))


def test_parser_error_lines() -> None:
    class Err:
        def __init__(self, **kw: object) -> None:
            self.kw = kw

        def __getattr__(self, name: str) -> object:
            if name in self.kw:
                return lambda: self.kw[name]
            raise AttributeError(name)

    errs = [
        Err(desc="Assertion failed: antialias\nnot supported", node_name="dpe_resize", node_operator="Resize", node=3),
        Err(desc="bad graph", node=-1),
        Err(desc="old binding", node=7),
    ]
    parser = types.SimpleNamespace(num_errors=3, get_error=lambda i: errs[i])
    assert parser_error_lines(parser) == [
        "node 'dpe_resize' (Resize): Assertion failed: antialias not supported",
        "graph: bad graph",
        "node #7: old binding",
    ]


# real TensorRT ------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("weak", [False, True])
def test_build_and_run_fp16_engine_on_gpu(tmp_path: Path, weak: bool) -> None:
    import tensorrt as trt

    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.engines.tensorrt.builder import build_engine
    from dtop_export.engines.tensorrt.install import version_tuple
    from dtop_export.engines.tensorrt.runner import TensorRTEngine
    from dtop_export.parity import cosine_per_row
    from dtop_export.preprocess import load_image, prepare

    if weak and version_tuple(trt.__version__)[0] != 10:
        pytest.skip(f"weak typing exists on TensorRT 10.x only (this is {trt.__version__})")
    src = dtop_onnx()
    plan, cache = tmp_path / "m.plan", tmp_path / "timing.cache"
    profiles = make_profiles(["1x3x128x128"], ["2x3x256x256"], ["4x3x384x384"])
    r = build_engine(src, plan, fp16=True, profiles=profiles, timing_cache=cache, weak_typing=weak, workspace_gb=2)
    assert plan.is_file() and cache.is_file() and r.sidecar.is_file()
    info = read_sidecar(plan)
    assert info.tensorrt_version == trt.__version__ and info.precision["mode"] == "fp16"
    assert info.precision["typing"] == ("weak" if weak else "strong") and info.profiles == [profiles[0].to_dict()]
    engine = load_engine(plan)
    assert isinstance(engine, TensorRTEngine) and engine.precision == "fp16"
    ref = OnnxRuntimeEngine(src)
    pp = ref.preprocess
    for size in (256, 384):
        imgs = [prepare(load_image(p), pp, size) for p in sample_images(12)]
        for shape in {x.shape for x in imgs}:
            x = np.stack([i for i in imgs if i.shape == shape])
            got = engine.embed(x)  # batches above 4 are split
            assert got.shape == (len(x), engine.descriptor_dim)
            assert cosine_per_row(ref.embed(x), got).min() >= 0.999
    with pytest.raises(ShapeError, match="outside the engine's optimization profile"):
        engine.embed(np.zeros((1, 3, 512, 512), np.float32))


@needs_gpu
@pytest.mark.gpu
def test_self_test_passes_on_this_gpu(tmp_path: Path) -> None:
    """The one-command acceptance: every check of `dtop-export trt --self-test` on the real TensorRT and GPU
    (the island inspection may be skipped when Myelin hides the layers; nothing may fail)."""
    from dtop_export.pipeline.trt_selftest import run_self_test

    report = tmp_path / "selftest.json"
    assert run_self_test(report_path=report, keep=tmp_path / "work") == 0
    d = json.loads(report.read_text())
    names = [c["name"] for c in d["checks"]]
    assert d["passed"] and len(names) >= 9 and not [c for c in d["checks"] if c["status"] == "fail"]
    assert {"FP16 parity vs ONNX Runtime", "corrupt timing cache falls back"} <= set(names)
