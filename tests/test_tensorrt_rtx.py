"""TensorRT-RTX: real ONNX parses and real plan builds on this GPU-less CPU for named architectures (the dev extra
installs it), the second TensorRT flavour behind one builder/runner, and what it cannot do here (run a plan).

The self-test's build half runs once per session (small preset, FP32 + FP16, sm86 + sm89) and its plans serve the
sidecar, info, runner and permission tests; the CLI tests build the tiny descriptor graph (about a second)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from trt_helpers import descriptor_model, dtop_onnx

import dtop_export.engines.tensorrt.install as install
from dtop_export.engines.tensorrt.install import RTX, TENSORRT, GpuInfo
from dtop_export.errors import DToPError

try:
    import tensorrt_rtx

    RTX_VERSION = tensorrt_rtx.__version__
except Exception:  # noqa: BLE001 - not installed, or its libraries do not load
    RTX_VERSION = ""

needs_rtx = pytest.mark.skipif(not RTX_VERSION, reason="needs TensorRT-RTX: pip install -e '.[rtx-cuda12]'")
CLI = [sys.executable, "-m", "dtop_export"]
TINY_PROFILE = ["--min", "1x3x64x64", "--opt", "2x3x128x128", "--max", "4x3x256x256"]


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    """``trt --self-test`` without a GPU: (exit code, JSON report, the folder holding its plans)."""
    from dtop_export.pipeline.trt_selftest import run_self_test

    if not RTX_VERSION:
        pytest.skip("needs TensorRT-RTX")
    work = tmp_path_factory.mktemp("selftest")
    report = work / "selftest.json"
    code = run_self_test(report_path=report, keep=work / "work")
    return code, json.loads(report.read_text()), work / "work"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(descriptor_model(), str(path))
    return path


# the self-test's build half ------------------------------------------------------------------------------------


@needs_rtx
def test_self_test_builds_for_real_and_says_what_it_did_not_run(selftest: tuple[int, dict, Path]) -> None:
    code, report, _ = selftest
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 3 and report["exit_code"] == 3  # everything that could run passed; GPU steps did not run
    assert report["targets"] == ["sm86", "sm89"] and report["environment"]["backend"] == "rtx"
    for name in (
        "export small model",
        "real ONNX parser",
        "build FP32 for sm86,sm89 (no GPU)",
        "build FP16 for sm86,sm89 (no GPU)",
        "FP32 islands in the parsed network (INetworkDefinition)",
        "sidecars",
        "runner refuses it here, in one line",
    ):
        assert status[name] == "pass", (name, report["checks"])
    not_run = [c for c in report["checks"] if c["status"] == "notrun"]
    assert {c["name"] for c in not_run} >= {"FP16 parity vs ONNX Runtime", "runtime cache saved and reused"}
    assert all(c["detail"].startswith("built, not run: needs a GPU") for c in not_run)
    assert report["verdict"].startswith("self-test PASS (built, not run: needs a GPU): 7 passed, 0 failed")
    assert f"TensorRT-RTX {RTX_VERSION} on no usable GPU; built for sm86, sm89" in report["verdict"]


@needs_rtx
def test_plans_and_sidecars_record_backend_targets_islands_and_hash(selftest: tuple[int, dict, Path]) -> None:
    from dtop_export.atomic import new_file_mode
    from dtop_export.digest import file_sha256
    from dtop_export.engines.tensorrt.sidecar import read_sidecar

    _, _, work = selftest
    digest = file_sha256(work / "small.onnx")
    for mode in ("fp32", "fp16"):
        for sm, cc in (("sm86", "8.6"), ("sm89", "8.9")):
            plan = work / f"{mode}.{sm}.plan"
            info = read_sidecar(plan)
            assert plan.stat().st_size > 1_000_000 and (plan.stat().st_mode & 0o777) == new_file_mode()
            assert info.backend == "rtx" and info.tensorrt_version == RTX_VERSION
            assert info.gpu["target"] == sm and info.gpu["compute_capability"] == cc and info.gpu["name"] is None
            assert info.onnx["sha256"] == digest and info.profiles == [
                {"min": [1, 3, 128, 128], "opt": [2, 3, 256, 256], "max": [4, 3, 384, 384]}
            ]
            net = info.precision["network"]
            assert not net["violations"]
            if mode == "fp16":  # the islands FP32, everything else FP16, read from the INetworkDefinition
                assert len(info.precision["fp32_nodes"]) == net["islands_seen"] >= 30
                assert net["fp16_layers"] > 200 and net["fp32_layers"] == net["island_layers"] > 0
                assert info.metadata["dtop.precision"] == "fp16"
            else:
                assert net["fp16_layers"] == 0 and net["fp32_layers"] > 200 and not info.precision["fp32_nodes"]


@needs_rtx
def test_info_shows_the_backend_and_target(selftest: tuple[int, dict, Path]) -> None:
    r = run("info", selftest[2] / "fp16.sm89.plan")
    assert r.returncode == 0, r.stderr
    assert f"built_with: TensorRT-RTX {RTX_VERSION} for sm89 (no GPU)" in r.stdout
    assert "backend: TensorRT-RTX" in r.stdout and "Ada: RTX 40xx" in r.stdout


@needs_rtx
def test_runner_refuses_a_plan_it_cannot_run_in_one_line(
    selftest: tuple[int, dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dtop_export.engines import load_engine
    from dtop_export.engines.tensorrt.sidecar import read_sidecar, sidecar_path, write_sidecar

    plan = selftest[2] / "fp16.sm86.plan"
    with pytest.raises(DToPError) as e:  # this machine: no GPU
        load_engine(plan)
    msg = str(e.value)
    assert "\n" not in msg and f"built with TensorRT-RTX {RTX_VERSION} for sm86 (no GPU)" in msg
    # where it runs, not the builder's "name its architecture: --target" hint (an audit)
    assert "no CUDA GPU is visible (device 0); run it on a GPU of compute capability 8.6, Ampere" in msg
    assert "--target" not in msg
    # on a GPU of another architecture: refused before TensorRT deserialises anything
    monkeypatch.setattr(install, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA GeForce RTX 4090", "8.9", index))
    with pytest.raises(DToPError, match=r"for sm86 \(no GPU\); this GPU .*RTX 4090 .*8\.9\).*--target sm89"):
        load_engine(plan)
    # on Hopper: TensorRT-RTX has no kernels there
    monkeypatch.setattr(install, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA H200", "9.0", index))
    with pytest.raises(DToPError, match=r"H200 \(compute capability 9\.0\) is not supported by TensorRT-RTX.*"
                       r"Hopper \(H100/H200\) needs TensorRT proper.*\[cuda12\]"):  # fmt: skip
        load_engine(plan)
    # built by another TensorRT-RTX version
    copy = plan.with_name("other.plan")
    copy.write_bytes(b"x")
    info = read_sidecar(plan)
    info.tensorrt_version = "1.6.1.120"
    info.build.pop("plan_bytes")  # a stand-in plan of 1 byte: its size is not what this checks
    write_sidecar(copy, info)
    monkeypatch.setattr(install, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA RTX A6000", "8.6", index))
    with pytest.raises(DToPError, match=r"built with TensorRT-RTX 1\.6\.1\.120.*has TensorRT-RTX " + RTX_VERSION):
        load_engine(copy)
    sidecar_path(copy).unlink()
    copy.unlink()


@needs_rtx
def test_the_rebuild_hint_names_the_onnx_from_any_folder(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar recorded the ONNX path relative to the folder the build ran in, so the hint to rebuild a plan named
    a file that is not there from any other folder (the lead's brief) -> paths relative to the plan's folder, resolved
    when read (also after the folder moved with its ONNX); an older sidecar's path is given as recorded."""
    from cli_helpers import cli

    from dtop_export.engines import load_engine
    from dtop_export.engines.tensorrt.sidecar import sidecar_path

    for folder in ("models", "elsewhere"):
        (tmp_path / folder).mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(tiny.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert cli("trt", "models/m.onnx", "--fp16", *TINY_PROFILE, "--target", "sm86") == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(install, "cuda_gpu", lambda index=0: GpuInfo("NVIDIA GeForce RTX 4090", "8.9", index))
    with pytest.raises(DToPError) as e:
        load_engine("../models/m.plan")
    hint = re.search(r"`dtop-export trt (\S+) --target sm89`", str(e.value))
    assert hint and Path(hint[1]).resolve() == (tmp_path / "models" / "m.onnx").resolve(), str(e.value)
    (tmp_path / "models").rename(tmp_path / "moved")
    with pytest.raises(DToPError, match=re.escape(f"`dtop-export trt {tmp_path / 'moved' / 'm.onnx'} --target sm89`")):
        load_engine("../moved/m.plan")
    capsys.readouterr()
    assert cli("info", "../moved/m.plan", "--json") == 0
    onnx_info = json.loads(capsys.readouterr().out)["onnx"]
    assert onnx_info["path"] == str(tmp_path / "moved" / "m.onnx")
    assert onnx_info["built_from"] == str(tmp_path / "moved" / "m.fp16.onnx") and "relative_to" not in onnx_info
    side = sidecar_path(tmp_path / "moved" / "m.plan")  # written before: relative to where the build ran
    old = json.loads(side.read_text())
    old["onnx"] = {"path": "models/m.onnx", "sha256": old["onnx"]["sha256"]}
    side.write_text(json.dumps(old))
    with pytest.raises(DToPError, match=re.escape("`dtop-export trt models/m.onnx --target sm89`")):
        load_engine("../moved/m.plan")


# the CLI -------------------------------------------------------------------------------------------------------


@needs_rtx
def test_trt_cli_builds_one_plan_per_target(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "tiny.plan"
    r = run("trt", tiny, "--fp16", "--target", "sm86,sm120", *TINY_PROFILE, "-o", out)
    assert r.returncode == 0, r.stderr
    for sm in ("sm86", "sm120"):
        plan = tmp_path / f"tiny.{sm}.plan"
        assert plan.stat().st_size > 0 and f"wrote {plan}" in r.stdout
        side = json.loads((tmp_path / f"tiny.{sm}.plan.json").read_text())
        assert side["backend"] == "rtx" and side["gpu"]["target"] == sm and side["precision"]["mode"] == "fp16"
    assert (tmp_path / "tiny.fp16.onnx").is_file() and not out.exists()
    assert "built, not run here" in r.stdout
    # a second run does not overwrite without --force, in one line, before building
    r = run("trt", tiny, "--fp16", "--target", "sm86,sm120", *TINY_PROFILE, "-o", out)
    both = f"{tmp_path / 'tiny.sm86.plan'}, {tmp_path / 'tiny.sm120.plan'}"
    assert r.returncode == 2 and r.stderr.strip() == f"error: {both} exist: pass --force to overwrite them"


@needs_rtx
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no CUDA GPU is visible (device 0): TensorRT-RTX runs engines on an NVIDIA GPU; to build one here for a "
             "GPU elsewhere, name its architecture: --target sm86"),
        (("--target", "sm90"), "TensorRT-RTX cannot build for compute capability 9.0, Hopper (H100, H200, GH200)"),
        (("--target", "sm86,sm86"), "--target names sm86 twice"),
        (("--target", "ampere"), "cannot read --target 'ampere'"),
        (("--target", "sm86", "--max", "8x3x1000x1000"), "multiples of the model stride 16"),
        (("--target", "sm86", "--opt", "1x3x2048x2048"), "need min <= opt <= max"),
        (("--target", "sm86", "--timing-cache", "t.cache"), "TensorRT-RTX has no builder timing cache"),
        (("--target", "sm86", "--weak-typing"), "TensorRT-RTX builds strongly typed only"),
        (("--target", "sm86", "--backend", "tensorrt"), "without a GPU, which TensorRT cannot"),
        (("--backend", "trt"), "unknown --backend 'trt'"),
        (("--target", "sm86", "--print-trtexec"), "--print-trtexec prints TensorRT's trtexec line"),
    ],
)  # fmt: skip
def test_trt_cli_refuses_in_one_line_and_writes_nothing(
    tmp_path: Path, tiny: Path, args: tuple[str, ...], message: str
) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny.read_bytes())
    extra = ("--fp16",) if "--weak-typing" in args else ()
    r = subprocess.run([*CLI, "trt", str(src), *extra, *args], capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_rtx
def test_check_reports_the_real_parsers_errors(tmp_path: Path) -> None:
    """A planted antialiased Resize (the DPE's, as timm exports it): TensorRT-RTX's real parser names it in one
    line; the project's lint agrees as a second opinion; a clean export parses."""
    model = onnx.load(str(dtop_onnx()))
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    for a in resize.attribute:
        if a.name == "antialias":
            a.i = 1
            break
    else:
        resize.attribute.append(onnx.helper.make_attribute("antialias", 1))
    bad = tmp_path / "aa.onnx"
    onnx.save(model, str(bad))
    r = run("check", bad, "--target", "tensorrt", "--json", tmp_path / "check.json")
    assert r.returncode == 1
    parser_lines = [line for line in r.stdout.splitlines() if line.startswith(f"TensorRT-RTX {RTX_VERSION} parser:")]
    assert len(parser_lines) == 1 and f"error {resize.name} (Resize):" in parser_lines[0]
    assert "Antialiasing is not supported" in parser_lines[0] and "ModelImporter" not in r.stdout + r.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    sources = {i["source"] for i in report["tensorrt"] if i["node"] == resize.name}
    assert sources == {"lint", f"TensorRT-RTX {RTX_VERSION} parser"}
    assert report["tensorrt_parser"]["parser"] == f"TensorRT-RTX {RTX_VERSION} ONNX parser"
    r = run("check", dtop_onnx(), "--target", "tensorrt")
    assert r.returncode == 0 and f"TensorRT-RTX {RTX_VERSION} ONNX parser: parsed" in r.stdout, r.stdout + r.stderr


# what the build proves ------------------------------------------------------------------------------------------


@needs_rtx
def test_build_refuses_a_network_whose_islands_are_not_fp32(tmp_path: Path) -> None:
    """A planted fault: an FP16 ONNX whose metadata names the LayerNorms as FP32 islands but whose types make
    them FP16 (a converter bug). The parsed INetworkDefinition shows it: the build refuses in one line, no plan."""
    from dtop_export.contract import metadata_of, set_metadata
    from dtop_export.engines.tensorrt.builder import build_engine
    from dtop_export.fp16.convert import DEFAULT_KEEP_FP32_OPS, convert_to_fp16, fp32_nodes_of

    src = onnx.load(str(dtop_onnx()))
    honest = convert_to_fp16(src, DEFAULT_KEEP_FP32_OPS)
    lying = convert_to_fp16(src, [op for op in DEFAULT_KEEP_FP32_OPS if op != "LayerNormalization"])
    lying_islands = set(fp32_nodes_of(lying))
    assert not any("layer_norm" in n for n in lying_islands)
    set_metadata(lying, {"dtop.fp16": metadata_of(honest)["dtop.fp16"]})  # claims the LayerNorms
    path = tmp_path / "lying.fp16.onnx"
    onnx.save(lying, str(path))
    with pytest.raises(DToPError) as e:
        build_engine(path, tmp_path / "x.plan", target="sm86", fp16=True)
    msg = str(e.value)
    assert "\n" not in msg and "does not compute in the precision the FP16 contract needs" in msg
    assert "layer_norm" in msg and "computes FP16, an FP32 island: expected FP32" in msg
    assert not (tmp_path / "x.plan").exists() and not (tmp_path / "x.plan.json").exists()


@needs_rtx
def test_network_precision_reads_the_parsed_network() -> None:
    """The check itself, on the real parsed network of the tiny graph: FP32 throughout as exported; judged as an
    FP16 build every compute layer is flagged; an FP16 conversion passes with its islands."""
    from dtop_export.engines.tensorrt.network import network_precision
    from dtop_export.fp16.convert import DEFAULT_KEEP_FP32_OPS, convert_to_fp16, fp32_nodes_of, name_nodes

    def parse(model: onnx.ModelProto) -> tuple[object, list[tuple[str, str]]]:
        name_nodes(model)
        logger = tensorrt_rtx.Logger(tensorrt_rtx.Logger.ERROR)
        builder = tensorrt_rtx.Builder(logger)
        network = builder.create_network(0)
        parser = tensorrt_rtx.OnnxParser(network, logger)
        assert parser.parse(model.SerializeToString())
        parse.keep = (builder, parser)  # type: ignore[attr-defined]
        return network, [(n.name, n.op_type) for n in model.graph.node]

    fp32 = descriptor_model()
    network, nodes = parse(fp32)
    ok = network_precision(tensorrt_rtx, network, [], nodes, fp16=False)
    assert ok.ok and ok.fp32_layers >= 5 and ok.fp16_layers == 0
    wrong = network_precision(tensorrt_rtx, network, [], nodes, fp16=True)
    assert not wrong.ok and any("stem_conv" in v and "expected FP16" in v for v in wrong.violations)
    half = convert_to_fp16(fp32, DEFAULT_KEEP_FP32_OPS)
    network, nodes = parse(half)
    islands = fp32_nodes_of(half)
    res = network_precision(tensorrt_rtx, network, islands, nodes, fp16=True)
    assert res.ok and res.fp16_layers >= 3 and res.islands_seen == len(islands) > 0


@needs_rtx
@pytest.mark.slow
def test_full_preset_fp16_builds_for_one_target(tmp_path: Path, full_export: tuple[Path, Path]) -> None:
    """r50-vitb16 FP16 (the paper's model) for sm86 at the default profile (1x3x224² .. 8x3x1024²)."""
    from dtop_export.engines.tensorrt.builder import build_engine

    _, onnx_path = full_export
    r = build_engine(
        onnx_path, tmp_path / "r50.plan", fp16=True, target="sm86", fp16_onnx_path=tmp_path / "r50.fp16.onnx"
    )
    net = r.info.precision["network"]
    assert not net["violations"] and net["islands_seen"] == len(r.info.precision["fp32_nodes"]) > 50
    assert r.size_bytes > 150 * 2**20 and r.info.profiles[0]["max"] == [8, 3, 1024, 1024]


@needs_rtx
@pytest.mark.parametrize("stopped", [1, 2])
def test_ctrl_c_stops_a_build_at_once_and_writes_nothing(
    tmp_path: Path, tiny: Path, caplog: pytest.LogCaptureFixture, stopped: int
) -> None:
    """Ctrl-C while TensorRT builds arrives while TensorRT runs Python in a callback (its logger here): the old
    builder raised KeyboardInterrupt in there, TensorRT caught it ("Exception caught in log()"), finished the
    build and the plan was written, exit 0 (an audit, by hand). Now the build stops at TensorRT's next step,
    nothing more is written (plans of earlier targets stay whole), TensorRT's BuildCanceled error is not shown,
    and progress names TensorRT's phases."""
    import logging
    import os
    import signal

    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.targets import parse_targets
    from dtop_export.errors import Interrupted

    heard: list[str] = []
    sent: list[int] = []

    class CtrlC(logging.Handler):  # the user's Ctrl-C, sent from inside build number `stopped` (its first log line)
        def emit(self, record: logging.LogRecord) -> None:
            if any(f"({stopped}/2)" in h for h in heard) and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)

    trt_log = logging.getLogger("dtop_export.engines.tensorrt")
    caplog.set_level(logging.INFO, logger=trt_log.name)
    handler = CtrlC()
    trt_log.addHandler(handler)
    plans = [tmp_path / "tiny.sm86.plan", tmp_path / "tiny.sm89.plan"]
    profiles = make_profiles(*([s] for s in TINY_PROFILE[1::2]), stride=16)
    kept = "no plan written" if stopped == 1 else f"kept {plans[0]} (each with its sidecar)"
    try:
        with pytest.raises(Interrupted, match=f"^the TensorRT build was stopped; {re.escape(kept)}$"):
            build_engines(tiny, plans, targets=parse_targets("sm86,sm89"), profiles=profiles, verbose=True,
                          on_build=heard.append)  # fmt: skip
    finally:
        trt_log.removeHandler(handler)
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    left = [] if stopped == 1 else ["tiny.sm86.plan", "tiny.sm86.plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    assert any(": " in h for h in heard), heard  # "building the ... (1/2): Building engine (1/6)"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "BuildCanceled" in r.getMessage()]


@needs_rtx
def test_sigterm_stops_a_trt_build_exit_143_and_writes_nothing(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM (`timeout`, `docker stop`) while TensorRT builds: the CLI's handler raised Interrupted inside a
    TensorRT callback, TensorRT swallowed it and the plan was written, exit 0 (a review), where before the CLI had a
    SIGTERM handler the process died with nothing written. Now it stops the build as Ctrl-C does: exit 143, no plan,
    and the handlers are the CLI's again afterwards."""
    import os
    import signal

    from dtop_export.cli import main
    from dtop_export.engines.tensorrt import watch

    sent: list[str] = []
    say = watch.BuildWatch._say

    def term_in_build(self: watch.BuildWatch, text: str) -> None:  # TensorRT's first phase: the build is under way
        if not sent:
            sent.append(text)
            os.kill(os.getpid(), signal.SIGTERM)
        say(self, text)

    monkeypatch.setattr(watch.BuildWatch, "_say", term_in_build)
    before = signal.getsignal(signal.SIGTERM)
    plan = tmp_path / "tiny.plan"
    with pytest.raises(SystemExit) as e:
        main(["trt", str(tiny), "--target", "sm86", *TINY_PROFILE, "-o", str(plan), "--no-progress"])
    assert e.value.code == 143 and sent, (e.value.code, sent)
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: the TensorRT build was stopped; no plan written"
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@needs_rtx
def test_a_rebuild_never_leaves_the_old_sidecar_beside_the_new_plan(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force over an existing plan: the plan was replaced first, its sidecar after, so a stop in between (Ctrl-C,
    a full disk) left the old sidecar (old precision, profiles, target) describing the new plan (an audit)."""
    import dtop_export.engines.tensorrt.builder as builder_mod
    from dtop_export.engines.tensorrt.profiles import make_profiles

    plan = tmp_path / "tiny.plan"
    plan.write_bytes(b"old plan")
    (tmp_path / "tiny.plan.json").write_text('{"format": "dtop-export/tensorrt-plan", "precision": {"mode": "fp16"}}')

    sidecar = (tmp_path / "tiny.plan.json").read_text()
    profiles = make_profiles(*([s] for s in TINY_PROFILE[1::2]), stride=16)

    @contextlib.contextmanager
    def disk_full(dests: list[Path]) -> Iterator[list[Path]]:  # the new plan's bytes cannot be written
        yield [tmp_path / "no-such-folder" / "x.tmp" for _ in dests]

    with monkeypatch.context() as m:  # the old plan and its sidecar stay, usable (the sidecar went first: a plan
        m.setattr(builder_mod, "atomic_paths", disk_full)  # without one, which read_sidecar refuses; a review)
        with pytest.raises(FileNotFoundError):
            builder_mod.build_engine(tiny, plan, target="sm86", profiles=profiles)
    assert plan.read_bytes() == b"old plan" and (tmp_path / "tiny.plan.json").read_text() == sidecar

    def stop(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a stop while the new sidecar is written: the plan is not replaced either
        m.setattr(builder_mod, "sidecar_text", stop)
        with pytest.raises(KeyboardInterrupt):
            builder_mod.build_engine(tiny, plan, target="sm86", profiles=profiles)
    assert plan.read_bytes() == b"old plan" and (tmp_path / "tiny.plan.json").read_text() == sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.plan", "tiny.plan.json"]


@needs_rtx
def test_a_failed_rename_keeps_the_old_plan_its_sidecar_and_fp16_onnx(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old sidecar was removed before the plan and FP16 ONNX were renamed into place, so a rename that failed
    (and was rolled back) left the old plan without its sidecar, which read_sidecar refuses (a review): the plan, its
    sidecar and the FP16 ONNX are now renamed together, all or nothing."""
    import os

    import dtop_export.engines.tensorrt.builder as builder_mod
    from dtop_export.engines.tensorrt.profiles import make_profiles

    src = tmp_path / "tiny.onnx"
    src.write_bytes(tiny.read_bytes())
    old = {"tiny.plan": b"old plan", "tiny.plan.json": b'{"format": "dtop-export/tensorrt-plan"}',
           "tiny.fp16.onnx": b"old fp16 onnx"}  # fmt: skip
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    replace = os.replace

    def full_disk_at_the_sidecar(a: str | Path, b: str | Path) -> None:  # the last of the three renames fails
        if str(a).endswith(".tmp") and Path(b).name == "tiny.plan.json":
            raise OSError(28, "No space left on device")
        replace(a, b)

    monkeypatch.setattr(os, "replace", full_disk_at_the_sidecar)
    profiles = make_profiles(*([s] for s in TINY_PROFILE[1::2]), stride=16)
    with pytest.raises(OSError, match="No space left"):
        builder_mod.build_engine(src, tmp_path / "tiny.plan", fp16=True, target="sm86", profiles=profiles)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "tiny.onnx"} == old


def test_trt_cli_refuses_a_wrong_output_name_or_workspace_in_one_line(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o model.onnx` wrote a TensorRT plan under an ONNX name (with --force over the source ONNX itself), which
    `info`/`embed` then read as ONNX; `--workspace nan` was a ValueError traceback (an audit); `--fp16-onnx MODEL`
    replaced the float32 MODEL with its FP16 conversion, and still did with --print-trtexec (a review: the refusal
    was the builder's alone)."""
    from cli_helpers import cli

    src = tmp_path / "m.onnx"
    src.write_bytes(tiny.read_bytes())
    rtx = ("--target", "sm86")
    cases = [
        (
            (*rtx, "-o", str(src), "--force"),
            f"error: --output {src}: a TensorRT engine file ends in .plan (or .engine, .trt)",
        ),
        ((*rtx, "--workspace", "nan"), "error: --workspace must be a number of GiB > 0, got nan"),
        (
            (*rtx, "--fp16", "--fp16-onnx", str(tmp_path / "x.plan")),
            f"--fp16-onnx {tmp_path / 'x.plan'} should end in .onnx",
        ),
        (  # the FP16 conversion replaced the float32 source, without --force (an audit, by hand)
            (*rtx, "--fp16", "--fp16-onnx", str(src)),
            f"error: --fp16-onnx {src} is the float32 ONNX it is made from: name another file",
        ),
        (  # the same with --print-trtexec, which converts without the builder (a review)
            ("--fp16", "--fp16-onnx", str(src), "--print-trtexec", "--trt-version", "10"),
            f"error: --fp16-onnx {src} is the float32 ONNX it is made from: name another file",
        ),
    ]
    for args, message in cases:
        assert cli("trt", str(src), *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and src.read_bytes() == tiny.read_bytes()


@needs_rtx
def test_a_build_that_writes_no_plan_leaves_no_fp16_onnx(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trt --fp16` wrote the FP16 ONNX (its intermediate) before it built: a build stopped by Ctrl-C or refused
    left it beside no plan, and the rerun was refused for it (an audit); the CLI then removed one it had made, but a
    --force rebuild stopped before any plan left the rewritten FP16 ONNX beside the kept plan, whose sidecar
    describes the old one (a review). The FP16 ONNX now goes to disk with the first plan: a stopped build leaves
    none, or the old one as it was, and no temp file."""
    from cli_helpers import cli

    import dtop_export.engines.tensorrt.builder as builder_mod
    from dtop_export.engines.tensorrt.watch import BuildWatch

    class CtrlCIn(BuildWatch):  # Ctrl-C in build number `at` (from 1), before TensorRT's first step
        at = 1

        def monitor(self, trt: object, logger: object) -> object:
            self.builds = getattr(self, "builds", 0) + 1
            self.interrupted = self.interrupted or self.builds == self.at
            return super().monitor(trt, logger)

    monkeypatch.setattr(builder_mod, "BuildWatch", CtrlCIn)
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny.read_bytes())
    args = ("trt", str(src), "--fp16", *TINY_PROFILE, "--target")
    assert cli(*args, "sm86") == 130
    assert "no plan written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    CtrlCIn.at = 2  # in the second of two targets: the first plan stays, and the FP16 ONNX it was built from
    assert cli(*args, "sm86,sm89") == 130
    kept = ["m.fp16.onnx", "m.onnx", "m.sm86.plan", "m.sm86.plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    fp16 = (tmp_path / "m.fp16.onnx").read_bytes()
    CtrlCIn.at = 1  # a --force rebuild that would write another FP16 ONNX, stopped before any plan
    assert cli(*args, "sm86,sm89", "--force", "--keep-fp32", "head_fc") == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == kept and (tmp_path / "m.fp16.onnx").read_bytes() == fp16
    CtrlCIn.at = 0  # and when it writes its plans, the new FP16 ONNX with them
    assert cli(*args, "sm86,sm89", "--force", "--keep-fp32", "head_fc") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "m.sm89.plan", "m.sm89.plan.json"])
    assert (tmp_path / "m.fp16.onnx").read_bytes() != fp16


# flavour logic (no builds) --------------------------------------------------------------------------------------


def test_backend_auto_picks_the_installed_flavour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "installed_flavours", lambda: [])
    with pytest.raises(DToPError, match=r"neither TensorRT nor TensorRT-RTX is installed.*\[cuda12\].*\[rtx-cuda12\]"):
        install.resolve_flavour()
    with pytest.raises(DToPError, match=r"--target .* only TensorRT-RTX does: .*\[rtx-cuda12\]"):
        install.resolve_flavour(named_target=True)
    monkeypatch.setattr(install, "installed_flavours", lambda: [RTX])
    assert install.resolve_flavour() is RTX and install.resolve_flavour(named_target=True) is RTX
    monkeypatch.setattr(install, "installed_flavours", lambda: [TENSORRT, RTX])
    assert install.resolve_flavour() is TENSORRT  # both: TensorRT, unless a named target asks for RTX
    assert install.resolve_flavour(named_target=True) is RTX
    assert install.resolve_flavour("rtx") is RTX and install.resolve_flavour("tensorrt") is TENSORRT
    with pytest.raises(DToPError, match="unknown TensorRT backend 'trt'"):
        install.resolve_flavour("trt")
    with pytest.raises(DToPError, match="--target builds .* which TensorRT cannot"):
        install.require_builder(TENSORRT, named_target=True)


def test_a_build_out_of_memory_names_the_workspace_that_holds_it() -> None:
    """r50-vitb16 FP32 for sm86 at the default profile (8x3x1024²) failed here exactly so under --workspace 4."""
    from dtop_export.engines.tensorrt.builder import build_failure_hint

    error = "[localCheckMacros.cpp::getErrorStr::132] Error Code 2: OutOfMemory (Requested size was 4843478528 bytes.)"
    hint = build_failure_hint(error, 4.0)
    assert hint.startswith(error) and "needs 5 GiB of scratch, over --workspace 4: pass --workspace 6" in hint
    assert build_failure_hint("", 4.0) == "see the TensorRT log (try a larger --workspace or a narrower profile)"


def test_targets_parse_and_name_their_plans() -> None:
    from dtop_export.engines.tensorrt.targets import parse_target, parse_targets, plan_paths

    assert [t.sm for t in parse_targets("sm86, 8.9,sm_120,121")] == ["sm86", "sm89", "sm120", "sm121"]
    assert parse_target("75").compute_capability == "7.5"
    with pytest.raises(DToPError, match=r"Hopper.*TensorRT proper.*--backend tensorrt"):
        parse_target("9.0")
    with pytest.raises(DToPError, match="does not build for compute capability 6.1"):
        parse_target("sm61")
    with pytest.raises(DToPError, match="--target is empty"):
        parse_targets(" , ")
    out = Path("m/model.plan")
    assert plan_paths(out, parse_targets("sm86")) == [out]
    assert plan_paths(out, parse_targets("sm86,sm89")) == [Path("m/model.sm86.plan"), Path("m/model.sm89.plan")]
    trt = types.SimpleNamespace(ComputeCapability=types.SimpleNamespace(SM86="enum-86"))
    assert parse_target("sm86").enum(trt) == "enum-86"
    with pytest.raises(DToPError, match="no build target sm89"):
        parse_target("sm89").enum(trt)


def test_compatibility_names_the_backend() -> None:
    from dtop_export.engines.tensorrt.sidecar import PlanInfo, compatibility

    info = PlanInfo("1.7.1.116", {"name": None, "compute_capability": "8.6", "target": "sm86"}, [], {},
                    {"path": "m.onnx"}, backend="rtx")  # fmt: skip
    gpu = GpuInfo("NVIDIA RTX A6000", "8.6")
    assert compatibility(info, "1.7.1.116", gpu) == (None, None)  # a named-target build: no "tuned on" warning
    err, _ = compatibility(info, "10.13.0.35", gpu, TENSORRT)
    assert err and "built with TensorRT-RTX 1.7.1.116 for sm86 (no GPU); it runs only with TensorRT-RTX" in err
    old = PlanInfo.from_dict({"tensorrt_version": "10.3", "gpu": {"name": "A100", "compute_capability": "8.0"},
                              "profiles": [], "precision": {}, "onnx": {}})  # fmt: skip
    assert old.backend == "tensorrt"  # a version-1 sidecar is TensorRT's


# the runtime cache (TensorRT-RTX's JIT kernels), with recording fakes: running needs a GPU ----------------------


class _Cache:
    def __init__(self) -> None:
        self.blob = b""

    def deserialize(self, blob: bytes) -> bool:
        if blob.startswith(b"garbage"):
            return False
        self.blob = bytes(blob)
        return True

    def serialize(self) -> bytes:
        return self.blob + b"+kernels"


def _rtx_runner(tmp_path: Path, cache_path: Path) -> object:
    import dtop_export.engines.tensorrt.runner as runner_mod

    calls: list[str] = []
    cache = _Cache()

    class Config:
        def set_execution_context_allocation_strategy(self, s: str) -> None:
            calls.append(f"strategy {s}")

        def create_runtime_cache(self) -> _Cache:
            return cache

        def set_runtime_cache(self, c: _Cache) -> bool:
            calls.append("cache set")
            return True

    class CudaEngine:
        def create_runtime_config(self) -> Config:
            return Config()

        def create_execution_context(self, config: Config) -> object:
            calls.append("context from runtime config")
            return types.SimpleNamespace(set_optimization_profile_async=lambda k, s: True)

    eng = object.__new__(runner_mod.TensorRTEngine)
    eng._trt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(ON_PROFILE_CHANGE="opc"))
    eng.engine, eng._ctx, eng._profile, eng._cache = CudaEngine(), None, -1, None
    eng.runtime_cache, eng._stream = cache_path, types.SimpleNamespace(cuda_stream=0)
    eng._logger = types.SimpleNamespace(last_error="", reset=lambda: None)
    eng.calls, eng.fake_cache = calls, cache  # type: ignore[attr-defined]
    return eng


def test_runtime_cache_is_loaded_and_saved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rt" / "m.rtxcache"
    eng = _rtx_runner(tmp_path, path)
    eng._context(0)  # type: ignore[attr-defined]
    assert eng.calls == ["strategy opc", "cache set", "context from runtime config"]  # type: ignore[attr-defined]
    eng.close()  # type: ignore[attr-defined]
    assert path.read_bytes() == b"+kernels"
    eng = _rtx_runner(tmp_path, path)
    eng._context(0)  # type: ignore[attr-defined]
    assert eng.fake_cache.blob == b"+kernels"  # type: ignore[attr-defined]
    eng.close()  # type: ignore[attr-defined]
    assert path.read_bytes() == b"+kernels+kernels"
    path.write_bytes(b"garbage")  # another GPU's, or corrupt: ignored with a warning, rewritten on close
    eng = _rtx_runner(tmp_path, path)
    with caplog.at_level("WARNING", logger="dtop_export.engines.tensorrt"):
        eng._context(0)  # type: ignore[attr-defined]
    assert any("runtime cache" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    eng.close()  # type: ignore[attr-defined]
    assert path.read_bytes() == b"+kernels"


def test_default_runtime_cache_lives_in_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtop_export.engines.tensorrt.runner import default_runtime_cache
    from dtop_export.engines.tensorrt.sidecar import PlanInfo

    info = PlanInfo("1.7.1.116", {"name": None, "compute_capability": "8.9", "target": "sm89"}, [], {}, {},
                    build={"built_at": "1"}, backend="rtx")  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_runtime_cache(tmp_path / "model.plan", info, GpuInfo("RTX 4090", "8.9"))
    assert first.parent == tmp_path / "cache" / "dtop-export" / "tensorrt-rtx" and first.name.endswith("-sm89.rtxcache")
    assert first.name.startswith("model-")
    info.build["built_at"] = "2"  # a rebuild: a new cache
    assert default_runtime_cache(tmp_path / "model.plan", info, GpuInfo("RTX 4090", "8.9")) != first


@needs_rtx
def test_ctrl_c_between_two_targets_starts_no_next_build(tmp_path: Path, tiny: Path) -> None:
    """Ctrl-C after the first plan was written, before the second build began (its builder config, profiles,
    timing cache) said 'stopping before TensorRT's next build', and the next build started all the same (a review)
    -> nothing checked the stop before it: now it stops there, the first plan kept."""
    import os
    import signal

    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.targets import parse_targets
    from dtop_export.errors import Interrupted

    heard: list[str] = []

    def on_build(text: str) -> None:
        heard.append(text)
        if text.endswith("(2/2)"):  # the second build's head: announced before TensorRT is called
            os.kill(os.getpid(), signal.SIGINT)

    plans = [tmp_path / "tiny.sm86.plan", tmp_path / "tiny.sm89.plan"]
    profiles = make_profiles(*([s] for s in TINY_PROFILE[1::2]), stride=16)
    with pytest.raises(Interrupted, match=re.escape(f"kept {plans[0]} (each with its sidecar)")):
        build_engines(tiny, plans, targets=parse_targets("sm86,sm89"), profiles=profiles, on_build=on_build)
    assert any(h.endswith("(2/2)") for h in heard) and not any("(2/2): " in h for h in heard), heard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.sm86.plan", "tiny.sm86.plan.json"]


@needs_rtx
def test_the_sidecar_hashes_the_onnx_that_was_read_not_the_file_after_the_build(tmp_path: Path, tiny: Path) -> None:
    """The sidecar's ``onnx.sha256`` hashed the source file after each target's build (the last note: once per
    target): an ONNX re-exported during a long build was recorded as the plan's source. It is hashed once, when
    it is read: every plan of a multi-target build names the file it was built from."""
    import shutil

    from dtop_export.digest import file_sha256
    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.sidecar import read_sidecar
    from dtop_export.engines.tensorrt.targets import parse_targets

    onnx = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny, onnx)
    read = file_sha256(onnx)

    def on_build(text: str) -> None:  # a re-export lands while the plans are built
        with onnx.open("ab") as f:
            f.write(b"x")

    plans = [tmp_path / "tiny.sm86.plan", tmp_path / "tiny.sm89.plan"]
    profiles = make_profiles(*([s] for s in TINY_PROFILE[1::2]), stride=16)
    build_engines(onnx, plans, targets=parse_targets("sm86,sm89"), profiles=profiles, on_build=on_build)
    assert file_sha256(onnx) != read
    assert [read_sidecar(p).onnx["sha256"] for p in plans] == [read, read]


@needs_rtx
def test_a_plan_and_a_sidecar_of_two_builds_are_refused_and_a_linked_fp16_onnx_is_named_as_written(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash between the renames of a plan and its sidecar (SIGKILL, power loss: not the signals held) left a new
    plan beside the old sidecar, which was trusted (a review) -> the sidecar records the plan's size and a plan of
    another size is refused in one line (a sidecar without it reads as before). An --fp16-onnx destination that
    was a link was recorded as the file it pointed to, which the build then replaced by a file of its own (a
    review) -> recorded as written."""
    from cli_helpers import cli

    from dtop_export.engines.tensorrt.sidecar import read_sidecar, sidecar_path

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "old.fp16.onnx").write_bytes(b"old")
    fp16 = tmp_path / "m.fp16.onnx"
    fp16.symlink_to(tmp_path / "shared" / "old.fp16.onnx")
    (tmp_path / "m.onnx").write_bytes(tiny.read_bytes())
    plan = tmp_path / "m.plan"
    args = ["--fp16", *TINY_PROFILE, "--target", "sm86", "-o", str(plan), "--fp16-onnx", str(fp16), "--force"]
    assert cli("trt", str(tmp_path / "m.onnx"), *args) == 0
    info = read_sidecar(plan)
    assert info.build["plan_bytes"] == plan.stat().st_size
    assert Path(info.onnx_file(plan, "built_from")) == fp16.resolve() and not fp16.is_symlink()
    assert (tmp_path / "shared" / "old.fp16.onnx").read_bytes() == b"old"

    with plan.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DToPError, match="they are not from the same build"):
        read_sidecar(plan)
    capsys.readouterr()
    assert cli("info", str(plan)) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rebuild with `dtop-export trt`" in err and "Traceback" not in err
    side = sidecar_path(plan)
    d = json.loads(side.read_text())
    del d["build"]["plan_bytes"]
    side.write_text(json.dumps(d))
    assert "plan_bytes" not in read_sidecar(plan).build  # an older sidecar reads as before
