"""The TensorRT path's review fixes, decided on a CPU with fake ``tensorrt``/CUDA modules: device selection
before every TensorRT object, the CUDA-mismatch line, one logger per process, the timing-cache fallback,
trtexec lines per TensorRT version, the sidecar's fields, one execution context, empty batches, the extras
and the self-test's report, arguments and skip line. (The real builds are the ``gpu`` tests and
``dtop-export trt --self-test``.)"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomllib
from trt_helpers import descriptor_model, dtop_onnx

import dtop_export.engines.tensorrt.builder as builder_mod
import dtop_export.engines.tensorrt.install as install
import dtop_export.engines.tensorrt.runner as runner_mod
from dtop_export.engines.tensorrt.builder import load_timing_cache, plan_info
from dtop_export.engines.tensorrt.install import GpuInfo, process_logger
from dtop_export.engines.tensorrt.profiles import Profile, make_profiles
from dtop_export.engines.tensorrt.sidecar import PlanInfo, write_sidecar
from dtop_export.engines.tensorrt.trtexec import layer_spec, trtexec_command
from dtop_export.errors import DToPError
from dtop_export.pipeline.trt_selftest.gpu import check_io, island_precisions
from dtop_export.pipeline.trt_selftest.report import Check, SelfTestReport

ROOT = Path(__file__).resolve().parents[1]
# neither flavour importable (TensorRT-RTX is installed by the dev extra)
NO_TRT = (
    "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None; "
    "from dtop_export.cli import main; main(sys.argv[1:])"
)


def _fake_trt(version: str = "10.8.0.43", **attrs: object) -> types.ModuleType:
    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.ILogger = ILogger
    for k, v in attrs.items():
        setattr(trt, k, v)
    return trt


@pytest.fixture
def cuda_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.cuda.set_device/init replaced by recorders (no GPU needed)."""
    import torch

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(f"set_device({i})"))
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    return calls


# 1. device selection ------------------------------------------------------------------------------------


def test_build_selects_the_device_before_the_builder(monkeypatch: pytest.MonkeyPatch, cuda_calls: list[str]) -> None:
    def builder(logger: object) -> None:
        cuda_calls.append("Builder")
        raise TypeError("factory function returned nullptr")

    trt = _fake_trt(Builder=builder)
    monkeypatch.setattr(builder_mod, "resolve_flavour", lambda backend, named_target=False: install.TENSORRT)
    monkeypatch.setattr(
        builder_mod, "require_builder", lambda flavour, i, named_target=False: (trt, GpuInfo("Fake GPU", "9.0", i))
    )
    with pytest.raises(DToPError, match="could not create a builder"):  # the fake builder's failure, as one line
        builder_mod.build_engine(dtop_onnx(), Path("unused.plan"), device=1)
    assert cuda_calls == ["set_device(1)", "init", "Builder"]


def test_runner_selects_the_device_before_the_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_calls: list[str]
) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    write_sidecar(plan, _info())

    def runtime(logger: object) -> None:
        cuda_calls.append("Runtime")
        raise TypeError("factory function returned nullptr")

    trt = _fake_trt("10.8.0.43", Runtime=runtime)
    monkeypatch.setattr(
        runner_mod, "require_tensorrt_and_gpu", lambda i, flavour=None: (trt, GpuInfo("NVIDIA H100", "9.0", i))
    )
    with pytest.raises(DToPError, match="could not create a runtime"):
        runner_mod.TensorRTEngine(plan, device=1)
    assert cuda_calls == ["set_device(1)", "init", "Runtime"]


def test_a_device_past_the_gpu_count_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--device 1` (a runner's device=1) on a one-GPU machine was answered "no CUDA GPU is visible (device 1)" (the
    lead's brief): it names the GPUs there are, for a build and for a plan's run alike; "this machine has 1 CUDA GPU"
    where CUDA_VISIBLE_DEVICES hid the others, numbered from 0 (a review) -> what is visible, and that variable."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(install, "import_tensorrt", lambda flavour=install.TENSORRT: _fake_trt())
    monkeypatch.setattr(install, "installed_flavours", lambda: [install.TENSORRT, install.RTX])
    for flavour in (install.TENSORRT, install.RTX):
        with pytest.raises(DToPError, match=r"^device 1 does not exist: 1 CUDA GPU is visible \(0\)$"):
            install.require_tensorrt_and_gpu(1, flavour)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    info = _info()
    info.backend, info.gpu = "rtx", {"name": None, "compute_capability": "8.6", "target": "sm86"}
    write_sidecar(plan, info)
    with pytest.raises(DToPError) as e:
        runner_mod.TensorRTEngine(plan, device=1)
    assert str(e.value) == (
        f"{plan} was built with TensorRT-RTX 10.8.0.43 for sm86 (no GPU): device 1 does not exist: 1 CUDA GPU is "
        "visible (0)"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(
        DToPError, match=r"sm86 \(no GPU\): device 3 does not exist: 3 CUDA GPUs are visible \(0\.\.2\)$"
    ):
        runner_mod.TensorRTEngine(plan, device=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3,5")
    with pytest.raises(DToPError, match=r"^device 3 does not exist: 3 CUDA GPUs are visible \(0\.\.2\) "
                       r"\(CUDA_VISIBLE_DEVICES=1,3,5: visible GPUs are numbered from 0\)$"):  # fmt: skip
        install.require_tensorrt_and_gpu(3)


# While the build runs, TensorRT holds the main thread in C++ (SIGINT blocked there stands for it: Python's handler
# cannot run on it); sys.stderr is a pipe the main thread waits on without running Python.
CTRL_C_TWICE = """
import os, select, signal, sys
from pathlib import Path
from dtop_export.engines.tensorrt.watch import BuildWatch

r, w = os.pipe()
sys.stderr = open(w, "w")
watch = BuildWatch()
watch.kept.append(Path("m.sm86.plan"))
with watch.deferring_ctrl_c(), watch.building():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    os.kill(os.getpid(), signal.SIGINT)
    heard = select.select([r], [], [], 20)[0] and os.read(r, 1000)
    os.write(2, heard or b"nothing heard while TensorRT builds\\n")
    os.kill(os.getpid(), signal.SIGINT)
    select.select([], [], [], 20)
print("not aborted")
"""


def test_ctrl_c_during_a_build_is_answered_at_once_and_a_second_one_aborts(tmp_path: Path) -> None:
    """Ctrl-C during a build showed nothing until TensorRT's next step (Python runs its handler only then, in a
    callback), which may be minutes away on a big model, and there was no way to stop now (the lead's brief): a
    listener thread answers at once, and a second Ctrl-C while TensorRT builds exits 130 at once, naming the plans
    kept (nothing else is on disk: the build writes after TensorRT returns)."""
    r = subprocess.run([sys.executable, "-c", CTRL_C_TWICE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "not aborted" not in r.stdout, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        "stopping at TensorRT's next step (Ctrl-C again to abort now)",
        "interrupted: the TensorRT build was aborted; kept m.sm86.plan (each with its sidecar)",
    ]


def test_ctrl_c_outside_tensorrts_build_promises_no_abort(capsys: pytest.CaptureFixture[str]) -> None:
    """The first Ctrl-C always said "(Ctrl-C again to abort now)", also while a plan, its sidecar or the timing cache
    were being written, where a second one is ignored by design (a review): there it says the files are finished."""
    from dtop_export.engines.tensorrt.watch import BuildWatch

    watch = BuildWatch()
    watch._press()
    watch._press()  # ignored here: the files being written are finished first
    assert capsys.readouterr().err.splitlines() == [
        "stopping before TensorRT's next build (files being written are finished first)"
    ]
    assert watch.interrupted
    inside = BuildWatch()
    with inside.building():
        inside._press()
    assert capsys.readouterr().err.splitlines() == ["stopping at TensorRT's next step (Ctrl-C again to abort now)"]


def test_a_stop_names_the_old_plans_of_targets_not_reached(tmp_path: Path) -> None:
    """A `--force --target sm86,sm89` rebuild stopped after the first plan left the old sm89 plan (its sidecar
    describing the previous FP16 ONNX) beside the new files, unnamed (a review): the stop line names it."""
    from dtop_export.engines.tensorrt.watch import BuildWatch
    from dtop_export.errors import Interrupted

    plans = [tmp_path / f"m.{sm}.plan" for sm in ("sm86", "sm89", "sm120")]
    plans[1].write_bytes(b"old plan")  # sm120 was never built: nothing to name
    watch = BuildWatch(plans)
    assert watch.kept_line() == "no plan written"  # the old plans then all belong to the old build
    plans[0].write_bytes(b"new plan")
    watch.kept.append(plans[0])
    watch.interrupted = True
    with pytest.raises(Interrupted) as e:
        watch.stop_if_interrupted()
    assert str(e.value) == (
        f"the TensorRT build was stopped; kept {plans[0]} (each with its sidecar); the old {plans[1]} of targets not "
        "reached kept as they were: rebuild them"
    )


# 2. the CUDA mismatch, and the extras -------------------------------------------------------------------


def test_builder_nullptr_names_both_cuda_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    def builder(logger: object) -> None:
        raise TypeError("pybind11::init(): factory function returned nullptr")

    trt = _fake_trt("11.4.0.106", Builder=builder)
    monkeypatch.setattr(install, "tensorrt_cuda_major", lambda flavour=None: 13)
    monkeypatch.setattr(install, "driver_cuda_version", lambda: "12.8")
    with pytest.raises(DToPError) as e:
        install.create_builder(trt, object())
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 11.4.0.106 (built for CUDA 13)" in msg
    assert "driver supports CUDA up to 12.8" in msg and "pip install 'dtop-export[cuda12]'" in msg
    monkeypatch.setattr(install, "driver_cuda_version", lambda: None)
    with pytest.raises(DToPError, match="no NVIDIA driver"):
        install.create_runtime(_fake_trt(Runtime=lambda logger: None), object())


def test_tensorrt_cuda_major_from_the_installed_wheels(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    def dists(*names: str) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(metadata={"Name": n}) for n in names]

    monkeypatch.setattr(md, "distributions", lambda: dists("numpy", "tensorrt_cu12_libs", "tensorrt-cu12-bindings"))
    assert install.tensorrt_cuda_major() == 12
    monkeypatch.setattr(md, "distributions", lambda: dists("tensorrt-cu12", "tensorrt-cu13"))  # ambiguous
    assert install.tensorrt_cuda_major() is None


def test_extras_install_one_consistent_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cuda12"] == ["tensorrt-cu12>=10.0,<12"] and extras["cuda13"][0].startswith("tensorrt-cu13>=")
    flat = [req.split(">")[0].split("=")[0].split("<")[0] for reqs in extras.values() for req in reqs]
    # no unpinned metapackage (resolves to the newest CUDA), no package that fights the core onnxruntime,
    # nothing unused
    assert "tensorrt" not in flat and "onnxruntime-gpu" not in flat and "cuda-python" not in flat
    assert any(d.startswith("onnxruntime") for d in project["dependencies"])
    readme = (ROOT / "README.md").read_text()
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in readme
    assert "pip install -e '.[cuda12]'" in readme and "[cuda13]" in readme
    # TensorRT-RTX: the same CUDA split, real wheels; the dev extra pulls one so CI builds real plans
    assert extras["rtx-cuda12"][0].startswith("tensorrt-rtx-cu12>=") and extras["rtx-cuda13"][0].startswith(
        "tensorrt-rtx-cu13>="
    )
    assert any("rtx-cuda12" in d for d in extras["dev"]) and "'.[rtx-cuda12]'" in readme


# 4. timing cache ------------------------------------------------------------------------------------------


class _Config:
    """A builder config whose timing-cache calls behave like TensorRT's on good, foreign and corrupt blobs."""

    def __init__(self) -> None:
        self.set: list[bytes] = []

    def create_timing_cache(self, blob: bytes) -> object:
        if blob.startswith(b"corrupt"):
            raise RuntimeError("Assertion failed: magic number mismatch")
        return types.SimpleNamespace(blob=blob)

    def set_timing_cache(self, cache: types.SimpleNamespace, ignore_mismatch: bool) -> bool:
        if cache.blob.startswith(b"foreign"):
            return False
        self.set.append(cache.blob)
        return True


@pytest.mark.parametrize("blob", [b"corrupt cache", b"foreign device"])
def test_a_bad_timing_cache_falls_back_to_a_fresh_one(
    tmp_path: Path, blob: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(blob)
    config = _Config()
    with caplog.at_level(logging.WARNING, logger="dtop_export.engines.tensorrt"):
        load_timing_cache(config, path)
    assert config.set == [b""]
    assert any("timing cache" in r.getMessage() and "starting a new one" in r.getMessage() for r in caplog.records)


def test_a_good_or_missing_timing_cache_is_used_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "timing.cache"
    config = _Config()
    with caplog.at_level(logging.WARNING, logger="dtop_export.engines.tensorrt"):
        load_timing_cache(config, path)  # missing: a fresh cache
        path.write_bytes(b"good")
        load_timing_cache(config, path)
    assert config.set == [b"", b"good"] and not caplog.records


# 5. logger ------------------------------------------------------------------------------------------------


def test_one_logger_per_process_reset_between_operations() -> None:
    trt = _fake_trt()
    first = process_logger(trt)
    first.log(trt.ILogger.Severity.ERROR, "bad  thing\n happened")
    assert first.last_error == "bad thing happened"
    second = process_logger(trt, verbose=True)
    assert second is first and second.last_error == "" and second.verbose  # never a stale error
    second.log(trt.ILogger.Severity.WARNING, "just a warning")
    assert second.last_error == ""


# 7. trtexec per version -------------------------------------------------------------------------------------


def test_trtexec_line_uses_only_the_flags_of_its_version() -> None:
    profiles = make_profiles()
    line11 = shlex.split(trtexec_command("m.fp16.onnx", "m.plan", profiles, tf32=False, trt_major=11))
    removed_in_11 = ("--fp16", "--precisionConstraints", "--layerPrecisions", "--layerOutputTypes", "--stronglyTyped")
    assert not [a for a in line11 if a.split("=")[0] in removed_in_11]
    assert "--noTF32" in line11 and "--maxShapes=images:8x3x1024x1024" in line11
    line10 = shlex.split(trtexec_command("m.fp16.onnx", "m.plan", profiles, trt_major=10))
    assert "--stronglyTyped" in line10 and line10[:-1] == [a for a in line11 if a != "--noTF32"]
    with pytest.raises(DToPError, match="weak typing exists on TensorRT 10 only"):
        trtexec_command("m.onnx", "m.plan", profiles, typing="weak", trt_major=11)
    with pytest.raises(DToPError, match="--trt-version must be one of 10, 11"):
        trtexec_command("m.onnx", "m.plan", profiles, trt_major=9)
    assert layer_spec(["/blocks.1/norm1/LayerNormalization", "l2"]) == "/blocks.1/norm1/LayerNormalization:fp32,l2:fp32"
    with pytest.raises(DToPError, match="cannot express"):
        layer_spec(["a,b"])


def test_print_trtexec_cli_per_version(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(descriptor_model(), str(model))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", NO_TRT, "trt", str(model), *args], capture_output=True, text=True)

    default = run("--fp16", "--print-trtexec")  # no TensorRT here: the line is for 11
    assert default.returncode == 0, default.stderr
    assert "--stronglyTyped" not in default.stdout and "--fp16" not in default.stdout.replace(".fp16.onnx", "")
    ten = run("--fp16", "--print-trtexec", "--trt-version", "10", "--force")  # replaces the FP16 ONNX just written
    assert ten.returncode == 0 and "--stronglyTyped" in ten.stdout
    for args, message in [
        (("--fp16", "--weak-typing", "--print-trtexec"), "--weak-typing exists on TensorRT 10 only"),
        (("--fp16", "--weak-typing", "--print-trtexec", "--trt-version", "10"), "needs TensorRT 10 and a GPU here"),
        (("--print-trtexec", "--trt-version", "9"), "--trt-version must be one of 10, 11"),
        (("--trt-version", "10",), "--trt-version only applies to --print-trtexec"),
    ]:  # fmt: skip
        r = run(*args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# 8. sidecar -------------------------------------------------------------------------------------------------


def test_sidecar_records_tensorrts_cuda_and_the_built_files_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dtop_export.contract import read_metadata
    from dtop_export.fp16.convert import prepare_fp16_onnx

    fp16_path, islands = prepare_fp16_onnx(dtop_onnx(), tmp_path / "m.fp16.onnx")
    monkeypatch.setattr(builder_mod, "tensorrt_cuda_major", lambda flavour=None: 13)
    monkeypatch.setattr(builder_mod, "driver_cuda_version", lambda: "13.0")
    info = plan_info(
        install.TENSORRT,
        "11.4.0.106",
        builder_mod.built_for(GpuInfo("NVIDIA H200", "9.0", 0), None),
        make_profiles(),
        plan=tmp_path / "m.plan",
        precision={"mode": "fp16", "typing": "strong", "fp32_nodes": islands},
        onnx_path=dtop_onnx(),
        onnx_sha256="f" * 64,
        built_from=fp16_path,
        built_metadata=read_metadata(fp16_path),
        build={"seconds": 1.0},
        input_name="images",
        output_name="descriptors",
    )
    assert info.build["cuda"] == "13" and info.build["driver_cuda"] == "13.0" and info.build["seconds"] == 1.0
    assert info.onnx["sha256"] == "f" * 64
    assert info.metadata["dtop.precision"] == "fp16" and "dtop.fp16" in info.metadata  # the file TensorRT built
    assert read_metadata(dtop_onnx()).get("dtop.precision", "fp32") == "fp32"
    assert info.onnx["built_from"] == "m.fp16.onnx" and info.onnx_file(tmp_path / "m.plan", "built_from") == str(
        fp16_path
    )
    assert info.backend == "tensorrt" and info.gpu == {"name": "NVIDIA H200", "compute_capability": "9.0", "index": 0,
                                                       "target": None}  # fmt: skip


# 9. runner: one context, empty batches ------------------------------------------------------------------------


def _runner_without_gpu(profiles: list[Profile]) -> runner_mod.TensorRTEngine:
    """A TensorRTEngine whose TensorRT objects are recorders (no GPU): enough for context and batch logic."""
    calls: list[str] = []
    trt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(ON_PROFILE_CHANGE="opc"))

    class Context:
        def set_optimization_profile_async(self, k: int, stream: int) -> bool:
            calls.append(f"profile {k}")
            return True

    class CudaEngine:
        def create_execution_context(self, strategy: str) -> Context:
            calls.append(f"context {strategy}")
            return Context()

    eng = object.__new__(runner_mod.TensorRTEngine)
    eng._trt, eng.engine, eng.profiles = trt, CudaEngine(), profiles
    eng._ctx, eng._profile, eng.descriptor_dim, eng.stride = None, -1, 16, 16
    eng.runtime_cache = None  # a TensorRT plan (TensorRT-RTX: a runtime config with the runtime cache)
    eng._stream = types.SimpleNamespace(cuda_stream=0)
    eng._logger = types.SimpleNamespace(last_error="", reset=lambda: None)
    eng._run = lambda k, chunk: (eng._context(k), np.ones((chunk.shape[0], 16), np.float32))[1]  # type: ignore[method-assign]
    eng.calls = calls  # type: ignore[attr-defined]
    return eng


def test_runner_uses_one_context_sized_per_profile() -> None:
    small, large = (
        Profile((1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 128, 128)),
        Profile((1, 3, 256, 256), (1, 3, 256, 256), (2, 3, 512, 512)),
    )
    eng = _runner_without_gpu([small, large])
    eng.embed(np.zeros((3, 3, 64, 64), np.float32))
    eng.embed(np.zeros((3, 3, 512, 512), np.float32))  # split 2 + 1 (padded to the min of 1: no pad)
    eng.embed(np.zeros((1, 3, 128, 128), np.float32))
    assert eng.calls == ["context opc", "profile 1", "profile 0"]  # type: ignore[attr-defined]


def test_every_engine_answers_an_empty_batch(tmp_path: Path) -> None:
    from trt_helpers import dtop_ckpt

    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.engines.pytorch import TorchEngine

    empty = np.zeros((0, 3, 128, 128), np.float32)
    trt_engine = _runner_without_gpu([make_profiles()[0]])
    assert trt_engine.embed(empty).shape == (0, 16) and trt_engine.calls == []  # type: ignore[attr-defined]
    ort_engine = OnnxRuntimeEngine(dtop_onnx())
    out = ort_engine.embed(empty)
    assert out.shape == (0, ort_engine.descriptor_dim) and out.dtype == np.float32
    torch_engine = TorchEngine.from_checkpoint(dtop_ckpt())
    assert torch_engine.embed(empty).shape == (0, torch_engine.descriptor_dim)


# 10. lint wording --------------------------------------------------------------------------------------------


def test_check_names_both_tensorrt_versions() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dtop_export", "check", str(dtop_onnx()), "--target", "tensorrt"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "should parse on TensorRT 10.x and 11.x" in r.stdout, r.stdout + r.stderr


# the self-test ----------------------------------------------------------------------------------------------


def test_self_test_without_tensorrt_is_one_line_exit_2(tmp_path: Path) -> None:
    report = tmp_path / "selftest.json"
    r = subprocess.run(
        [sys.executable, "-c", NO_TRT, "trt", "--self-test", "--full", "--json", str(report)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    out = (r.stdout + r.stderr).strip().splitlines()
    assert len(out) == 1 and out[0].startswith("self-test cannot run: neither TensorRT nor TensorRT-RTX is installed")
    assert "Traceback" not in r.stderr and not report.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.onnx", "--self-test"], "--self-test takes no MODEL"),
        (["--self-test", "--print-trtexec"], "--self-test takes no MODEL, --target or --print-trtexec"),
        (["--self-test", "--target", "sm86"], "--self-test takes no MODEL, --target or --print-trtexec"),
        (["x.onnx", "--full"], "--full and --json belong to --self-test"),
        ([], "give the ONNX file to build"),
    ],
)
def test_self_test_arguments(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-c", NO_TRT, "trt", *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_self_test_report() -> None:
    env = {"tensorrt": "10.13.3.9", "gpu": {"name": "NVIDIA H100 80GB HBM3"}}
    rep = SelfTestReport(env, full=False)
    assert not rep.passed  # nothing ran
    rep.checks += [Check("build", "pass", "ok", 3.2), Check("islands", "skip", "Myelin", 0.1)]
    assert rep.passed
    assert (
        rep.verdict() == "self-test PASS: 1 passed, 0 failed, 1 skipped (TensorRT 10.13.3.9 on NVIDIA H100 80GB HBM3)"
    )
    rep.checks.append(Check("parity", "fail", "cos min 0.99 (>= 0.999)", 1.0, {"cosine_min": 0.99}))
    assert not rep.passed and rep.verdict().startswith("self-test FAIL: 1 passed, 1 failed, 1 skipped")
    table = rep.table().splitlines()
    assert table[0] == "| check | result | seconds | detail |" and "| parity | **FAIL** | 1.0 |" in table[-1]
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["passed"] is False and d["checks"][2]["data"] == {"cosine_min": 0.99} and d["environment"] == env


def test_self_test_io_and_island_checks() -> None:
    profiles = make_profiles(["1x3x128x128"], ["2x3x256x256"], ["4x3x384x384"])
    facts = {
        "tensors": {"images": {"mode": "input", "dtype": "FLOAT"}, "descriptors": {"mode": "output", "dtype": "FLOAT"}},
        "profiles": [[[1, 3, 128, 128], [2, 3, 256, 256], [4, 3, 384, 384]]],
    }
    assert check_io(facts, profiles) == []
    facts["tensors"]["descriptors"]["dtype"] = "HALF"
    facts["profiles"][0][2] = [8, 3, 384, 384]
    problems = check_io(facts, profiles)
    assert len(problems) == 2 and "descriptors is output HALF" in problems[0] and "profiles" in problems[1]

    nodes = ["ln1", "mm1", "l2_div", "soft"]
    inspector = {
        "Layers": [
            {"Name": "ln1", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
            {"Name": "mm1", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},  # not an island
            {"Name": "l2_div + soft", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
            {"Name": "{ForeignNode[mm1...soft]}", "Outputs": [{"Format/Datatype": "Half"}]},
            {"Name": "ln1 + mm1", "Outputs": [{"Format/Datatype": "Half"}]},  # mixed: a cast fused in
        ]
    }
    res = island_precisions(json.dumps(inspector), ["ln1", "l2_div", "soft"], nodes)
    assert res["checked"] == 2 and res["opaque"] == 1 and len(res["wrong"]) == 1
    assert res["wrong"][0].startswith("l2_div + soft")
    assert island_precisions(json.dumps({"Layers": ["ln1", "mm1"]}), ["ln1"], nodes)["checked"] == 0


def test_onnxruntime_conflict_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    versions = {"onnxruntime": "1.32.0"}

    def version(name: str) -> str:
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(md, "version", version)
    assert install.onnxruntime_conflict() is None
    versions["onnxruntime-gpu"] = "1.31.1"
    line = install.onnxruntime_conflict()
    assert line is not None and "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1" in line
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in line


@pytest.mark.parametrize("gpu_build_too", [False, True])
def test_a_missing_cuda_provider_says_to_replace_the_cpu_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gpu_build_too: bool
) -> None:
    """`MODEL.onnx:provider=cuda` on the base install said "install onnxruntime-gpu": done beside the core
    onnxruntime, the two packages overwrite each other's module and the CUDA provider still is not there. The line
    gives the README's swap (or the conflict's fix when both are installed already)."""
    import importlib.metadata as md

    import onnxruntime

    from dtop_export.engines.ort import OnnxRuntimeEngine

    versions = {"onnxruntime": "1.32.0"} | ({"onnxruntime-gpu": "1.32.0"} if gpu_build_too else {})

    def version(name: str) -> str:
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DToPError) as e:
        OnnxRuntimeEngine(tmp_path / "m.onnx", provider="cuda")
    msg = str(e.value)
    assert "no CUDAExecutionProvider" in msg and "\n" not in msg
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && " if gpu_build_too else "pip uninstall -y onnxruntime && "
    assert fix + "pip install onnxruntime-gpu" in msg


def _info() -> PlanInfo:
    return PlanInfo(
        tensorrt_version="10.8.0.43",
        gpu={"name": "NVIDIA H100", "compute_capability": "9.0"},
        profiles=[make_profiles()[0].to_dict()],
        precision={"mode": "fp16", "typing": "strong", "fp32_nodes": []},
        onnx={"path": "m.onnx", "sha256": "0" * 64},
        metadata={"dtop.stride": "16", "dtop.descriptor_dim": "16"},
    )


def test_whitening_stays_fp32_in_every_reduced_precision_artefact() -> None:
    """The whitening multiplies by P (cond(P) up to thousands when learned without shrinkage): it is an
    FP32 island of the FP16 ONNX and never among the nodes the INT8 plan quantises."""
    from dtop_export.contract import load_onnx
    from dtop_export.fp16.convert import convert_to_fp16, fp32_nodes_of, plan_fp32_islands
    from dtop_export.quantize import plan_quantization

    model = load_onnx(dtop_onnx())  # exported with a whitening
    whitening = [n for n, why in plan_fp32_islands(model).islands.items() if why == "whitening"]
    assert whitening, "the export's whitening was not found"
    fp16 = convert_to_fp16(load_onnx(dtop_onnx()))
    assert set(whitening) <= set(fp32_nodes_of(fp16))
    quant, _ = plan_quantization(load_onnx(dtop_onnx()))
    assert quant and not set(whitening) & set(quant)


def test_self_test_parity_uses_the_projects_comparator_and_contracts() -> None:
    """The self-test's parity rows are `parity.compare` under the engine precision's contract: an FP32
    engine off by 1e-3 fails the FP32 contract (max-abs 1e-4) and passes as FP16 (cos >= 0.999)."""
    from dtop_export.pipeline.trt_selftest.gpu import parity_check

    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(4)]

    class Fake:
        def __init__(self, precision: str, noise: float) -> None:
            self.precision, self.noise, self.label = precision, noise, f"fake {precision}"

        def embed(self, x: np.ndarray) -> np.ndarray:
            d = x.reshape(len(x), -1)[:, :64].astype(np.float64)
            d += self.noise * np.cos(np.arange(64))
            return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)

    ref = Fake("fp32", 0.0)
    assert parity_check(Fake("fp32", 0.0), ref, images)[0] == "pass"
    status, detail, data = parity_check(Fake("fp32", 1e-2), ref, images)
    assert status == "fail" and "max_abs" in detail and data["max_abs"] > 1e-4
    status, _, data = parity_check(Fake("fp16", 1e-2), ref, images)
    assert status == "pass" and data["contract_cosine"] == 0.999 and data["cosine_min"] >= 0.999
